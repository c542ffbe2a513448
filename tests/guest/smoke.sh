#!/usr/bin/env bash
# Boots the test guest from build-guest.sh under libvirt (qemu:///system, TCG)
# and checks it comes up, sees its virtio disk, and powers off on ACPI shutdown.
#
#   tests/guest/smoke.sh OUTDIR          # OUTDIR as given to build-guest.sh
#
# Optional:
#   SMOKE_NET=1    also attach a NIC on libvirt's 'default' NAT network and
#                  wait for NOVACRON-IP= (the network is started if needed)
#   SMOKE_CIDATA=1 also attach an ISO labelled cidata (needs genisoimage,
#                  mkisofs or xorriso) and wait for NOVACRON-CIDATA=
#   SMOKE_AS_ROOT=1 run this QEMU as root (per-domain DAC seclabel) for an
#                  OUTDIR that user libvirt-qemu cannot reach, e.g. under /root
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$1"
outdir="$(cd "$1" && pwd)"
uri=qemu:///system
dom=novacron-guest-smoke
marker="smoke$$"
log="$outdir/console.log"
disk="$outdir/smoke-disk.qcow2"
iso="$outdir/smoke-cidata.iso"
boot_timeout=60
shutdown_timeout=60

virsh_() { virsh -q -c "$uri" "$@"; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
# within T0 SECONDS: true while fewer than SECONDS have passed since T0.
within() { awk -v a="$1" -v b="$(now)" -v m="$2" 'BEGIN { exit !(b - a < m) }'; }

cleanup() {
    virsh_ destroy "$dom" >/dev/null 2>&1 || true
    virsh_ undefine "$dom" >/dev/null 2>&1 || true
    rm -f "$disk" "$iso"
}
fail() {
    echo "smoke: FAIL: $*" >&2
    echo "--- console.log (tail) ---" >&2
    tail -n 40 "$log" >&2 2>/dev/null || true
    exit 1
}
trap cleanup EXIT
cleanup   # a previous run killed hard may have left the domain behind

"$here/build-guest.sh" "$outdir"
rm -f "$log"
qemu-img create -q -f qcow2 "$disk" 64M

extra_devices=""
expect=(NOVACRON-GUEST-UP "NOVACRON-MARKER=$marker" NOVACRON-DISK=vda)
if [ "${SMOKE_CIDATA:-0}" = 1 ]; then
    mkiso="$(command -v genisoimage || command -v mkisofs || command -v xorrisofs || true)"
    [ -n "$mkiso" ] || fail "SMOKE_CIDATA=1 needs genisoimage, mkisofs or xorriso"
    src="$(mktemp -d)"
    printf '#cloud-config %s\n' "$marker" > "$src/user-data"
    printf 'instance-id: %s\n' "$dom" > "$src/meta-data"
    "$mkiso" -quiet -o "$iso" -V cidata -J -r "$src" 2>/dev/null
    rm -rf "$src"
    extra_devices+="<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='$iso'/><target dev='hdc' bus='ide'/><readonly/></disk>"
    expect+=("NOVACRON-CIDATA=#cloud-config $marker")
fi
if [ "${SMOKE_NET:-0}" = 1 ]; then
    [ "$(virsh_ net-info default | awk '/^Active:/ {print $2}')" = yes ] || virsh_ net-start default >/dev/null
    extra_devices+="<interface type='network'><source network='default'/><model type='virtio'/></interface>"
    expect+=(NOVACRON-IP=192.168.122.)
fi

seclabel=""
if [ "${SMOKE_AS_ROOT:-0}" = 1 ]; then
    # Per-domain override: no qemu.conf change or libvirtd restart needed.
    seclabel="<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
fi

# TCG ('qemu' type): nested KVM cannot run a Linux guest on the CI hosts.
xml="$(mktemp)"
cat > "$xml" <<EOF
<domain type='qemu'>
  <name>$dom</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$outdir/vmlinuz</kernel>
    <initrd>$outdir/initramfs.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet novacron.marker=$marker</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    $extra_devices
    <serial type='file'><source path='$log' append='on'/></serial>
    <!-- libvirt rejects <console type='serial'/>: the console must mirror the
         serial's host side and name target type 'serial' to alias it. -->
    <console type='file'><source path='$log' append='on'/><target type='serial' port='0'/></console>
  </devices>
  $seclabel
</domain>
EOF
virsh_ define "$xml" >/dev/null
rm -f "$xml"

t0="$(now)"
virsh_ start "$dom" >/dev/null
t_started="$(now)"
declare -A seen_at=()
while :; do
    missing=0
    for want in "${expect[@]}"; do
        [ -n "${seen_at[$want]:-}" ] && continue
        if grep -qF -- "$want" "$log" 2>/dev/null; then
            seen_at[$want]="$(now)"
        else
            missing=1
        fi
    done
    [ "$missing" = 0 ] && break
    within "$t0" "$boot_timeout" || \
        fail "timed out after ${boot_timeout}s waiting for: $(for w in "${expect[@]}"; do [ -n "${seen_at[$w]:-}" ] || printf '%s ' "$w"; done)"
    sleep 0.2
done

t_shut="$(now)"
virsh_ shutdown --mode acpi "$dom" >/dev/null
state=""
while within "$t_shut" "$shutdown_timeout"; do
    state="$(virsh_ domstate "$dom" 2>/dev/null || true)"
    [ "$state" = "shut off" ] && break
    sleep 0.2
done
[ "$state" = "shut off" ] || fail "domain still '$state' ${shutdown_timeout}s after ACPI shutdown"
t_off="$(now)"

echo "smoke: PASS"
echo "smoke: virsh start took $(elapsed "$t0" "$t_started")s"
for want in "${expect[@]}"; do
    echo "smoke: start -> ${want}: $(elapsed "$t0" "${seen_at[$want]}")s"
done
echo "smoke: ACPI shutdown -> shut off: $(elapsed "$t_shut" "$t_off")s"
