#!/usr/bin/env bash
# Builds the NovaCron Edge appliance image from Debian packages:
#   bash image/build.sh [--rootfs-only|--bundle-only] [OUTDIR]   (as root, Debian 12 host)
# OUTDIR (default target/image) gets:
#   base/      debootstrap + packages, cached while the package lists are unchanged
#   rootfs/    base + novacron binary, units and image settings (what nspawn boots)
#   novacron-appliance-VERSION-x86_64.raw and .raw.zst   (the disk image to flash)
#   novacron-update-VERSION-x86_64.tar and .tar.sha256   (the A/B update bundle)
# --rootfs-only stops after rootfs/, --bundle-only skips the disk image.
# --check only checks this host's tools (what tests/setup-host.sh installs).
# The Debian mirror is taken from this machine's apt sources (tests/setup-host.sh).
# NOVACRON_BIN=path skips `cargo build --release`; IMAGE_VERSION=v overrides
# the version (default: the crate version); NOVACRON_BOOT_TIMEOUT=s sets how
# long a freshly updated slot may take to bring the daemon up (default 300).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
rootfs_only=0 bundle_only=0 check_only=0
case "${1:-}" in
    --rootfs-only) rootfs_only=1; shift ;;
    --bundle-only) bundle_only=1; shift ;;
    --check) check_only=1; shift ;;
esac

# ---- what this host needs, before any work ----------------------------------
# Debian 12's own systemd is 252; the raw image needs systemd-repart
# --offline (254), which bookworm-backports has.
host_ok=1
need_tool() { # need_tool CMD PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "image: $1 is missing (package $2)" >&2; host_ok=0
}
[ "$(id -u)" = 0 ] || { echo "image: run as root (debootstrap, chroot, mounts)" >&2; host_ok=0; }
need_tool debootstrap debootstrap
need_tool flock util-linux
[ -n "${NOVACRON_BIN:-}" ] || need_tool cargo "the Rust toolchain, or set NOVACRON_BIN"
if [ $rootfs_only = 0 ]; then
    need_tool mkfs.erofs erofs-utils
fi
if [ $rootfs_only = 0 ] && [ $bundle_only = 0 ]; then
    for t in "mkfs.vfat dosfstools" "mcopy mtools" "mkfs.ext4 e2fsprogs" "zstd zstd" "partx util-linux"; do
        need_tool $t
    done
    if need_tool systemd-repart "systemd >= 254"; then
        repart_v="$(systemd-repart --version | awk 'NR == 1 {print $2}')"
        case "$repart_v" in
            ''|*[!0-9]*) echo "image: cannot read systemd-repart's version ($repart_v)" >&2; host_ok=0 ;;
            *) [ "$repart_v" -ge 254 ] || { echo "image: systemd-repart is $repart_v, the image needs >= 254 (--offline)" >&2; host_ok=0; } ;;
        esac
    fi
fi
if [ $host_ok = 0 ]; then
    echo "image: this host lacks what the build needs: run bash tests/setup-host.sh (systemd and systemd-container from bookworm-backports, debootstrap, erofs-utils, dosfstools, mtools, zstd)" >&2
    exit 1
fi
[ $check_only = 0 ] || { echo "image: host ok${repart_v:+ (systemd-repart $repart_v)}"; exit 0; }
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
           linux-image-amd64 initramfs-tools systemd-boot e2fsprogs
           openssh-server genisoimage less systemd-resolved)
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
    # systemd-resolved made /etc/resolv.conf its stub link, which resolves
    # nothing inside a chroot: the build host's resolver is used while
    # packages are fetched, and the link is put back afterwards.
    rm -f "$b/etc/resolv.conf"; cp -L /etc/resolv.conf "$b/etc/resolv.conf"
    cat > "$b/etc/apt/sources.list" <<SRC
