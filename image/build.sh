#!/usr/bin/env bash
# Builds the NovaCron Edge appliance image from Debian packages:
#   bash image/build.sh [--rootfs-only] [OUTDIR]        (as root, Debian 12 host)
# OUTDIR (default target/image) gets:
#   base/      debootstrap + packages, cached while the package lists are unchanged
#   rootfs/    base + novacron binary, units and image settings (what nspawn boots)
#   novacron-appliance-VERSION-x86_64.raw and .raw.zst (not with --rootfs-only)
# The Debian mirror is taken from this machine's apt sources (tests/setup-host.sh).
# NOVACRON_BIN=path skips `cargo build --release`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
rootfs_only=0
if [ "${1:-}" = "--rootfs-only" ]; then rootfs_only=1; shift; fi
out="$(realpath -m "${1:-$repo/target/image}")"
mkdir -p "$out"
# One build per OUTDIR at a time (tests may run concurrently).
exec 9>"$out/.lock"
flock 9
t0=$(date +%s)
log() { echo "image: [$(( $(date +%s) - t0 ))s] $*" >&2; }

# ---- what goes in -----------------------------------------------------------
suite=bookworm
# From bookworm itself (debootstrap --include).
base_pkgs=(systemd systemd-sysv udev dbus kmod iproute2 ca-certificates curl
           linux-image-amd64 initramfs-tools systemd-boot-efi e2fsprogs
           openssh-server genisoimage less)
# From bookworm-backports: libvirt 11 / QEMU 10, as on the dev hosts (the
# binary links the libvirt0 it was built against).
bpo_pkgs=(libvirt0 libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
          qemu-system-x86 qemu-utils)
# Timers and services an appliance does not need.
mask_units=(apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service
            fstrim.timer dpkg-db-backup.timer)

# ---- helpers ----------------------------------------------------------------
eval "$(sed -n '/^debian_mirror() {/,/^}/p' "$repo/tests/setup-host.sh")"

in_root() { # run a command inside a rootfs with /proc /sys /dev mounted
    local r="$1"; shift
    mount -t proc proc "$r/proc"; mount --rbind /sys "$r/sys"
    # A private /dev with only the harmless nodes: with the host's /dev bound
    # in, package scripts (udev, qemu) chgrp /dev/kvm to the *image's* kvm
    # gid, which is another group on the host, and libvirt there loses KVM.
    mount -t tmpfs -o mode=0755,nosuid devtmp "$r/dev"
    local n
    for n in null zero full random urandom tty; do
        touch "$r/dev/$n"
        mount --bind "/dev/$n" "$r/dev/$n"
    done
    mkdir -p "$r/dev/pts" "$r/dev/shm"
    ln -sf /proc/self/fd "$r/dev/fd"
    local rc=0
    LC_ALL=C DEBIAN_FRONTEND=noninteractive chroot "$r" "$@" || rc=$?
    umount -R "$r/dev" "$r/sys" "$r/proc" 2>/dev/null || umount -lR "$r/dev" "$r/sys" "$r/proc"
    return $rc
}

# ---- 1. the base rootfs (cached) --------------------------------------------
base_key="$( { printf '%s\n' "$suite" "${base_pkgs[@]}" -- "${bpo_pkgs[@]}";
               sed -n '/^build_base() {/,/^}/p' "$0"; } | sha256sum | cut -c1-16)"

