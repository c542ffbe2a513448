#!/usr/bin/env bash
# The cost of being paired: RssAnon and CPU of two idle daemons, one of
# them owning 100 VMs that the other holds as replicas.
#
#   tests/bench/pair-idle.sh            # release binary, 100 VMs, 60 s idle
#
# Knobs: NOVACRON_BIN (default target/release/novacron), NVMS=100,
# IDLE_SECS=60, WORK=/var/tmp/ncpair-bench. Both daemons run on libvirt's
# test driver on loopback only: A on 127.0.0.8, B on 127.0.0.9 (API 8443,
# peer link 8444), so the script can run beside tests/bench/run.sh.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
NC="${NOVACRON_BIN:-$repo/target/release/novacron}"
NVMS="${NVMS:-100}"
IDLE_SECS="${IDLE_SECS:-60}"
WORK="${WORK:-/var/tmp/ncpair-bench}"
[ -x "$NC" ] || { echo "no binary at $NC: cargo build --release --bin novacron" >&2; exit 2; }

log() { printf '[pair-idle %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

rm -rf "$WORK"
start() { # NAME ADDR -> pid in $started
    local name="$1" addr="$2" dir="$WORK/$1"
    mkdir -p "$dir"
    cat > "$dir/novacron.toml" <<EOF
data_dir = "$dir/data"

[api]
listen = ["$addr:8443"]
rate_limit_per_sec = 0

[hypervisor]
uri = "test:///default"
domain_type = "qemu"

[cluster]
listen = ["$addr:8444"]

[log]
level = "info"
target = "stderr"
EOF
    "$NC" serve --config "$dir/novacron.toml" --socket-path "$dir/sock" >> "$dir/out" 2>&1 &
    started=$!
    pids+=("$started")
    for _ in $(seq 300); do
        curl -sf -o /dev/null --unix-socket "$dir/sock" http://x/v1/ready && return 0
        sleep 0.1
    done
    echo "$name not ready: $(tail -3 "$dir/out")" >&2
    exit 1
}
on() { local n="$1"; shift; "$NC" --socket "$WORK/$n/sock" "$@"; }
# Idle for IDLE_SECS; prints "RssAnon_kB cpu_ms" of PID.
idle() {
    local t0; t0="$(ticks "$1")"
    sleep "$IDLE_SECS"
    echo "$(kb "$1" RssAnon) $(( ($(ticks "$1") - t0) * 1000 / $(getconf CLK_TCK) ))"
}

start a 127.0.0.8; A=$started
start b 127.0.0.9; B=$started
for i in $(seq "$NVMS"); do on a vm create --name "vm-$i" --memory 64 --disk 1 >/dev/null; done
log "A owns $NVMS VMs; idle ${IDLE_SECS}s unpaired"
read -r a_rss0 a_cpu0 < <(idle "$A")
read -r b_rss0 b_cpu0 < <(idle "$B")

code="$(on a peer invite 2>/dev/null)"
on b peer join "$code" >/dev/null
for _ in $(seq 300); do
    n="$(curl -sf --unix-socket "$WORK/b/sock" http://x/v1/vms | jq '[.vms[] | select(.name | startswith("vm-"))] | length')"
    up="$(curl -sf --unix-socket "$WORK/a/sock" http://x/v1/peer | jq -r '.link.state')"
    [ "$n" = "$NVMS" ] && [ "$up" = up ] && break
    sleep 0.1
done
[ "$n" = "$NVMS" ] || { echo "B holds $n of A's $NVMS VMs" >&2; exit 1; }
log "paired, B holds A's $NVMS VMs; link $up; idle ${IDLE_SECS}s paired"
read -r a_rss1 a_cpu1 < <(idle "$A")
read -r b_rss1 b_cpu1 < <(idle "$B")
rtt="$(curl -sf --unix-socket "$WORK/a/sock" http://x/v1/peer | jq -r '.link.rtt_ms * 1000 | round / 1000')"

printf '%-34s %14s %14s\n' "" "unpaired" "paired"
printf '%-34s %14s %14s\n' "A (owns $NVMS VMs) RssAnon kB" "$a_rss0" "$a_rss1"
printf '%-34s %14s %14s\n' "A CPU ms per ${IDLE_SECS}s idle" "$a_cpu0" "$a_cpu1"
printf '%-34s %14s %14s\n' "B (holds the replicas) RssAnon kB" "$b_rss0" "$b_rss1"
printf '%-34s %14s %14s\n' "B CPU ms per ${IDLE_SECS}s idle" "$b_cpu0" "$b_cpu1"
printf '%-34s %14s\n' "heartbeat RTT (A's view) ms" "$rtt"