deb $mirror $suite main
deb $mirror $suite-updates main
deb $mirror $suite-backports main
SRC
    echo 'APT::Install-Recommends "false";' > "$b/etc/apt/apt.conf.d/01-norecommends"
    log "apt-get install -t $suite-backports ${bpo_pkgs[*]}"
    in_root "$b" sh -c "apt-get update -qq && apt-get install -y -qq -t $suite-backports ${bpo_pkgs[*]}" \
        >"$out/apt.log" 2>&1 || { tail -n 30 "$out/apt.log" >&2; exit 1; }
    # The root slots are erofs, which Debian's initramfs does not load by
    # default; without it the initrd cannot mount root.
    echo erofs >> "$b/etc/initramfs-tools/modules"
    in_root "$b" update-initramfs -u -k all >>"$out/apt.log" 2>&1 || { tail -n 30 "$out/apt.log" >&2; exit 1; }
    # DNS from DHCP (or the seeded network files) through systemd-resolved;
    # never the build host's resolver.
    ln -sf ../run/systemd/resolve/stub-resolv.conf "$b/etc/resolv.conf"
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
version="${IMAGE_VERSION:-$(awk -F'"' '/^version *=/ {print $2; exit}' "$repo/Cargo.toml")}"
case "$version" in *[!A-Za-z0-9._+~-]*|"") echo "image: bad IMAGE_VERSION $version" >&2; exit 1 ;; esac
arch=x86_64

# ---- 3. rootfs = base + novacron + appliance settings -----------------------
r="$out/rootfs"
log "rootfs: copy base, add novacron $version"
rm -rf "$r"
cp -a "$out/base" "$r"
rm -f "$r/.novacron-base"
install -m 0755 "$bin" "$r/usr/bin/novacron"
# A debug build (the tests') carries ~100 MiB of debug info the image does
# not need; release builds are stripped already. Scripts are left alone.
strip --strip-debug "$r/usr/bin/novacron" 2>/dev/null || true
install -d "$r/usr/lib/systemd/system" "$r/usr/lib/sysusers.d" "$r/usr/lib/tmpfiles.d" \
           "$r/usr/share/doc/novacron" "$r/usr/lib/repart.d" "$r/usr/lib/systemd/network"
