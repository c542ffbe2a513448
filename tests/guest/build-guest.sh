#!/usr/bin/env bash
# Builds the tiny real test guest used by NovaCron Edge's test suite.
#
#   tests/guest/build-guest.sh [--bench] OUTDIR
#
# Produces OUTDIR/vmlinuz (Debian's linux-image-amd64 kernel) and
# OUTDIR/initramfs.gz (busybox-static + the few modules the guest needs).
# Boot it with direct kernel boot and this kernel command line:
#
#   console=ttyS0 panic=-1 quiet [novacron.marker=XYZ]
#
# The guest prints to its console (ttyS0):
#   NOVACRON-GUEST-UP            once /init has loaded its modules
#   NOVACRON-MARKER=XYZ          if novacron.marker=XYZ is on the command line
#   NOVACRON-DISK=vda            if a virtio disk is attached
#   NOVACRON-CIDATA=<line>       first line of user-data on a CD labelled cidata
#   NOVACRON-IP=<addr>           when eth0 got a DHCP lease (in the background)
#   NOVACRON-REC=<n>             with novacron.records=N: record n (0..N-1) is on
#                                vda, written O_DIRECT + fsync (see below); then
#                                NOVACRON-RECORDS-DONE, or NOVACRON-REC-FAILED=<n>
# and powers off by itself on an ACPI power-button event (virsh shutdown).
# Needs: busybox-static, linux-image-amd64, cpio, gzip (tests/setup-host.sh).
#
# --bench also writes OUTDIR/initramfs-bench.gz for tests/bench/disk.sh: the
# same archive followed by a second one with Debian's fio (and every library
# it loads, about 36 MB gzipped) and tests/guest/bench-init.sh as /init
# (novacron.bench=... on the command line; see that file). Needs fio.
# The default initramfs.gz is the same with or without --bench.
set -euo pipefail

usage() { echo "usage: $0 [--bench] OUTDIR" >&2; exit 2; }
bench=0
if [ "${1:-}" = --bench ]; then bench=1; shift; fi
[ $# -eq 1 ] || usage
outdir="$1"
script="$(readlink -f "$0")"

# bench_initramfs: OUTDIR/initramfs-bench.gz from OUTDIR/initramfs.gz.
bench_initramfs() {
    local init fio out="$outdir/initramfs-bench.gz" src lib w
    init="$(dirname "$script")/bench-init.sh"
    fio="$(command -v fio)" || { echo "build-guest: --bench needs fio (apt-get install fio)" >&2; exit 1; }
    if [ "$out" -nt "$outdir/initramfs.gz" ] && [ "$out" -nt "$init" ] && [ "$out" -nt "$fio" ] \
        && [ "$out" -nt "$script" ]; then
        echo "build-guest: $out is up to date"
        return 0
    fi
    w="$(mktemp -d)"
    mkdir -p "$w/root/usr/bin"
    cp "$init" "$w/root/init"
    chmod 0755 "$w/root/init"
    cp "$fio" "$w/root/usr/bin/fio"
    # Each library at the path the loader looks it up by (ldd's), dereferenced.
    while read -r lib; do
        mkdir -p "$w/root$(dirname "$lib")"
        cp -L "$lib" "$w/root$lib"
    done < <(ldd "$fio" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*ld-linux/ { print $1 }')
    (cd "$w/root" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0) | gzip -6n > "$w/bench.gz"
    cat "$outdir/initramfs.gz" "$w/bench.gz" > "$w/initramfs-bench.gz"
    mv -f "$w/initramfs-bench.gz" "$out"
    rm -rf "$w"
    src=$(du -h "$out" | cut -f1)
    echo "build-guest: built $out ($src, fio $("$fio" --version))"
}

# Newest installed Debian kernel (version-sorted, not mtime: upgrades keep old ones).
kernel="$(find /boot -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n1)"
[ -n "$kernel" ] || { echo "build-guest: no /boot/vmlinuz-* (install linux-image-amd64)" >&2; exit 1; }
kver="${kernel#/boot/vmlinuz-}"
moddir="/lib/modules/$kver"
busybox=/bin/busybox
[ -x "$busybox" ] && [ -d "$moddir" ] || { echo "build-guest: need busybox-static and $moddir" >&2; exit 1; }

# Skip when both outputs are newer than everything they are made from.
up_to_date=1
for out in "$outdir/vmlinuz" "$outdir/initramfs.gz"; do
    for src in "$script" "$kernel" "$busybox" "$moddir/modules.dep"; do
        [ "$out" -nt "$src" ] || up_to_date=0
    done
done
if [ "$up_to_date" = 1 ]; then
    echo "build-guest: $outdir is up to date ($kver)"
    if [ "$bench" = 1 ]; then bench_initramfs; fi
    exit 0
fi

# Modules the guest wants; their dependencies are added from modules.dep.
# ata_piix drives the IDE CD-ROM of machine type 'pc'; ahci covers SATA on q35.
wanted=(button evdev virtio_pci virtio_blk virtio_net ata_piix ata_generic ahci sr_mod isofs)

declare -A dep_of=() path_of=() seen=()
while IFS= read -r line; do
    rel="${line%%:*}"
    name="$(basename "$rel")"; name="${name%%.ko*}"; name="${name//-/_}"
    path_of[$name]="$rel"
    deps="${line#*:}"
    dep_of[$name]="$deps"
done < "$moddir/modules.dep"

order=()
# Depth-first: dependencies are appended before the module that needs them.
visit() {
    local m="$1" d dn
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    if [ -z "${path_of[$m]:-}" ]; then
        # Built into the kernel (e.g. virtio on other configs): nothing to load.
        grep -q "/${m//_/[-_]}\.ko" "$moddir/modules.builtin" || \
            echo "build-guest: warning: module $m not found for $kver" >&2
        return 0
    fi
    for d in ${dep_of[$m]}; do
        dn="$(basename "$d")"; dn="${dn%%.ko*}"; visit "${dn//-/_}"
    done
    order+=("$m")
}
for m in "${wanted[@]}"; do visit "$m"; done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,mnt/cidata,etc/acpi/PWRF,lib/modules}

# busybox plus applet symlinks made at build time (no --install at every boot).
cp "$busybox" "$root/bin/busybox"
while IFS= read -r applet; do
    [ "$applet" = bin/busybox ] || [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)

# Copy modules flat, decompressed: busybox insmod cannot read .ko.xz/.ko.zst.
: > "$root/lib/modules/load-order"
for m in "${order[@]}"; do
    src="$moddir/${path_of[$m]}"
    dst="$root/lib/modules/$m.ko"
    case "$src" in
        *.ko.xz)  xz -dc "$src" > "$dst" ;;
        *.ko.zst) zstd -qdc "$src" > "$dst" ;;
        *.ko.gz)  gzip -dc "$src" > "$dst" ;;
        *)        cp "$src" "$dst" ;;
    esac
    echo "$m" >> "$root/lib/modules/load-order"
