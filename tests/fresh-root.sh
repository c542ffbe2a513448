#!/usr/bin/env bash
# Proves tests/setup-host.sh on a fresh Debian 12 root instead of on a machine
# that has packages left from earlier work:
#
#   bash tests/fresh-root.sh [DIR]      (as root; DIR default /var/tmp/novacron-fresh-root)
#
# 1. debootstraps bookworm into DIR/root from the mirror in this machine's apt
#    sources (setup-host.sh's debian_mirror) and gives it this machine's
#    Debian sources without bookworm-backports, as on a new install;
# 2. runs tests/setup-host.sh, then tests/guest/build-guest.sh, inside
#    systemd-nspawn: own PID, mount, IPC and UTS namespaces, a private /dev
#    without /dev/kvm, read-only /sys, and no CAP_NET_ADMIN, so the
#    container's libvirtd cannot add bridges or firewall rules to the host's
#    network (which it shares, for the mirror and PyPI);
# 3. lists everything the tests and image/build.sh run, with the package it
#    came from, its version and its apt suite, and fails if one is missing,
#    below setup-host.sh's minimum, or from the wrong suite (setup-host.sh's
#    backports packages from bookworm-backports, everything else from
#    bookworm, -updates or -security); the same for the test venv's PyPI pins;
# 4. checks libvirt as far as a container allows (see below).
#
# Not part of tests/run.sh: it downloads ~1 GB and takes 10-20 minutes.
# What it does not prove: KVM, a guest booting under QEMU, libvirtd started by
# systemd as PID 1 (socket activation), NAT networks (no CAP_NET_ADMIN), the
# Rust toolchain (setup-host.sh does not install it), and that the tests pass.
# KEEP=1 keeps DIR/root for inspection; DIR/report.txt keeps the table.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
dir="$(realpath -m "${1:-/var/tmp/novacron-fresh-root}")"
root="$dir/root"
[ "$(id -u)" = 0 ] || { echo "fresh-root: run as root" >&2; exit 1; }
for t in debootstrap systemd-nspawn; do
    command -v "$t" >/dev/null || { echo "fresh-root: $t missing (bash tests/setup-host.sh)" >&2; exit 1; }
done
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock -n 9 || { echo "fresh-root: another run uses $dir" >&2; exit 1; }
t0=$(date +%s)
log() { echo "fresh-root: [$(( $(date +%s) - t0 ))s] $*" >&2; }
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -rf "$root"; }
trap cleanup EXIT

eval "$(sed -n '/^debian_mirror() {/,/^}/p' "$here/setup-host.sh")"
mirror="$(debian_mirror | head -n1)"
[ -n "$mirror" ] || { echo "fresh-root: no Debian mirror in the apt sources" >&2; exit 1; }

# ---- 1. a fresh bookworm root ------------------------------------------------
rm -rf "$root"
log "debootstrap bookworm (required + important, like a new install without tasks)"
debootstrap bookworm "$root" "$mirror" >"$dir/debootstrap.log" 2>&1 \
    || { tail -n 30 "$dir/debootstrap.log" >&2; exit 1; }
# This machine's Debian sources minus backports: adding backports is
# setup-host.sh's job.
rm -f "$root/etc/apt/sources.list"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed -E '/^Suites:/ s/ *bookworm-backports//' /etc/apt/sources.list.d/debian.sources \
        > "$root/etc/apt/sources.list.d/debian.sources"
else
    grep -v bookworm-backports /etc/apt/sources.list > "$root/etc/apt/sources.list"
fi
# This machine's network setup, as a new machine on the same network would
# have it: local CA certificates (a TLS-inspecting egress proxy) and pip's
# configuration that points at the system trust store.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
mkdir -p "$root/novacron/tests/guest" "$root/novacron/image"
cp "$here/setup-host.sh" "$root/novacron/tests/"
cp "$repo/image/build.sh" "$root/novacron/image/"
cp "$here/guest/build-guest.sh" "$root/novacron/tests/guest/"

# ---- 2 + 3 + 4. inside the container -----------------------------------------
# What the tests, the daemon they start and image/build.sh run: "user: thing",
# thing being a command on PATH or an absolute file (globs allowed).
cat > "$root/novacron/uses.txt" <<'USES'
daemon, tests: virsh
daemon, tests: libvirtd
daemon, tests: virtlogd
daemon, tests: qemu-system-x86_64
daemon, tests: qemu-img
daemon: qemu-io
daemon (cloud-init seed): genisoimage
libvirt NAT networks: dnsmasq
libvirt NAT networks: iptables
build (virt crate): pkg-config
build (virt crate): /usr/lib/x86_64-linux-gnu/pkgconfig/libvirt.pc
build, venv: gcc
venv (libvirt-python): /usr/include/python3.11/Python.h
venv: python3
build-guest.sh: busybox
build-guest.sh: cpio
build-guest.sh: gzip
build-guest.sh: /boot/vmlinuz-*
tests/systemd.rs: systemd-analyze
tests/systemd.rs: systemd-sysusers
tests/systemd.rs: systemd-tmpfiles
tests/image.rs: systemd-nspawn
tests/image.rs: journalctl
tests/image.rs: partx
tests/image.rs: mcopy
tests/image.rs: ssh
tests/image.rs: ssh-keygen
tests/image.rs: /usr/share/OVMF/OVMF_CODE_4M.fd
image/build.sh: debootstrap
image/build.sh: systemd-repart
image/build.sh: mkfs.erofs
image/build.sh: mkfs.vfat
image/build.sh: mkfs.ext4
image/build.sh: zstd
tests/monitoring.rs: promtool
tests: curl
tests: ip
tests/common/pair.rs: tc
tests/common/pair.rs: timeout
tests/common/pair.rs: bash
tests: pgrep
tests: tar
tests: sha256sum
USES

