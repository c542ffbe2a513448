#!/usr/bin/env bash
# Replicated-disk benchmark (issue 10; results in docs/performance.md,
# "Replicated disks"): guest write throughput and IOPS on seven paths side
# by side, the initial sync against a TLS 1.3 copy, async lag and the delta
# resync, planned move downtime. Two real daemons (release build) in network
# namespaces joined by veth links, qemu:///system, TCG guests with fio.
#
#   bash tests/bench/disk.sh            # as root, after tests/setup-host.sh
#
# What it runs is tests/bench/disk.rs (a plain program on the tests'
# harness, tests/common/pair.rs; `cargo test` never runs it). Knobs, all
# optional: BENCH_REPS=3, BENCH_SYNC_MIB=1024, BENCH_MOVES=4,
# BENCH_LAG_RATE=50 (MiB/s), BENCH_LAG_SECS=20, BENCH_ONLY=perf,sync,lag,move,
# BENCH_PATHS=local-qemu,ours-off,... (part 1's paths), BENCH_OUT=FILE (JSON),
# BENCH_B_FS=shared (node B on A's file system instead of its own).
# Isolation as for the tests: NOVACRON_TEST_PORT (API port; the TLS copy
# uses +8, the NBD export +9), NOVACRON_NETNS_PREFIX, NOVACRON_TEST_NET,
# NOVACRON_TEST_DIR, NOVACRON_GUEST_DIR (the guest, built with --bench).
# Every address is inside the two namespaces; nothing leaves the machine.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"

for tool in fio socat openssl qemu-storage-daemon qemu-system-x86_64 virsh; do
    command -v "$tool" >/dev/null || { echo "disk.sh: $tool is missing (apt-get install fio socat; tests/setup-host.sh)" >&2; exit 2; }
done
virsh -c qemu:///system version >/dev/null || { echo "disk.sh: libvirtd does not answer: bash tests/setup-host.sh" >&2; exit 2; }
export NOVACRON_TEST_DIR="${NOVACRON_TEST_DIR:-/var/tmp}"
mkdir -p "$NOVACRON_TEST_DIR"
load="$(cut -d' ' -f1 /proc/loadavg)"
echo "disk.sh: $(date -u +%FT%TZ), $(nproc) cores, load average $load (other work on the cores shows in the numbers)" >&2

# Node B on a file system of its own, as on a second host (the disk under
# it is still this machine's one disk): an ext4 image on a loop device with
# direct I/O, so the image's own page cache does not count twice.
# BENCH_B_FS=shared keeps B on A's file system (one journal for both).
if [ "${BENCH_B_FS:-own}" != shared ]; then
    bimg="$NOVACRON_TEST_DIR/ncbench-b-$$.img" bmnt="$NOVACRON_TEST_DIR/ncbench-b-$$"
    truncate -s 16G "$bimg"
    mkfs.ext4 -q -F "$bimg"
    bdev=$(losetup --direct-io=on -f --show "$bimg")
    mkdir -p "$bmnt"
    mount "$bdev" "$bmnt"
    chmod 755 "$bmnt"
    trap 'umount "$bmnt"; losetup -d "$bdev"; rm -rf "$bimg" "$bmnt"' EXIT
    export BENCH_B_DIR="$bmnt"
fi

start=$(date +%s)
cargo build --release --bin novacron
cargo test --release --test bench_disk
echo "disk.sh: $(( $(date +%s) - start )) s in all (with the build)" >&2