done

# busybox acpid runs /etc/acpi/<ACTION>/<PARAM> for an event; the ACPI power
# button arrives via evdev as PWRF/00000080. -f: there is no init to ask.
cat > "$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo NOVACRON-POWEROFF > /dev/console
sync
exec poweroff -f
EOF

# udhcpc hook: configure the lease and announce it.
mkdir -p "$root/etc/udhcpc"
cat > "$root/etc/udhcpc/novacron.script" <<'EOF'
#!/bin/sh
case "$1" in
    deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        echo "NOVACRON-IP=$ip" > /dev/console ;;
esac
exit 0
EOF

cat > "$root/init" <<'EOF'
#!/bin/sh
# NovaCron test guest init (PID 1). Must never exit: that panics the kernel.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1

while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done < /lib/modules/load-order

echo NOVACRON-GUEST-UP
for arg in $(cat /proc/cmdline); do
    case "$arg" in novacron.marker=*) echo "NOVACRON-MARKER=${arg#novacron.marker=}" ;; esac
done

# Power button -> /etc/acpi/PWRF/00000080. acpid opens the event devices at
# start, so wait (bounded) until the ACPI button's input device exists.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    grep -qs 'Power Button' /sys/class/input/event*/device/name && break
    sleep 0.2
done
acpid -l /dev/null

# Device probing can finish after insmod returns: give bound devices a moment.
wait_dev() { for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do [ -b "$1" ] && return 0; sleep 0.2; done; return 1; }
if ls /sys/bus/virtio/drivers/virtio_blk 2>/dev/null | grep -q '^virtio'; then wait_dev /dev/vda; fi
[ -b /dev/vda ] && echo NOVACRON-DISK=vda

# novacron.records=N: numbered 4 KiB records to vda from 1 MiB on, record n
# at byte (256 + n) * 4096: "NCREC <n, 8 digits>\n" padded with zeros. Each
# is written O_DIRECT and fsynced before its number is printed, so a printed
# number is a write the disk acknowledged as durable (the disk tests check
# every printed record on the host's copy).
records=
for arg in $(cat /proc/cmdline); do
    case "$arg" in novacron.records=*) records="${arg#novacron.records=}" ;; esac
done
if [ -n "$records" ] && [ -b /dev/vda ]; then
    (
        i=0
        while [ "$i" -lt "$records" ]; do
            if printf 'NCREC %08d\n' "$i" | dd of=/dev/vda bs=4096 seek=$((256 + i)) conv=sync,fsync oflag=direct 2>/dev/null; then
                echo "NOVACRON-REC=$i"
            else
                echo "NOVACRON-REC-FAILED=$i"
            fi
            i=$((i + 1))
        done
        echo NOVACRON-RECORDS-DONE
    ) &
fi

if ls /sys/class/scsi_device 2>/dev/null | grep -q .; then
    wait_dev /dev/sr0
fi
if [ -b /dev/sr0 ] && [ "$(findfs LABEL=cidata 2>/dev/null)" = /dev/sr0 ]; then
    if mount -t iso9660 -o ro /dev/sr0 /mnt/cidata; then
        echo "NOVACRON-CIDATA=$(head -n1 /mnt/cidata/user-data 2>/dev/null)"
    fi
fi

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    # No -n: under a loaded TCG host the first tries can time out; keep
    # retrying in the background until a lease arrives (-q then exits).
    udhcpc -i eth0 -q -t 10 -T 3 -A 2 -s /etc/udhcpc/novacron.script >/dev/null 2>&1 &
fi

# Keep a usable shell on the console; sleep so an EOF console cannot spin.
while :; do
    setsid cttyhack sh
    sleep 1
done
EOF
chmod 0755 "$root/init" "$root/etc/acpi/PWRF/00000080" "$root/etc/udhcpc/novacron.script"

mkdir -p "$outdir"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0) \
    | gzip -9n > "$work/initramfs.gz"
cp "$kernel" "$work/vmlinuz"
# Rename into place last so an interrupted build never looks up to date.
mv -f "$work/vmlinuz" "$outdir/vmlinuz"
mv -f "$work/initramfs.gz" "$outdir/initramfs.gz"
echo "build-guest: built $outdir ($kver; modules: ${order[*]})"
if [ "$bench" = 1 ]; then bench_initramfs; fi