cat > "$root/novacron/check.sh" <<'CHECK'
set -euo pipefail
cd /novacron
# setup-host.sh's own lists: its backports packages and minimum versions.
# (from its first line to the line that closes the parenthesis, which may be the same)
defs() { awk -v s="$1" 'index($0, s) == 1 { p = 1 } p { print } p && /\)$/ { exit }' tests/setup-host.sh; }
eval "$(defs 'need_pkgs=(')"; eval "$(defs 'declare -A min_version=(')"; eval "$(defs 'pip_pins=(')"
is_bpo() { local p; for p in "${need_pkgs[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
# dpkg knows /bin and /usr/bin apart (usrmerge): try both spellings.
owner() {
    local f="$1" c
    for c in "$f" "$(readlink -f "$f")" "${f#/usr}" "/usr$f"; do
        dpkg-query -S "$c" 2>/dev/null | awk -F': ' 'NR==1 {print $1}' | grep . && return 0
    done
    return 1
}
# Suites the installed version of a package is available from.
suites() {
    apt-cache madison "$1" | awk -F'|' -v v="$2" '{ gsub(/ /, "", $2); split($3, a, " ") }
        $2 == v { sub(/\/.*/, "", a[2]); print a[2] }' | sort -u | paste -sd, -
}
bad=0
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@"; }
row USED-BY THING PACKAGE VERSION SUITE VERDICT
while IFS= read -r line; do
    user="${line%%: *}" thing="${line#*: }"
    if [ "${thing#/}" != "$thing" ]; then path="$(ls -d $thing 2>/dev/null | sort -V | tail -n1 || true)"
    else path="$(command -v "$thing" || true)"; fi
    [ -n "$path" ] || { row "$user" "$thing" - - - MISSING; bad=1; continue; }
    pkg="$(owner "$path" || true)"
    [ -n "$pkg" ] || { row "$user" "$thing" "(no package: $path)" - - NOT-FROM-APT; bad=1; continue; }
    pkg="${pkg%%:*}"; pkg="${pkg%%,*}"
    ver="$(dpkg-query -W -f='${Version}' "$pkg")"
    s="$(suites "$pkg" "$ver")"
    verdict=ok
    if is_bpo "$pkg"; then
        case ",$s," in *,bookworm-backports,*) ;; *) verdict="WRONG-SUITE (want bookworm-backports)" ;; esac
    else
        case "$s" in bookworm|bookworm-updates|bookworm-security|bookworm,*|bookworm-*,*) ;;
            bookworm-backports) verdict="ok (backports: a dependency of setup-host.sh's backports packages)" ;;
            *) verdict="WRONG-SUITE (want bookworm)" ;; esac
    fi
    min="${min_version[$pkg]:-}"
    if [ -n "$min" ] && ! dpkg --compare-versions "$ver" ge "$min"; then verdict="TOO-OLD (want >= $min)"; fi
    case "$verdict" in ok*) ;; *) bad=1 ;; esac
    row "$user" "$thing" "$pkg" "$ver" "${s:-none}" "$verdict"
done < uses.txt
# Every package setup-host.sh installs from backports, also those no command above names.
for pkg in "${need_pkgs[@]}"; do
    ver="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null || true)"
    s="$(suites "$pkg" "$ver")"; verdict=ok
    case ",$s," in *,bookworm-backports,*) ;; *) verdict="WRONG-SUITE (want bookworm-backports)"; bad=1 ;; esac
    min="${min_version[$pkg]:-}"
    if [ -z "$ver" ]; then verdict=MISSING; bad=1
    elif [ -n "$min" ] && ! dpkg --compare-versions "$ver" ge "$min"; then verdict="TOO-OLD (want >= $min)"; bad=1; fi
    row "setup-host.sh need_pkgs" "$pkg" "$pkg" "${ver:--}" "${s:-none}" "$verdict"
done
# The test venv's PyPI packages against setup-host.sh's pins.
for pin in "${pip_pins[@]}"; do
    name="${pin%%==*}" want="${pin#*==}"
    got="$(/opt/novacron-test-venv/bin/pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')"
    verdict=ok; [ "$got" = "$want" ] || { verdict="WRONG (want $want)"; bad=1; }
    row "venv /opt/novacron-test-venv" "$name" "PyPI $name" "${got:--}" PyPI "$verdict"