build_base() {
    local b="$1" mirror
    mirror="$(debian_mirror | head -n1)"
    [ -n "$mirror" ] || { echo "image: no Debian mirror in the apt sources" >&2; exit 1; }
    rm -rf "$b"; mkdir -p "$b"
    # No docs, man pages or translations from here on (debootstrap's own
    # packages are trimmed by the cleanup below).
    mkdir -p "$b/etc/dpkg/dpkg.cfg.d"
    log "debootstrap $suite (minbase) from the host's mirror"
    debootstrap --variant=minbase --include="$(IFS=,; echo "${base_pkgs[*]}")" \
        "$suite" "$b" "$mirror" >"$out/debootstrap.log" 2>&1 \
        || { tail -n 30 "$out/debootstrap.log" >&2; exit 1; }
    cat > "$b/etc/dpkg/dpkg.cfg.d/01-novacron-nodoc" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
CFG
    cat > "$b/etc/apt/sources.list" <<SRC
deb $mirror $suite main
deb $mirror $suite-updates main
deb $mirror $suite-backports main
SRC
    echo 'APT::Install-Recommends "false";' > "$b/etc/apt/apt.conf.d/01-norecommends"
    log "apt-get install -t $suite-backports ${bpo_pkgs[*]}"
    in_root "$b" sh -c "apt-get update -qq && apt-get install -y -qq -t $suite-backports ${bpo_pkgs[*]}" \
        >"$out/apt.log" 2>&1 || { tail -n 30 "$out/apt.log" >&2; exit 1; }
    # The image carries no mirror address and no package lists.
    : > "$b/etc/apt/sources.list"
    rm -rf "$b"/var/lib/apt/lists/* "$b"/var/cache/apt/* "$b"/var/cache/debconf/*-old \
           "$b"/var/log/*.log "$b"/var/log/apt/*
    find "$b/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
    find "$b/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$b"/usr/share/man/* "$b"/usr/share/info/* "$b"/usr/share/lintian
    find "$b/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    echo "$base_key" > "$b/.novacron-base"
}

if [ "$(cat "$out/base/.novacron-base" 2>/dev/null)" != "$base_key" ]; then
    build_base "$out/base"
else
    log "base rootfs cached ($base_key)"
fi

# ---- 2. the novacron binary -------------------------------------------------
bin="${NOVACRON_BIN:-}"
if [ -z "$bin" ]; then
    log "cargo build --release"
    (cd "$repo" && cargo build --release --quiet)
    bin="$repo/target/release/novacron"
fi
version="$(awk -F'"' '/^version *=/ {print $2; exit}' "$repo/Cargo.toml")"

# ---- 3. rootfs = base + novacron + appliance settings -----------------------
r="$out/rootfs"
log "rootfs: copy base, add novacron $version"
rm -rf "$r"
cp -a "$out/base" "$r"
rm -f "$r/.novacron-base"
install -m 0755 "$bin" "$r/usr/bin/novacron"
install -d "$r/usr/lib/systemd/system" "$r/usr/lib/sysusers.d" "$r/usr/lib/tmpfiles.d" \
           "$r/usr/share/doc/novacron" "$r/usr/lib/repart.d"
install -m 0644 "$repo"/systemd/*.service "$r/usr/lib/systemd/system/"
install -m 0644 "$repo/systemd/sysusers.d/novacron.conf" "$r/usr/lib/sysusers.d/novacron.conf"
install -m 0644 "$repo/systemd/tmpfiles.d/novacron.conf" "$r/usr/lib/tmpfiles.d/novacron.conf"
install -m 0644 "$repo/README.md" "$repo/docs/operations.md" "$r/usr/share/doc/novacron/"
# First boot on the target disk: grow the data partition to the end of the disk.
# (Same type and label as image/repart.d/40-data.conf; repart matches the
# existing partition and only grows it.)
printf '[Partition]\nType=linux-generic\nLabel=data\nGrowFileSystem=yes\n' > "$r/usr/lib/repart.d/40-data.conf"
# The data partition is /var (the root slots are read-only erofs);
# x-systemd.growfs grows its ext4 after systemd-repart grew the partition.
cat > "$r/etc/fstab" <<'FSTAB'
PARTLABEL=data  /var       ext4  defaults,x-systemd.growfs  0 2
PARTLABEL=esp   /efi       vfat  umask=0077,noauto,x-systemd.automount  0 2
FSTAB
mkdir -p "$r/efi"
echo novacron > "$r/etc/hostname"
# Empty machine-id: generated on first boot (transient while / is read-only).
: > "$r/etc/machine-id"; rm -f "$r/var/lib/dbus/machine-id"
# SSH: off unless the seed installed authorized keys; host keys are made on
# the data partition at first start, never baked into the image.
rm -f "$r"/etc/ssh/ssh_host_*
mkdir -p "$r/etc/ssh/sshd_config.d" "$r/etc/systemd/system/ssh.service.d"
cat > "$r/etc/ssh/sshd_config.d/novacron.conf" <<'SSHD'
HostKey /var/lib/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /var/lib/novacron-seed/ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
SSHD
cat > "$r/etc/systemd/system/ssh.service.d/novacron.conf" <<'UNIT'
[Unit]
ConditionPathExists=/var/lib/novacron-seed/ssh/authorized_keys
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'mkdir -p /var/lib/ssh && [ -e /var/lib/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N "" -f /var/lib/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
UNIT
# Users are baked in (/etc is read-only on the appliance).
in_root "$r" systemd-sysusers >/dev/null 2>&1
# The default config baked in (novacron-firstboot cannot write to a read-only
# /etc); the modes match tmpfiles.d/novacron.conf so the unit's
# ConfigurationDirectory= has nothing to change.
install -d -m 0750 "$r/etc/novacron"
"$bin" config default > "$r/etc/novacron/novacron.toml"
in_root "$r" sh -c 'chgrp novacron /etc/novacron /etc/novacron/novacron.toml && chmod 0640 /etc/novacron/novacron.toml'
in_root "$r" systemctl enable novacron.service novacron-firstboot.service >/dev/null 2>&1
in_root "$r" systemctl disable ssh.service ssh.socket >/dev/null 2>&1 || true
# systemd-repart.service is already in sysinit.target.wants (runs when a repart.d is not empty).
in_root "$r" systemctl mask "${mask_units[@]}" >/dev/null 2>&1 || true
pkgs="$(in_root "$r" dpkg -l | grep -c '^ii')"
compilers="$(in_root "$r" sh -c 'ls /usr/bin/gcc* /usr/bin/cc /usr/bin/rustc /usr/bin/clang* 2>/dev/null' || true)"
[ -z "$compilers" ] || { echo "image: compilers in the rootfs: $compilers" >&2; exit 1; }
log "rootfs ready: $r ($pkgs packages, $(du -sh --apparent-size "$r" | cut -f1))"
if [ $rootfs_only = 1 ]; then
    echo "$r"
    exit 0
fi

# ---- 4. the raw image (systemd-repart, no loop devices) ---------------------
stage="$out/stage"
log "staging esp / root / var"
rm -rf "$stage"; mkdir -p "$stage/esp/EFI/BOOT" "$stage/esp/loader/entries" "$stage/esp/novacron"
cp -al "$r" "$stage/root"
# /var lives on the data partition; the root slot keeps an empty mount point.
mv "$stage/root/var" "$stage/var"; mkdir -m 0755 "$stage/root/var"
kver="$(ls "$r/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -n1)"
cp "$r/boot/vmlinuz-$kver" "$stage/esp/novacron/vmlinuz"
cp "$r/boot/initrd.img-$kver" "$stage/esp/novacron/initrd.img"
cp "$r/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$stage/esp/EFI/BOOT/BOOTX64.EFI"
printf 'timeout 3\ndefault novacron-a.conf\n' > "$stage/esp/loader/loader.conf"
for s in a b; do
    cat > "$stage/esp/loader/entries/novacron-$s.conf" <<ENTRY
title   NovaCron Edge $version (slot ${s^^})
linux   /novacron/vmlinuz
initrd  /novacron/initrd.img
options root=PARTLABEL=root-$s rootfstype=erofs ro console=tty0 console=ttyS0,115200 quiet
ENTRY
done
img="$out/novacron-appliance-$version-x86_64.raw"
rm -f "$img" "$img.zst"
log "systemd-repart -> $(basename "$img")"
systemd-repart --empty=create --size=auto --root="$stage" --definitions="$here/repart.d" \
    --offline=yes --dry-run=no --no-pager "$img" >"$out/repart.log" 2>&1 || { tail -n 30 "$out/repart.log" >&2; exit 1; }
log "zstd"
zstd -q -T0 "-${ZSTD_LEVEL:-12}" -k "$img" -o "$img.zst"
rm -rf "$stage"
log "done"
partx -s -o NR,START,SECTORS,SIZE,NAME "$img"
printf 'image:            %s\nraw size:         %s MiB (%s bytes)\ncompressed (zstd): %s MiB\npackages (ii):    %s\n' \
    "$img" "$(( $(stat -c %s "$img") / 1048576 ))" "$(stat -c %s "$img")" \
    "$(( $(stat -c %s "$img.zst") / 1048576 ))" "$pkgs"
