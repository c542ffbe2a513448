#!/usr/bin/env bash
# Prepares a fresh Debian 12 host (as root) for running NovaCron Edge and its
# test suite: libvirt + QEMU from bookworm-backports, a tiny test guest, and
# running virtlogd/libvirtd when there is no systemd as PID 1.
set -euo pipefail

# From bookworm-backports. systemd too: the image build needs
# `systemd-repart --offline` (254) and libvirt 11's units use
# Type=notify-reload (253); bookworm itself has 252.
need_pkgs=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
           qemu-system-x86 qemu-utils systemd systemd-container)
base_pkgs=(pkg-config python3-venv python3-dev gcc busybox-static linux-image-amd64 cpio gzip iproute2 curl ca-certificates genisoimage
           prometheus iptables
           debootstrap zstd dosfstools mtools erofs-utils ovmf openssh-client)
# The lowest upstream version the tests work with, per package; checked
# after the install so an old package left on a machine is upgraded, and
# a mirror without backports fails here instead of deep inside a test.
declare -A min_version=([systemd]=254 [systemd-container]=254 [libvirt-daemon-system]=11
                        [qemu-system-x86]=1:10 [qemu-utils]=1:10)

# The mirror comes from the machine's own Debian source, never from this repo.
debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '/^URIs:/ {u=$2} /^Suites:/ && u && $0 ~ /bookworm/ && u !~ /security/ {print u; exit}' "$f" && return 0
    done
    awk '$1=="deb" && $3 ~ /^bookworm/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null
}

installed_version() {
    dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | awk '/install ok installed/ {print $4}'
}

# 0 when package $1 is installed at (at least) its minimum version.
package_ok() {
    local v
    v="$(installed_version "$1")"
    [ -n "$v" ] || return 1
    [ -z "${min_version[$1]:-}" ] || dpkg --compare-versions "$v" ge "${min_version[$1]}"
}

check_versions() {
    local p bad=0
    for p in "${need_pkgs[@]}" "${base_pkgs[@]}"; do
        package_ok "$p" && continue
        echo "setup: $p is $(installed_version "$p" || true), tests need >= ${min_version[$p]:-any}" >&2
        bad=1
    done
    [ "$bad" = 0 ] || exit 1
}

install_packages() {
    local missing=()
    for p in "${need_pkgs[@]}" "${base_pkgs[@]}"; do
        package_ok "$p" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        local mirror
        mirror="$(debian_mirror | head -n1)"
        [ -n "$mirror" ] || { echo "setup: cannot find the Debian mirror in the apt sources" >&2; exit 1; }
        cat > /etc/apt/sources.list.d/novacron-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${base_pkgs[@]}" >/dev/null
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${need_pkgs[@]}" >/dev/null
    check_versions
}

start_libvirt() {
    mkdir -p /run/libvirt
    # Without systemd as PID 1 nothing starts these for us.
    pgrep -x virtlogd >/dev/null || virtlogd -d
    if ! pgrep -x libvirtd >/dev/null; then
        libvirtd -d
    fi
    for _ in $(seq 1 50); do
        virsh -c qemu:///system version >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "setup: libvirtd did not come up" >&2
    exit 1
}

# The test venv, pinned: sushy-emulator (Redfish BMC emulator) for
# tests/firmware.rs with the libvirt bindings its BIOS resource needs
# (libvirt's in-process test driver), and schemathesis for
# tests/schemathesis.rs (its findings depend on its version).
pip_pins=(sushy-tools==2.2.0 libvirt-python==12.8.0 schemathesis==4.32.5)
install_venv() {
    local venv=/opt/novacron-test-venv have pin missing=()
    have="$("$venv/bin/pip" freeze 2>/dev/null || true)"
    for pin in "${pip_pins[@]}"; do
        grep -qixF "$pin" <<<"$have" || missing+=("$pin")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q "${pip_pins[@]}"
}

install_packages
check_versions
install_venv
start_libvirt
echo "setup: host ready ($(virsh -c qemu:///system version 2>/dev/null | awk '/Running hypervisor/ {print $3,$4}'))"