done
exit $bad
CHECK

cat > "$root/novacron/libvirt.sh" <<'LV'
# What a container can show of libvirt (setup-host.sh has started libvirtd
# and virtlogd here, as it does on a host without systemd as PID 1).
set -uo pipefail
bad=0
check() {
    local what="$1"; shift
    if out="$("$@" 2>&1)"; then printf 'ok    %s: %s\n' "$what" "$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-110)"
    else printf 'FAIL  %s: %s\n' "$what" "$(printf '%s' "$out" | tail -n3 | tr '\n' ' ')"; bad=1; fi
}
check "libvirtd --version" libvirtd --version
check "virsh -c test:///default list --all (the fast tests' driver)" virsh -c test:///default list --all --name
check "virsh -c qemu:///system version (the container's libvirtd)" virsh -c qemu:///system version
check "qemu:///system domcapabilities: TCG guest" sh -c 'virsh -c qemu:///system domcapabilities --virttype qemu --arch x86_64 | grep -m1 -o "<domain>qemu</domain>"'
check "qemu-img create + info" sh -c 'qemu-img create -q -f qcow2 /tmp/t.qcow2 16M && qemu-img info --output=json /tmp/t.qcow2 | grep -m1 qcow2'
# libvirt 11's units need systemd >= 253 (Type=notify-reload).
check "systemd-analyze verify libvirtd.service virtlogd.service" sh -c \
    'o="$(systemd-analyze verify /lib/systemd/system/libvirtd.service /lib/systemd/system/virtlogd.service 2>&1)"; printf "%s\n" "$o"; ! printf "%s" "$o" | grep -q "Failed to parse"'
check "systemd-repart knows --offline (254)" sh -c 'systemd-repart --help | grep -m1 -- --offline'
check "guest built by build-guest.sh" sh -c 'ls -l /var/tmp/novacron-guest/vmlinuz /var/tmp/novacron-guest/initramfs.gz | awk "{print \$5, \$9}"'
check "sushy-emulator + libvirt-python in the venv" /opt/novacron-test-venv/bin/python -c 'import libvirt, sushy_tools; print(libvirt.getVersion())'
check "schemathesis in the venv" /opt/novacron-test-venv/bin/schemathesis --version
exit $bad
LV

cat > "$root/novacron/run.sh" <<'RUN'
set -uo pipefail
t0=$(date +%s)
phase() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
# image/build.sh must refuse bookworm's own systemd (252) before it starts
# work, and accept the host once setup-host.sh ran.
phase "image/build.sh --check on the bare root (must fail)"
NOVACRON_BIN=/bin/true bash /novacron/image/build.sh --check; pre=$?
echo "image/build.sh --check before setup-host.sh: exit $pre"
if command -v update-ca-certificates >/dev/null; then update-ca-certificates >/dev/null 2>&1; fi
phase "bash tests/setup-host.sh"
bash /novacron/tests/setup-host.sh; rc=$?
echo "setup-host.sh exit $rc"
echo "setup-host.sh seconds $(( $(date +%s) - t0 ))"
phase "image/build.sh --check after setup-host.sh (must pass)"
NOVACRON_BIN=/bin/true bash /novacron/image/build.sh --check; post=$?
phase "bash tests/guest/build-guest.sh /var/tmp/novacron-guest"
bash /novacron/tests/guest/build-guest.sh /var/tmp/novacron-guest >/dev/null; g=$?
phase "packages"
bash /novacron/check.sh > /novacron/table.tsv; c=$?
phase "libvirt"
bash /novacron/libvirt.sh > /novacron/libvirt.txt; l=$?
phase "done"
[ $pre != 0 ] && [ $post = 0 ] && [ $rc = 0 ] && [ $g = 0 ] && [ $c = 0 ] && [ $l = 0 ]
RUN

log "setup-host.sh in systemd-nspawn (log: $dir/container.log)"
rc=0
systemd-nspawn --quiet --register=no --keep-unit -D "$root" \
    --machine="novacron-fresh-$$" --setenv=DEBIAN_FRONTEND=noninteractive \
    bash /novacron/run.sh >"$dir/container.log" 2>&1 </dev/null || rc=$?
setup_s="$(awk '/^setup-host.sh seconds/ {print $3}' "$dir/container.log")"
{
    echo "fresh bookworm root, $(date -u +%Y-%m-%dT%H:%MZ); setup-host.sh took ${setup_s:-?} s, everything $(( $(date +%s) - t0 )) s"
    echo "host load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    if [ -s "$root/novacron/table.tsv" ]; then column -t -s $'\t' "$root/novacron/table.tsv"; fi
    echo
    cat "$root/novacron/libvirt.txt" 2>/dev/null || true
} | tee "$dir/report.txt"
if [ "$rc" != 0 ]; then
    echo "fresh-root: FAILED (container exit $rc); last lines of $dir/container.log:" >&2
    tail -n 25 "$dir/container.log" >&2
    exit 1
fi
log "passed; report in $dir/report.txt"