install -m 0644 "$repo"/systemd/*.service "$repo"/systemd/*.path "$r/usr/lib/systemd/system/"
install -m 0644 "$repo/systemd/sysusers.d/novacron.conf" "$r/usr/lib/sysusers.d/novacron.conf"
install -m 0644 "$repo/systemd/tmpfiles.d/novacron.conf" "$r/usr/lib/tmpfiles.d/novacron.conf"
install -m 0644 "$repo/README.md" "$repo/docs/operations.md" "$repo/docs/install.md" "$r/usr/share/doc/novacron/"
# Which build this is (`novacron update status`, the bundle manifest).
printf 'IMAGE_ID=novacron-edge\nIMAGE_VERSION=%s\n' "$version" >> "$r/usr/lib/os-release"
# First boot on the target disk: grow the data partition to the end of the disk.
# (Same type and label as image/repart.d/40-data.conf; repart matches the
# existing partition and only grows it.)
printf '[Partition]\nType=linux-generic\nLabel=data\nGrowFileSystem=yes\n' > "$r/usr/lib/repart.d/40-data.conf"
# The data partition is /var (the root slots are read-only erofs);
# x-systemd.growfs grows its ext4 after systemd-repart grew the partition.
# The ESP is mounted on demand (seed, kernels, boot entries).
cat > "$r/etc/fstab" <<'FSTAB'
PARTLABEL=data  /var       ext4  defaults,x-systemd.growfs  0 2
PARTLABEL=esp   /efi       vfat  umask=0077,noauto,nofail,x-systemd.automount,x-systemd.device-timeout=10s  0 0
FSTAB
mkdir -p "$r/efi"
# A persistent journal on the data partition: logs survive reboots, so the
# boot that an update rolled back from can still be read (journalctl -b -1).
mkdir -p "$r/var/log/journal"
echo novacron > "$r/etc/hostname"
# Empty machine-id: generated on first boot (transient while / is read-only).
: > "$r/etc/machine-id"; rm -f "$r/var/lib/dbus/machine-id"

# What a node learns after flashing lives on the data partition, in
# /var/lib/novacron-etc (written by `novacron setup --appliance`): the
# config, networkd files from the seed, SSH keys.
# (networkd does not follow a linked /etc/systemd/network: novacron setup
# copies the seeded network files to /run/systemd/network at every boot.)
rm -rf "$r/etc/novacron"
ln -s /var/lib/novacron-etc "$r/etc/novacron"
# libvirtd writes under /etc/libvirt (domain and network XML, secrets): it
# moves to the data partition too, seeded from the package's files by
# tmpfiles on first boot (the systemd "factory" convention).
install -d "$r/usr/share/factory/etc"
mv "$r/etc/libvirt" "$r/usr/share/factory/etc/libvirt"
ln -s /var/lib/novacron-etc/libvirt "$r/etc/libvirt"
# tmpfiles must not try to make /etc/novacron a directory here.
install -d "$r/etc/tmpfiles.d"
{ grep -v '^d *\/etc\/novacron ' "$repo/systemd/tmpfiles.d/novacron.conf"
  printf 'd /var/lib/novacron-etc 0750 root novacron -\n'
  printf 'C /var/lib/novacron-etc/libvirt - - - - /usr/share/factory/etc/libvirt\n'
} > "$r/etc/tmpfiles.d/novacron.conf"
# /tmp on tmpfs: the root is read-only, and systemd needs a writable /tmp to
# set up PrivateDevices= (novacron, virtlogd) among others.
cp "$r/usr/share/systemd/tmp.mount" "$r/etc/systemd/system/tmp.mount"
# Networking: DHCP on every wired NIC unless the seed says otherwise (a seeded
# 10-*.network sorts first and wins).
cat > "$r/usr/lib/systemd/network/80-novacron-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
install -d "$r/etc/systemd/system/novacron.service.d" "$r/etc/systemd/system/novacron-setup.service.d" \
           "$r/etc/systemd/system/novacron-boot-check.service.d" "$r/etc/systemd/system/boot-complete.target.requires"
cat > "$r/etc/systemd/system/novacron.service.d/appliance.conf" <<'UNIT'
# The config folder is a link into the data partition on a read-only /etc.
# boot-complete.target (which systemd-bless-boot waits for before marking a
# freshly updated slot good) requires the daemon to be ready.
[Unit]
Before=boot-complete.target
[Service]
ConfigurationDirectory=
UNIT
ln -s /usr/lib/systemd/system/novacron.service "$r/etc/systemd/system/boot-complete.target.requires/novacron.service"
cat > "$r/etc/systemd/system/novacron-setup.service.d/appliance.conf" <<'UNIT'
# Users and folders are baked into the image; apply the seed, set the host name.
[Service]
ExecStart=
ExecStart=/usr/bin/novacron setup --appliance
UNIT
printf '[Service]\nEnvironment=NOVACRON_BOOT_TIMEOUT=%s\n' "${NOVACRON_BOOT_TIMEOUT:-300}" \
    > "$r/etc/systemd/system/novacron-boot-check.service.d/appliance.conf"
# SSH: off unless the seed installed authorized keys; host keys are made on
# the data partition at first start, never baked into the image.
rm -f "$r"/etc/ssh/ssh_host_*
mkdir -p "$r/etc/ssh/sshd_config.d" "$r/etc/systemd/system/ssh.service.d"
cat > "$r/etc/ssh/sshd_config.d/novacron.conf" <<'SSHD'
HostKey /var/lib/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /var/lib/novacron-etc/ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
SSHD
cat > "$r/etc/systemd/system/ssh.service.d/novacron.conf" <<'UNIT'
[Unit]
ConditionPathExists=/var/lib/novacron-etc/ssh/authorized_keys
After=novacron-setup.service
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'mkdir -p /var/lib/ssh && [ -e /var/lib/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N "" -f /var/lib/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
UNIT
# Users are baked in (/etc is read-only on the appliance).
in_root "$r" systemd-sysusers >/dev/null 2>&1
in_root "$r" systemctl enable novacron.service novacron-setup.service novacron-firstboot.service \
    novacron-dataplane.path novacron-update.path novacron-reboot.path novacron-boot-check.service systemd-networkd.service \
    tmp.mount >/dev/null 2>&1
# ssh.service is enabled but conditional on seeded keys (see above).
in_root "$r" systemctl enable ssh.service >/dev/null 2>&1
in_root "$r" systemctl disable ssh.socket >/dev/null 2>&1 || true
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

# ---- 4. what both outputs share: the root slot content and the kernel -------
stage="$out/stage"
log "staging esp / root / var"
rm -rf "$stage"; mkdir -p "$stage/esp/EFI/BOOT" "$stage/esp/loader/entries" "$stage/esp/novacron/a"
cp -al "$r" "$stage/root"
# /var lives on the data partition; the root slot keeps an empty mount point.
mv "$stage/root/var" "$stage/var"; mkdir -m 0755 "$stage/root/var"
kver="$(ls "$r/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -n1)"
kernel="$r/boot/vmlinuz-$kver" initrd="$r/boot/initrd.img-$kver"
# Written as one line into every boot entry; updates keep the running one's.
cmdline="rootfstype=erofs ro console=tty0 console=ttyS0,115200 panic=10"

# ---- 5. the update bundle ---------------------------------------------------
bundle="$out/novacron-update-$version-$arch.tar"
log "bundle: mkfs.erofs (lz4hc) + manifest -> $(basename "$bundle")"
bdir="$out/bundle"
rm -rf "$bdir"; mkdir -p "$bdir"
mkfs.erofs --quiet -zlz4hc -T "${SOURCE_DATE_EPOCH:-$(date +%s)}" "$bdir/root.erofs" "$stage/root" >/dev/null
cp "$kernel" "$bdir/vmlinuz"; cp "$initrd" "$bdir/initrd.img"
member() { printf '"%s": {"size": %s, "sha256": "%s"}' "$1" "$(stat -c %s "$bdir/$1")" "$(sha256sum "$bdir/$1" | cut -d' ' -f1)"; }
cat > "$bdir/manifest.json" <<JSON
{"format": 1, "image_id": "novacron-edge", "version": "$version", "arch": "$arch",
 "files": {$(member root.erofs), $(member vmlinuz), $(member initrd.img)}}
JSON
# ustar, manifest first: `novacron update apply` streams it in this order.
tar --format=ustar --owner=0 --group=0 --numeric-owner -C "$bdir" -cf "$bundle" \
    manifest.json root.erofs vmlinuz initrd.img
(cd "$out" && sha256sum "$(basename "$bundle")" > "$(basename "$bundle").sha256")
rm -rf "$bdir"
if [ $bundle_only = 1 ]; then
    rm -rf "$stage"
    printf 'bundle:           %s (%s MiB)\nsha256:           %s\n' "$bundle" \
        "$(( $(stat -c %s "$bundle") / 1048576 ))" "$(cut -d' ' -f1 "$bundle.sha256")"
    exit 0
fi

# ---- 6. the raw image (systemd-repart, no loop devices) ---------------------
cp "$kernel" "$stage/esp/novacron/a/vmlinuz"
cp "$initrd" "$stage/esp/novacron/a/initrd.img"
cp "$r/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$stage/esp/EFI/BOOT/BOOTX64.EFI"
# No `default`: systemd-boot boots the first entry in its order, which puts
# entries whose boot attempts ran out last, then by `version` (our install
# generation) newest first. Slot B has no entry until an update writes it.
printf 'timeout 2\neditor no\n' > "$stage/esp/loader/loader.conf"
cat > "$stage/esp/loader/entries/novacron-a.conf" <<ENTRY
title      NovaCron Edge $version (slot A)
sort-key   novacron
version    1
linux      /novacron/a/vmlinuz
initrd     /novacron/a/initrd.img
options    $cmdline root=PARTLABEL=root-a
ENTRY
# An example seed for operators: copy seed.example/ to seed/ and edit.
mkdir -p "$stage/esp/seed.example/network"
"$bin" config default > "$stage/esp/seed.example/novacron.toml"
printf '# one SSH public key per line; SSH stays off without this file\n' > "$stage/esp/seed.example/authorized_keys"
cat > "$stage/esp/seed.example/network/10-lan.network" <<'NET'
# systemd.network(5). Without network files every wired NIC uses DHCP.
[Match]
Name=en*

[Network]
Address=192.168.1.20/24
Gateway=192.168.1.1
DNS=192.168.1.1
NET
img="$out/novacron-appliance-$version-$arch.raw"
rm -f "$img" "$img.zst"
log "systemd-repart -> $(basename "$img")"
systemd-repart --empty=create --size=auto --root="$stage" --definitions="$here/repart.d" \
    --offline=yes --dry-run=no --no-pager "$img" >"$out/repart.log" 2>&1 || { tail -n 30 "$out/repart.log" >&2; exit 1; }
log "zstd"
zstd -q -T0 "-${ZSTD_LEVEL:-12}" -k "$img" -o "$img.zst"
rm -rf "$stage"
log "done"
partx -s -o NR,START,SECTORS,SIZE,NAME "$img"
printf 'image:            %s\nraw size:         %s MiB (%s bytes)\ncompressed (zstd): %s MiB\npackages (ii):    %s\nbundle:           %s (%s MiB)\n' \
    "$img" "$(( $(stat -c %s "$img") / 1048576 ))" "$(stat -c %s "$img")" \
    "$(( $(stat -c %s "$img.zst") / 1048576 ))" "$pkgs" "$bundle" "$(( $(stat -c %s "$bundle") / 1048576 ))"
