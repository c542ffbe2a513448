#!/usr/bin/env bash
# NovaCron Edge benchmark: API throughput/latency, idle footprint, startup
# time and VM start latency, compared with Incus on the same machine; then
# provisioning: image upload throughput, VM creation from an image (overlay)
# and the console WebSocket's round trip to a real guest.
#
#   tests/bench/run.sh                    # everything (takes ~6-10 minutes)
#   ONLY_PROVISION=1 tests/bench/run.sh   # only the provisioning section
#
# Environment knobs:
#   NOVACRON_BIN=PATH   daemon binary (default: target/release/novacron, else
#                       /tmp/novacron-bench/novacron)
#   DURATION=10         seconds per load run
#   NVMS=100            VMs created for the API and footprint runs
#   SKIP_INCUS=1        skip the Incus comparison
#   SKIP_QEMU=1         skip the real-guest VM start comparison (and the
#                       qemu:///system parts of the provisioning section)
#   SKIP_PROVISION=1    skip the provisioning section (upload, create, console)
#   ONLY_PROVISION=1    run only the provisioning section (no oha needed)
#   UPLOAD_MIB=1024     size of the random-data file used for the upload runs
#   SKIP_BASELINE=1     skip the limit: the bare hyper + rustls server
#                       (tests/bench/baseline.rs) loaded like our daemon
#   BASELINE_ROUNDS=3   rounds of ours/baseline in turns; BASELINE_DURATION=5 s each
#   BASELINE_BIN=PATH   prebuilt baseline (default: cargo build --release --example baseline)
#   INCUS_CLEAN=1       delete the Incus benchmark instances at the end (they
#                       are kept by default so a re-run need not recreate them)
#   RESULTS=DIR         where raw results go (default /tmp/ncbench-results)
#
# Needs (as root): oha (`cargo install oha --locked`: a benchmark tool, not
# a test dependency, so tests/setup-host.sh does not install it), curl, jq, openssl,
# python3, virsh + a running libvirtd (tests/setup-host.sh), qemu-img, and for
# the comparison the Debian package incus from bookworm-backports. The console
# benchmark installs the PyPI package websockets into a venv in
# /tmp/ncbench-venv (kept, like the guest build in /tmp/ncguest, for re-runs).
#
# All load goes to loopback addresses only: 127.0.0.2 (our daemon, test
# driver), 127.0.0.4 (our daemon, qemu:///system) and 127.0.0.3 inside a
# private network namespace that holds incusd (so incusd has no route off the
# machine either); the provisioning section uses 127.0.0.5 (test driver) and
# 127.0.0.6 (qemu:///system); the baseline server listens on 127.0.0.7. Every load run is bounded by time or request count.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

DURATION="${DURATION:-10}"
NVMS="${NVMS:-100}"
RESULTS="${RESULTS:-/tmp/ncbench-results}"
SKIP_INCUS="${SKIP_INCUS:-0}"
SKIP_QEMU="${SKIP_QEMU:-0}"
SKIP_PROVISION="${SKIP_PROVISION:-0}"
ONLY_PROVISION="${ONLY_PROVISION:-0}"
SKIP_BASELINE="${SKIP_BASELINE:-0}"
BASELINE_ROUNDS="${BASELINE_ROUNDS:-3}"
BASELINE_DURATION="${BASELINE_DURATION:-5}"
UPLOAD_MIB="${UPLOAD_MIB:-1024}"
if [ "$ONLY_PROVISION" = 1 ]; then
    [ "$SKIP_PROVISION" = 1 ] && { echo "bench: ONLY_PROVISION=1 and SKIP_PROVISION=1 leave nothing to run" >&2; exit 2; }
    SKIP_INCUS=1
fi
# Phase 3 (VM start) runs unless SKIP_QEMU=1 or only provisioning was asked for.
RUN_START=1; { [ "$SKIP_QEMU" = 1 ] || [ "$ONLY_PROVISION" = 1 ]; } && RUN_START=0

# Our daemon, test driver.
T_DIR=/tmp/ncbench
T_ADDR=127.0.0.2:8443
T_CONF=/tmp/ncbench.toml
T_SOCK="$T_DIR/novacron.sock"
# Our daemon, qemu:///system (must be readable by libvirt-qemu: not /root, not /tmp private).
Q_DIR=/var/tmp/ncbench-qemu
Q_ADDR=127.0.0.4:8443
Q_CONF=/var/tmp/ncbench-qemu.toml
Q_SOCK="$Q_DIR/novacron.sock"
Q_VM=ncbench-guest
# The baseline server (tests/bench/baseline.rs).
B_ADDR=127.0.0.7:8443
GUEST_SRC=/tmp/ncguest
# Incus, inside its own network namespace.
I_NS=ncbench-incus
I_ADDR=127.0.0.3:8443
I_CERTS=/var/tmp/ncbench-incus-client
I_PREFIX=ncb
# Provisioning section: a test-driver daemon (uploads, creates) and a
# qemu:///system daemon (creates that define real domains, the console).
P_T_DIR=/var/tmp/ncbench-prov-test
P_T_ADDR=127.0.0.5:8443
P_T_CONF=/var/tmp/ncbench-prov-test.toml
P_T_SOCK="$P_T_DIR/novacron.sock"
P_Q_DIR=/var/tmp/ncbench-prov-qemu
P_Q_ADDR=127.0.0.6:8443
P_Q_CONF=/var/tmp/ncbench-prov-qemu.toml
P_Q_SOCK="$P_Q_DIR/novacron.sock"
P_WORK=/var/tmp/ncbench-prov-work       # upload file, base.qcow2, dd target
P_PREFIX=ncbench-prov-                  # every VM/domain this section makes
P_CON_VM=ncbench-prov-console
VENV=/tmp/ncbench-venv

BIN="${NOVACRON_BIN:-}"
if [ -z "$BIN" ]; then
    if [ -x "$repo/target/release/novacron" ]; then BIN="$repo/target/release/novacron"
    elif [ -x /tmp/novacron-bench/novacron ]; then BIN=/tmp/novacron-bench/novacron
    else echo "bench: build first: cargo build --release" >&2; exit 1; fi
fi
# Work on a private copy so a concurrent rebuild cannot swap the binary mid-run.
mkdir -p "$RESULTS"
cp -f "$BIN" "$RESULTS/novacron"
NC="$RESULTS/novacron"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# From a subshell (e.g. inside < <(...)) also stop the main script.
die() { log "ERROR: $*"; [ "$BASHPID" = "$$" ] || kill -TERM "$$"; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "missing tool: $1 ($2)"; }
need curl "apt-get install curl"
need jq "apt-get install jq"
need openssl "apt-get install openssl"
need python3 "apt-get install python3"
OHA="$(command -v oha || true)"
[ -n "$OHA" ] || { [ -x "$HOME/.cargo/bin/oha" ] && OHA="$HOME/.cargo/bin/oha"; } || true
if [ "$ONLY_PROVISION" != 1 ]; then
    [ -n "$OHA" ] || die "missing oha: cargo install oha --locked"
fi
PY=/usr/bin/python3; [ -x "$PY" ] || PY="$(command -v python3)"

# ---------------------------------------------------------------- cleanup
T_PID=""; Q_PID=""; I_PID=""; P_T_PID=""; P_Q_PID=""; B_PID=""
stop_pid() {
    local pid="$1" i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}
# The provisioning section's leftovers: its daemons, every domain named
# $P_PREFIX* (also after an interrupted run), its data dirs and files.
prov_cleanup() {
    local d
    stop_pid "$P_T_PID"; stop_pid "$P_Q_PID"; P_T_PID=""; P_Q_PID=""
    if command -v virsh >/dev/null 2>&1; then
        for d in $( { timeout 30 virsh -c qemu:///system list --all --name 2>/dev/null | grep "^$P_PREFIX"; echo "$P_CON_VM"; } | sort -u); do
            timeout 30 virsh -c qemu:///system domstate "$d" >/dev/null 2>&1 || continue
            timeout 30 virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true   # (shut off: nothing to do)
            timeout 30 virsh -c qemu:///system undefine "$d" >/dev/null 2>&1 || true
            if timeout 30 virsh -c qemu:///system domstate "$d" >/dev/null 2>&1; then
                log "WARNING: could not remove domain $d: virsh -c qemu:///system destroy/undefine $d"
            fi
        done
    fi
    # Keep the daemons' logs and the guests' console logs with the results.
    for d in "$P_T_DIR" "$P_Q_DIR"; do
        [ -d "$d" ] || continue
        mkdir -p "$RESULTS/prov_logs/$(basename "$d")"
        cp -f "$d"/*.out "$d"/logs/*.log "$RESULTS/prov_logs/$(basename "$d")/" 2>/dev/null || true
    done
    rm -rf "$P_T_DIR" "$P_Q_DIR" "$P_WORK" "$P_T_CONF" "$P_Q_CONF"
}
cleanup() {
    local rc=$?
    set +e
    if [ -n "$Q_PID" ] && kill -0 "$Q_PID" 2>/dev/null; then
        "$NC" --socket "$Q_SOCK" vm delete "$Q_VM" --force >/dev/null 2>&1
    fi
    virsh -c qemu:///system destroy "$Q_VM" >/dev/null 2>&1
    virsh -c qemu:///system undefine "$Q_VM" >/dev/null 2>&1
    stop_pid "$T_PID"; stop_pid "$Q_PID"; stop_pid "$I_PID"; stop_pid "$B_PID"
    ip netns del "$I_NS" 2>/dev/null
    prov_cleanup
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
ms() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.1f", (e - s) * 1000 }'; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.1f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
rss() { echo "VmRSS=$(status_kb "$1" VmRSS)kB RssAnon=$(status_kb "$1" RssAnon)kB"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

OHA_PRE=()   # command prefix for oha (ip netns exec NS for Incus)
# oha LABEL ARGS... -> $RESULTS/LABEL.json; prints "rps p50_ms p99_ms ok_ratio"
run_oha() {
    local label="$1"; shift
    "${OHA_PRE[@]}" "$OHA" --no-tui --output-format json --http-version 1.1 --insecure "$@" > "$RESULTS/$label.json" \
        2> "$RESULTS/$label.err" || die "oha failed ($label): $(tail -3 "$RESULTS/$label.err")"
    jq -r '[.summary.requestsPerSec, (.latencyPercentiles.p50 * 1000), (.latencyPercentiles.p99 * 1000),
            .summary.successRate, ((.statusCodeDistribution // {}) | tostring)] |
           "\(.[0]|floor) \(.[1]*1000|round/1000) \(.[2]*1000|round/1000) \(.[3]) \(.[4])"' "$RESULTS/$label.json"
}

# Starts our daemon: start_daemon CONF LISTEN SOCKET OUTFILE -> sets $started_pid
start_daemon() {
    local conf="$1" listen="$2" sock="$3" out="$4"
    NOVACRON_PRINT_TOKEN=1 "$NC" serve --config "$conf" --listen "$listen" --socket-path "$sock" \
        > "$out" 2>&1 &
    started_pid=$!
    local i
    for i in $(seq 1 300); do
        if curl -s -o /dev/null -w '%{http_code}' --unix-socket "$sock" http://x/v1/ready 2>/dev/null | grep -q 200; then
            return 0
        fi
        kill -0 "$started_pid" 2>/dev/null || die "daemon exited: $(tail -5 "$out")"
        sleep 0.1
    done
    die "daemon not ready after 30 s: $(tail -5 "$out")"
}

declare -A R=()   # results

log "binary: $BIN ($(stat -c %s "$BIN") bytes); oha: $([ -n "$OHA" ] && "$OHA" --version); load avg before: $(loadavg)"
if awk '{ exit !($1 > 0.5) }' /proc/loadavg; then
    log "WARNING: the machine is not idle (load avg $(loadavg)): throughput numbers will be low;"
    log "         see docs/performance.md. Top CPU users now:"
    ps -eo pcpu,comm --sort=-pcpu | sed -n 2,4p >&2
fi
R[bin_bytes]="$(stat -c %s "$BIN")"
R[date]="$(date -u +%Y-%m-%dT%H:%MZ)"
R[cpu]="$(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"

# ======================================================= 1. our API, test driver
# (Phase 1 and the startup runs: skipped with ONLY_PROVISION=1.)
if [ "$ONLY_PROVISION" != 1 ]; then
log "phase 1: our daemon on test:///default with $NVMS VMs"
rm -rf "$T_DIR" "$T_CONF"
mkdir -p "$T_DIR"
cat > "$T_CONF" <<EOF
data_dir = "$T_DIR"

[api]
rate_limit_per_sec = 0

[hypervisor]
uri = "test:///default"
domain_type = "qemu"

[log]
level = "info"
target = "stderr"
EOF
start_daemon "$T_CONF" "$T_ADDR" "$T_SOCK" "$T_DIR/first.out"
T_PID=$started_pid
TOKEN="$(awk '/admin token:/ { print $3 }' "$T_DIR/first.out")"
[ -n "$TOKEN" ] || die "no admin token in $T_DIR/first.out"
t0=$EPOCHREALTIME
for i in $(seq 1 "$NVMS"); do
    "$NC" --socket "$T_SOCK" vm create --name "vm-$i" --memory 64 --disk 1 >/dev/null
done
R[create_each_ms]="$(awk -v s="$t0" -v e="$EPOCHREALTIME" -v n="$NVMS" 'BEGIN { printf "%.1f", (e - s) * 1000 / n }')"
# The test driver has one built-in domain of its own ("test", unmanaged).
n="$(curl -sf --unix-socket "$T_SOCK" http://x/v1/vms | jq '[.vms[] | select(.managed)] | length')"
[ "$n" = "$NVMS" ] || die "expected $NVMS managed VMs, the API lists $n"
R[list_n]="$(curl -sf --unix-socket "$T_SOCK" http://x/v1/vms | jq '.vms | length')"
R[list_bytes]="$(curl -sf -k -H "Authorization: Bearer $TOKEN" "https://$T_ADDR/v1/vms" | wc -c)"

# Fresh process with the VMs already in the store: the idle footprint.
stop_pid "$T_PID"
start_daemon "$T_CONF" "$T_ADDR" "$T_SOCK" "$T_DIR/serve.out"
T_PID=$started_pid
sleep 2
R[rss_start]="$(rss "$T_PID")"
log "idle after start: ${R[rss_start]}"

AUTH=(-H "Authorization: Bearer $TOKEN")
URL="https://$T_ADDR/v1/vms"
# Short warm-up (also checks the token works: 100% 200s expected).
run_oha ours_warmup -n 2000 -c 8 "${AUTH[@]}" "$URL" >/dev/null
jq -e '.statusCodeDistribution == {"200": 2000}' "$RESULTS/ours_warmup.json" >/dev/null \
    || die "warm-up got non-200 answers: $(jq -c .statusCodeDistribution "$RESULTS/ours_warmup.json")"
log "load: 64 connections, ${DURATION}s (load avg $(loadavg))"
read -r R[o64_rps] R[o64_p50] R[o64_p99] R[o64_ok] R[o64_codes] < <(run_oha ours_c64 -z "${DURATION}s" -c 64 "${AUTH[@]}" "$URL")
log "load: 1 connection, ${DURATION}s"
read -r R[o1_rps] R[o1_p50] R[o1_p99] R[o1_ok] R[o1_codes] < <(run_oha ours_c1 -z "${DURATION}s" -c 1 "${AUTH[@]}" "$URL")
R[rss_after_load]="$(rss "$T_PID")"
log "load: exactly 100000 requests, 16 connections"
read -r R[o100k_rps] _ _ R[o100k_ok] _ < <(run_oha ours_100k -n 100000 -c 16 "${AUTH[@]}" "$URL")
sleep 2
R[rss_after_100k]="$(rss "$T_PID")"
read -r _ _ _ _ _ < <(run_oha ours_100k_b -n 100000 -c 16 "${AUTH[@]}" "$URL")
sleep 2
R[rss_after_200k]="$(rss "$T_PID")"
# Cost breakdown (shorter runs): the same list without TLS (local socket, root
# so no token), and a tiny anonymous answer over HTTPS (no auth, 30 bytes).
BD="${BREAKDOWN_DURATION:-5}"
log "breakdown: local socket 64c/1c, /v1/health over HTTPS 64c, ${BD}s each"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
read -r R[s64_rps] R[s64_p50] R[s64_p99] _ _ < <(run_oha ours_sock_c64 -z "${BD}s" -c 64 --unix-socket "$T_SOCK" http://x/v1/vms)
read -r R[s1_rps] R[s1_p50] R[s1_p99] _ _ < <(run_oha ours_sock_c1 -z "${BD}s" -c 1 --unix-socket "$T_SOCK" http://x/v1/vms)
read -r R[h64_rps] R[h64_p50] R[h64_p99] _ _ < <(run_oha ours_health_c64 -z "${BD}s" -c 64 "https://$T_ADDR/v1/health")
read -r R[h1_rps] R[h1_p50] R[h1_p99] _ _ < <(run_oha ours_health_c1 -z "${BD}s" -c 1 "https://$T_ADDR/v1/health")
# Daemon CPU per request: utime+stime over a fixed 50k-request HTTPS run.
c0="$(cpu_ticks "$T_PID")"
run_oha ours_cpu -n 50000 -c 64 "${AUTH[@]}" "$URL" >/dev/null
c1="$(cpu_ticks "$T_PID")"
R[cpu_us_per_req]="$(awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) / hz * 1e6 / 50000 }')"
R[oha_cpu_share]="$(jq -r '.summary.total' "$RESULTS/ours_cpu.json" | awk -v a="$c0" -v b="$c1" -v hz="$(getconf CLK_TCK)" '{ printf "%.0f%%", (b - a) / hz / ($1 * 2) * 100 }')"
log "footprint: start ${R[rss_start]} / after ${DURATION}s runs ${R[rss_after_load]} / +100k ${R[rss_after_100k]} / +200k ${R[rss_after_200k]}"

# ------------------------------------------------ the limit: a bare hyper + rustls server
# tests/bench/baseline.rs (same crates, Cargo.lock and TLS setup as the daemon)
# serves the body our daemon just answered, from memory, on $B_ADDR. The two
# are loaded in turns, BASELINE_ROUNDS times, so drift on a shared machine
# hits both alike; the ratios are of the medians, the spread is min-max.
if [ "$SKIP_BASELINE" != 1 ]; then
    curl -sf -k "${AUTH[@]}" -o "$RESULTS/vms_body.json" "$URL" || die "could not fetch $URL for the baseline"
    B_BIN="${BASELINE_BIN:-$repo/target/release/examples/baseline}"
    if [ -z "${BASELINE_BIN:-}" ]; then
        log "cargo build --release --example baseline"
        (cd "$repo" && cargo build --release --locked --quiet --example baseline) || die "baseline build failed"
    fi
    cp -f "$B_BIN" "$RESULTS/baseline"
    rm -rf "$RESULTS/baseline-tls"
    "$RESULTS/baseline" "$B_ADDR" "$RESULTS/vms_body.json" "$RESULTS/baseline-tls" > "$RESULTS/baseline.out" 2>&1 &
    B_PID=$!
    for i in $(seq 1 100); do
        curl -sfk -o /dev/null "https://$B_ADDR/v1/vms" && break
        kill -0 "$B_PID" 2>/dev/null || die "baseline exited: $(tail -3 "$RESULTS/baseline.out")"
        sleep 0.1
    done
    BURL="https://$B_ADDR/v1/vms"
    cmp -s <(curl -sfk "$BURL") "$RESULTS/vms_body.json" || die "the baseline does not serve our body"
    run_oha base_warmup -n 2000 -c 8 "${AUTH[@]}" "$BURL" >/dev/null
    R[b_load]="$(loadavg)"
    b_o64=(); b_b64=(); b_o1=(); b_b1=(); b_r64=(); b_r1=()
    for round in $(seq 1 "$BASELINE_ROUNDS"); do
        log "limit round $round/$BASELINE_ROUNDS: ours and baseline, 64c then 1c, ${BASELINE_DURATION}s each (load avg $(loadavg))"
        read -r o _ _ _ _ < <(run_oha "lim_ours_c64_$round" -z "${BASELINE_DURATION}s" -c 64 "${AUTH[@]}" "$URL")
        read -r b _ _ _ _ < <(run_oha "lim_base_c64_$round" -z "${BASELINE_DURATION}s" -c 64 "${AUTH[@]}" "$BURL")
        b_o64+=("$o"); b_b64+=("$b"); b_r64+=("$(ratio "$o" "$b")")
        read -r _ _ o _ _ < <(run_oha "lim_ours_c1_$round" -z "${BASELINE_DURATION}s" -c 1 "${AUTH[@]}" "$URL")
        read -r _ _ b _ _ < <(run_oha "lim_base_c1_$round" -z "${BASELINE_DURATION}s" -c 1 "${AUTH[@]}" "$BURL")
        b_o1+=("$o"); b_b1+=("$b"); b_r1+=("$(ratio "$o" "$b")")
    done
    spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
    for k in o64 b64 o1 b1 r64 r1; do
        eval "vals=(\"\${b_$k[@]}\")"
        R[lim_$k]="$(printf '%s\n' "${vals[@]}" | median)"; R[lim_${k}_spread]="$(spread "${vals[@]}")"
        R[lim_${k}_runs]="${vals[*]}"
    done
    R[lim_tput]="$(ratio "${R[lim_o64]}" "${R[lim_b64]}")"; R[lim_p99]="$(ratio "${R[lim_o1]}" "${R[lim_b1]}")"
    log "limit: 64c req/s ours ${R[lim_o64]} / baseline ${R[lim_b64]} = ${R[lim_tput]} (rounds ${R[lim_r64_runs]}); 1c p99 ms ours ${R[lim_o1]} / baseline ${R[lim_b1]} = ${R[lim_p99]} (rounds ${R[lim_r1_runs]})"
    stop_pid "$B_PID"; B_PID=""
fi
stop_pid "$T_PID"; T_PID=""

# ------------------------------------------------ startup time (exec -> ready)
log "startup: exec -> /v1/ready 200 over the local socket, 5 starts"
startups=()
for run in 1 2 3 4 5; do
    v="$("$PY" - "$NC" "$T_CONF" "$T_ADDR" "$T_SOCK" "$T_DIR/start-$run.out" <<'PY'
import os, socket, subprocess, sys, time
nc, conf, addr, sock, out = sys.argv[1:]
try: os.unlink(sock)
except FileNotFoundError: pass
req = b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
with open(out, "wb") as f:
    t0 = time.perf_counter()
    p = subprocess.Popen([nc, "serve", "--config", conf, "--listen", addr, "--socket-path", sock],
                         stdout=f, stderr=subprocess.STDOUT)
    deadline = t0 + 30
    while time.perf_counter() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(sock); s.sendall(req)
            head = s.recv(64); s.close()
            if head.startswith(b"HTTP/1.1 200"):
                break
        except OSError:
            pass
        time.sleep(0.0005)
    dt = (time.perf_counter() - t0) * 1000
    p.terminate(); p.wait(30)
print("%.1f" % dt)
PY
)"
    startups+=("$v")
done
R[startup_runs]="${startups[*]}"
R[startup_med]="$(printf '%s\n' "${startups[@]}" | median)"
R[startup_log_ms]="$(sed 's/\x1b\[[0-9;]*m//g' "$T_DIR"/start-*.out | grep -o 'startup_ms=[0-9]*' | cut -d= -f2 | tr '\n' ' ')"
log "startup ms: ${R[startup_runs]} (median ${R[startup_med]}); daemon's own startup_ms: ${R[startup_log_ms]}"
fi  # ONLY_PROVISION != 1

# ======================================================= 2. Incus
if [ "$SKIP_INCUS" != 1 ]; then
    log "phase 2: incusd in network namespace $I_NS"
    [ -x /usr/libexec/incus/incusd ] || die "incus is not installed: apt-get install -y -t bookworm-backports incus (or SKIP_INCUS=1)"
    pgrep -x incusd >/dev/null && die "an incusd is already running; stop it first (or SKIP_INCUS=1)"
    getent group incus-admin >/dev/null || groupadd --system incus-admin
    mkdir -p /var/log/incus
    ip netns del "$I_NS" 2>/dev/null || true
    ip netns add "$I_NS"
    ip netns exec "$I_NS" ip link set lo up
    ip netns exec "$I_NS" /usr/libexec/incus/incusd --group incus-admin > "$RESULTS/incusd.log" 2>&1 &
    I_PID=$!
    timeout 120 incus admin waitready --timeout=110 || die "incusd did not get ready: $(tail -5 "$RESULTS/incusd.log")"
    # A dir storage pool for the root disks; no network (there is none to use).
    if ! incus storage show default >/dev/null 2>&1; then
        incus storage create default dir >/dev/null
    fi
    incus profile device show default 2>/dev/null | grep -q '^root:' \
        || incus profile device add default root disk path=/ pool=default >/dev/null
    existing="$(incus list --format csv --columns n 2>/dev/null | grep -c "^$I_PREFIX-" || true)"
    log "incus: $existing/$NVMS empty instances exist; creating the rest"
    t0=$EPOCHREALTIME; made=0
    for i in $(seq 1 "$NVMS"); do
        incus info "$I_PREFIX-$i" >/dev/null 2>&1 && continue
        # (It notes on stderr that the instance has no network: there is none.)
        incus create --empty "$I_PREFIX-$i" >/dev/null 2>>"$RESULTS/incus-create.log"
        made=$((made + 1))
    done
    [ "$made" -gt 0 ] && R[incus_create_each_ms]="$(awk -v s="$t0" -v e="$EPOCHREALTIME" -v n="$made" 'BEGIN { printf "%.1f", (e - s) * 1000 / n }')"
    incus config set core.https_address "$I_ADDR"
    mkdir -p "$I_CERTS"
    if [ ! -s "$I_CERTS/client.crt" ]; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -subj /CN=ncbench -keyout "$I_CERTS/client.key" -out "$I_CERTS/client.crt" 2>/dev/null
    fi
    fp="$(openssl x509 -in "$I_CERTS/client.crt" -noout -fingerprint -sha256 | cut -d= -f2 | tr -d : | tr A-F a-f)"
    incus config trust list --format csv --columns f 2>/dev/null | grep -q "^${fp:0:12}" \
        || incus config trust add-certificate "$I_CERTS/client.crt" >/dev/null
    sleep 2
    R[incus_rss_start]="$(rss "$I_PID")"
    ICERT=(--cert "$I_CERTS/client.crt" --key "$I_CERTS/client.key")
    IURL="https://$I_ADDR/1.0/instances"
    code="$(ip netns exec "$I_NS" curl -sk -o "$RESULTS/incus_list.json" -w '%{http_code}' \
        --cert "$I_CERTS/client.crt" --key "$I_CERTS/client.key" "$IURL?recursion=1")"
    [ "$code" = 200 ] || die "incus answered $code (client certificate not trusted?)"
    R[incus_n]="$(jq '.metadata | length' "$RESULTS/incus_list.json")"
    R[incus_list_bytes]="$(wc -c < "$RESULTS/incus_list.json")"
    R[incus_urls_bytes]="$(ip netns exec "$I_NS" curl -sk "${ICERT[@]}" "$IURL" | wc -c)"
    # A few requests first, to warm Incus up like ours was.
    OHA_PRE=(ip netns exec "$I_NS")
    run_oha incus_warmup -n 500 -c 4 "${ICERT[@]}" "$IURL" >/dev/null
    log "incus load: /1.0/instances (URL list), 64 connections, ${DURATION}s (load avg $(loadavg))"
    read -r R[i64_rps] R[i64_p50] R[i64_p99] R[i64_ok] R[i64_codes] < <(run_oha incus_c64 -z "${DURATION}s" -c 64 "${ICERT[@]}" "$IURL")
    log "incus load: /1.0/instances, 1 connection, ${DURATION}s"
    read -r R[i1_rps] R[i1_p50] R[i1_p99] R[i1_ok] R[i1_codes] < <(run_oha incus_c1 -z "${DURATION}s" -c 1 "${ICERT[@]}" "$IURL")
    log "incus load: /1.0/instances?recursion=1 (full objects, like ours), 64 connections, ${DURATION}s"
    read -r R[ir64_rps] R[ir64_p50] R[ir64_p99] R[ir64_ok] R[ir64_codes] < <(run_oha incus_rec_c64 -z "${DURATION}s" -c 64 "${ICERT[@]}" "$IURL?recursion=1")
    log "incus load: /1.0/instances?recursion=1, 1 connection, ${DURATION}s"
    read -r R[ir1_rps] R[ir1_p50] R[ir1_p99] R[ir1_ok] R[ir1_codes] < <(run_oha incus_rec_c1 -z "${DURATION}s" -c 1 "${ICERT[@]}" "$IURL?recursion=1")
    sleep 2
    R[incus_rss_after]="$(rss "$I_PID")"
    OHA_PRE=()
    incus config unset core.https_address || true
    if [ "${INCUS_CLEAN:-0}" = 1 ]; then
        for i in $(seq 1 "$NVMS"); do incus delete "$I_PREFIX-$i" >/dev/null 2>&1 || true; done
    fi
    log "stopping incusd"
    stop_pid "$I_PID"; I_PID=""
    ip netns del "$I_NS" 2>/dev/null || true
fi

# ======================================================= 3. VM start, real TCG guest
if [ "$RUN_START" = 1 ]; then
    log "phase 3: VM start on qemu:///system, real TCG guest"
    need virsh "tests/setup-host.sh"
    virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd is not answering on qemu:///system (tests/setup-host.sh)"
    bash "$repo/tests/guest/build-guest.sh" "$GUEST_SRC" >&2
    # Leftovers of an interrupted run.
    virsh -c qemu:///system destroy "$Q_VM" >/dev/null 2>&1 || true
    virsh -c qemu:///system undefine "$Q_VM" >/dev/null 2>&1 || true
    rm -rf "$Q_DIR" "$Q_CONF"
    mkdir -p "$Q_DIR/boot"
    chmod 0755 "$Q_DIR"
    cp "$GUEST_SRC/vmlinuz" "$GUEST_SRC/initramfs.gz" "$Q_DIR/boot/"
    cat > "$Q_CONF" <<EOF
data_dir = "$Q_DIR"

[api]
rate_limit_per_sec = 0

[hypervisor]
uri = "qemu:///system"
domain_type = "qemu"

[log]
level = "info"
target = "stderr"
EOF
    start_daemon "$Q_CONF" "$Q_ADDR" "$Q_SOCK" "$Q_DIR/serve.out"
    Q_PID=$started_pid
    "$NC" --socket "$Q_SOCK" vm create --name "$Q_VM" --memory 128 \
        --kernel "$Q_DIR/boot/vmlinuz" --initrd "$Q_DIR/boot/initramfs.gz" \
        --cmdline "console=ttyS0 panic=-1 quiet" >/dev/null
    for i in $(seq 1 100); do
        virsh -c qemu:///system domstate "$Q_VM" >/dev/null 2>&1 && break
        sleep 0.1
    done
    wait_state() {  # wait_state STATE
        local i
        for i in $(seq 1 100); do
            [ "$(virsh -c qemu:///system domstate "$Q_VM" 2>/dev/null | head -n1)" = "$1" ] && return 0
            sleep 0.1
        done
        die "$Q_VM did not reach state $1"
    }
    api_cli=(); api_curl=(); virsh_t=()
    for run in 1 2 3 4 5; do
        t0=$EPOCHREALTIME
        "$NC" --socket "$Q_SOCK" vm start "$Q_VM" >/dev/null
        api_cli+=("$(ms "$t0" "$EPOCHREALTIME")")
        wait_state running; sleep 0.5
        "$NC" --socket "$Q_SOCK" vm stop "$Q_VM" >/dev/null; wait_state "shut off"; sleep 0.3

        t0=$EPOCHREALTIME
        code="$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$Q_SOCK" -X POST "http://x/v1/vms/$Q_VM/start")"
        api_curl+=("$(ms "$t0" "$EPOCHREALTIME")")
        [ "$code" = 200 ] || die "POST start answered $code"
        wait_state running; sleep 0.5
        "$NC" --socket "$Q_SOCK" vm stop "$Q_VM" >/dev/null; wait_state "shut off"; sleep 0.3

        t0=$EPOCHREALTIME
        virsh -c qemu:///system start "$Q_VM" >/dev/null
        virsh_t+=("$(ms "$t0" "$EPOCHREALTIME")")
        wait_state running; sleep 0.5
        virsh -c qemu:///system destroy "$Q_VM" >/dev/null; wait_state "shut off"; sleep 0.3
    done
    R[start_cli_runs]="${api_cli[*]}"; R[start_cli]="$(printf '%s\n' "${api_cli[@]}" | median)"
    R[start_curl_runs]="${api_curl[*]}"; R[start_curl]="$(printf '%s\n' "${api_curl[@]}" | median)"
    R[start_virsh_runs]="${virsh_t[*]}"; R[start_virsh]="$(printf '%s\n' "${virsh_t[@]}" | median)"
    # The guest really booted: its console log shows the marker line.
    # One more start, left running until the guest's console shows it booted:
    # proof that the timed starts ran a real guest.
    "$NC" --socket "$Q_SOCK" vm start "$Q_VM" >/dev/null
    R[guest_up]="not seen in 120 s"
    t0=$EPOCHREALTIME
    for i in $(seq 1 1200); do
        if grep -rqs NOVACRON-GUEST-UP "$Q_DIR" 2>/dev/null; then
            R[guest_up]="yes, $(ms "$t0" "$EPOCHREALTIME") ms after start returned"; break
        fi
        sleep 0.1
    done
    "$NC" --socket "$Q_SOCK" vm delete "$Q_VM" --force >/dev/null
    stop_pid "$Q_PID"; Q_PID=""
fi

# ======================================================= 4. provisioning
# Image upload throughput, VM creation from an image (qcow2 overlay), and the
# console WebSocket's round trip to a real guest. Raw numbers: $RESULTS/prov_*.
if [ "$SKIP_PROVISION" != 1 ]; then
    log "phase 4: provisioning (upload ${UPLOAD_MIB} MiB, VM create from an image, console)"
    need qemu-img "tests/setup-host.sh"
    need sha256sum "apt-get install coreutils"
    # nearest-rank percentile of the numbers on stdin: pct 90
    pct() { sort -g | awk -v p="$1" '{ a[NR] = $1 } END { r = int(p * NR / 100); if (r < p * NR / 100) r++; if (r < 1) r = 1; print a[r] }'; }
    proc_cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
    # "sum count" of novacron_http_request_duration_seconds for one route/method/status.
    metric_sc() {  # metric_sc SOCK ROUTE METHOD STATUS
        curl -sf --unix-socket "$1" http://x/metrics | awk -v l="{route=\"$2\",method=\"$3\",status=\"$4\"}" '
            $1 == "novacron_http_request_duration_seconds_sum" l { s = $2 }
            $1 == "novacron_http_request_duration_seconds_count" l { c = $2 }
            END { print (s == "" ? 0 : s), (c == "" ? 0 : c) }'
    }
    # Mean ms between two "sum count" snapshots.
    metric_mean_ms() { echo "$1 $2" | awk '{ n = $4 - $2; if (n > 0) printf "%.1f (n=%d)", ($3 - $1) / n * 1000, n; else print "n/a" }'; }
    write_conf() {  # write_conf CONF DIR URI
        cat > "$1" <<EOF
data_dir = "$2"

[api]
rate_limit_per_sec = 0

[hypervisor]
uri = "$3"
domain_type = "qemu"

[images]
max_upload_gib = 256

[log]
level = "info"
target = "stderr"
EOF
    }
    prov_cleanup
    mkdir -p "$P_T_DIR" "$P_Q_DIR/boot" "$P_WORK"
    chmod 0755 "$P_T_DIR" "$P_Q_DIR" "$P_WORK"
    write_conf "$P_T_CONF" "$P_T_DIR" "test:///default"
    start_daemon "$P_T_CONF" "$P_T_ADDR" "$P_T_SOCK" "$P_T_DIR/first.out"
    P_T_PID=$started_pid
    P_TOKEN="$(awk '/admin token:/ { print $3 }' "$P_T_DIR/first.out")"
    P_FP="$(awk '/fingerprint:/ { print $2 }' "$P_T_DIR/first.out")"
    [ -n "$P_TOKEN" ] && [ -n "$P_FP" ] || die "no admin token/fingerprint in $P_T_DIR/first.out"

    # ------------------------------------------------ 4a. image upload
    P_FILE="$P_WORK/upload.raw"
    head -c "$((UPLOAD_MIB << 20))" /dev/urandom > "$P_FILE"
    P_BYTES="$(stat -c %s "$P_FILE")"
    cat "$P_FILE" > /dev/null; cat "$P_FILE" > /dev/null   # page cache warm
    TIMEFORMAT='%R %U %S'
    # timed CMD... -> "real user sys" (seconds) of CMD on stdout; CMD's own stdout goes to $RESULTS/prov_last.out
    timed() { { time "$@" > "$RESULTS/prov_last.out" 2>"$RESULTS/prov_last.err"; } 2>&1; }
    mbps() { awk -v b="$P_BYTES" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
    del_image() {  # del_image SOCK NAME
        local code
        code="$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$1" -X DELETE "http://x/v1/images/$2")"
        case "$code" in 200|204) ;; *) die "DELETE image $2 answered $code" ;; esac
    }
    check_201() {  # check_201 WHAT: the last curl -w '%{http_code}' must be 201
        [ "$(cat "$RESULTS/prov_last.out")" = 201 ] || die "$1 answered $(cat "$RESULTS/prov_last.out"): $(head -c 300 "$RESULTS/prov_resp.json")"
    }
    UPH=(-s -o "$RESULTS/prov_resp.json" -T "$P_FILE" -H 'Content-Type: application/octet-stream')
    R[p_load_upload]="$(loadavg)"
    log "upload: $P_BYTES bytes of random data, page cache warm (load avg ${R[p_load_upload]})"
    # up_series KEY CURL_ARGS...: 3 timed uploads (each deleted again) ->
    # R[p_KEY] (median s), R[p_KEY_runs], R[p_KEY_cpu] (daemon CPU s per run),
    # R[p_KEY_curl] (curl CPU s per run), R[p_KEY_daemon_ms] (daemon-side mean),
    # R[p_KEY_proto] (HTTP version curl used).
    up_series() {
        local key="$1" run c0 real user sys m0 m1 t=() cpu=() ccpu=()
        shift
        m0="$(metric_sc "$P_T_SOCK" "/v1/images/{name}" PUT 201)"
        for run in 1 2 3; do
            c0="$(proc_cpu_s "$P_T_PID")"
            read -r real user sys < <(timed curl "${UPH[@]}" -w '%{http_code} %{http_version}' "$@")
            R[p_${key}_proto]="HTTP/$(cut -d' ' -f2 "$RESULTS/prov_last.out")"
            [ "$(cut -d' ' -f1 "$RESULTS/prov_last.out")" = 201 ] || die "PUT ($key) answered $(cat "$RESULTS/prov_last.out"): $(head -c 300 "$RESULTS/prov_resp.json")"
            t+=("$real"); ccpu+=("$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')")
            cpu+=("$(awk -v a="$c0" -v b="$(proc_cpu_s "$P_T_PID")" 'BEGIN { printf "%.2f", b - a }')")
            del_image "$P_T_SOCK" upl
        done
        m1="$(metric_sc "$P_T_SOCK" "/v1/images/{name}" PUT 201)"
        R[p_${key}_runs]="${t[*]}"; R[p_$key]="$(printf '%s\n' "${t[@]}" | median)"
        R[p_${key}_cpu]="${cpu[*]}"; R[p_${key}_curl]="${ccpu[*]}"
        R[p_${key}_daemon_ms]="$(metric_mean_ms "$m0" "$m1")"
    }
    cat_t=()
    for run in 1 2 3; do
        read -r real _ _ < <({ time cat "$P_FILE" > /dev/null; } 2>&1); cat_t+=("$real")
    done
    R[p_cat_runs]="${cat_t[*]}"; R[p_cat]="$(printf '%s\n' "${cat_t[@]}" | median)"
    # curl's default over HTTPS: ALPN picks HTTP/2 (the daemon offers h2).
    up_series https -k -H "Authorization: Bearer $P_TOKEN" "https://$P_T_ADDR/v1/images/upl"
    up_series https11 -k --http1.1 -H "Authorization: Bearer $P_TOKEN" "https://$P_T_ADDR/v1/images/upl"
    up_series sock --unix-socket "$P_T_SOCK" "http://x/v1/images/upl"
    # The CLI: 3 runs without its own SHA-256 pass, 1 with (it hashes the file
    # first). A failed upload makes the DELETE after it answer 404 (die).
    cli_t=()
    for run in 1 2 3; do
        read -r real _ _ < <(timed "$NC" --url "https://$P_T_ADDR" --token "$P_TOKEN" --fingerprint "$P_FP" \
            image upload upl "$P_FILE" --no-checksum)
        cli_t+=("$real"); del_image "$P_T_SOCK" upl
    done
    R[p_cli_runs]="${cli_t[*]}"; R[p_cli]="$(printf '%s\n' "${cli_t[@]}" | median)"
    read -r R[p_cli_sum] _ _ < <(timed "$NC" --url "https://$P_T_ADDR" --token "$P_TOKEN" --fingerprint "$P_FP" \
        image upload upl "$P_FILE")
    del_image "$P_T_SOCK" upl
    # What the daemon does per byte besides receiving it: hash, write, flush.
    sha_t=(); ossl_t=(); dd_t=(); ddf_t=()
    for run in 1 2 3; do
        read -r real _ _ < <(timed sha256sum "$P_FILE"); sha_t+=("$real")
        # openssl uses the CPU's SHA extensions where present, as the daemon's sha2 crate does.
        read -r real _ _ < <(timed openssl dgst -sha256 "$P_FILE"); ossl_t+=("$real")
        read -r real _ _ < <(timed dd if="$P_FILE" of="$P_WORK/dd.tmp" bs=1M); dd_t+=("$real"); rm -f "$P_WORK/dd.tmp"
        read -r real _ _ < <(timed dd if="$P_FILE" of="$P_WORK/dd.tmp" bs=1M conv=fsync); ddf_t+=("$real"); rm -f "$P_WORK/dd.tmp"
    done
    R[p_sha]="$(printf '%s\n' "${sha_t[@]}" | median)"; R[p_ossl]="$(printf '%s\n' "${ossl_t[@]}" | median)"; R[p_dd]="$(printf '%s\n' "${dd_t[@]}" | median)"
    R[p_ddf]="$(printf '%s\n' "${ddf_t[@]}" | median)"
    R[p_sha_runs]="${sha_t[*]}"; R[p_dd_runs]="${dd_t[*]}"; R[p_ddf_runs]="${ddf_t[*]}"
    # The upload's limit: it must both hash and write every byte, so it can be
    # no faster than the slower of the two alone.
    R[p_limit]="$(printf '%s\n' "${R[p_ossl]}" "${R[p_dd]}" | sort -g | tail -n1)"
    R[p_ossl_runs]="${ossl_t[*]}"
    rm -f "$P_FILE"
    log "upload medians (s): cat ${R[p_cat]}, HTTPS ${R[p_https]} (${R[p_https_proto]}), HTTPS ${R[p_https11]} (${R[p_https11_proto]}), socket ${R[p_sock]}, CLI ${R[p_cli]}; sha256sum ${R[p_sha]}, openssl sha256 ${R[p_ossl]}, dd ${R[p_dd]}, dd+fsync ${R[p_ddf]}"

    # ------------------------------------------------ 4b. VM create from an image
    qemu-img create -q -f qcow2 "$P_WORK/base.qcow2" 1G
    # Each series writes 20 lines "http_code seconds [num_connects]" to
    # $RESULTS/prov_create_TAG.txt and names its VMs $P_PREFIX$TAG-1..20.
    vm_body() { printf '{"name":"%s","vcpus":1,"memory_mib":64,"disks":[{"image":"base"}]}' "$1"; }
    create_sock() {  # create_sock SOCK TAG: 20 separate curl calls over the Unix socket
        local i out="$RESULTS/prov_create_$2.txt"
        : > "$out"
        for i in $(seq 1 20); do
            curl -s -o /dev/null -w '%{http_code} %{time_total}\n' --unix-socket "$1" \
                -H 'Content-Type: application/json' -d "$(vm_body "$P_PREFIX$2-$i")" http://x/v1/vms >> "$out"
        done
    }
    create_https() {  # create_https ADDR TAG: 20 POSTs on one keep-alive HTTPS connection (curl --next)
        local i args=() out="$RESULTS/prov_create_$2.txt"
        for i in $(seq 1 20); do
            [ "$i" -gt 1 ] && args+=(--next)
            args+=(-sk -o /dev/null -w '%{http_code} %{time_total} %{num_connects}\n'
                   -H "Authorization: Bearer $P_TOKEN" -H 'Content-Type: application/json'
                   -d "$(vm_body "$P_PREFIX$2-$i")" "https://$1/v1/vms")
        done
        curl "${args[@]}" > "$out"
        [ "$(awk '$3 > 0' "$out" | wc -l)" = 1 ] || log "WARNING: the HTTPS creates did not reuse one connection ($out)"
    }
    create_stats() {  # create_stats TAG: R[pc_TAG_med|p90|runs] from the client times; all must be 201
        local f="$RESULTS/prov_create_$1.txt"
        [ "$(awk '$1 == 201' "$f" | wc -l)" = 20 ] || die "VM creates ($1) were not all 201: $(awk '{ print $1 }' "$f" | sort | uniq -c | tr '\n' ' ')"
        R[pc_${1}_med]="$(awk '{ printf "%.1f\n", $2 * 1000 }' "$f" | median)"
        R[pc_${1}_p90]="$(awk '{ printf "%.1f\n", $2 * 1000 }' "$f" | pct 90)"
        R[pc_${1}_runs]="$(awk '{ printf "%.1f ", $2 * 1000 }' "$f")"
    }
    # create_phase SOCK ADDR K (t or q): upload base, 20 creates on the socket
    # (tag Ks), then 20 over one HTTPS keep-alive connection (tag Kh).
    create_phase() {
        local sock="$1" addr="$2" k="$3" m0 m1 m2
        curl -s -o "$RESULTS/prov_resp.json" -w '%{http_code}' -T "$P_WORK/base.qcow2" -H 'Content-Type: application/octet-stream' \
            --unix-socket "$sock" http://x/v1/images/base > "$RESULTS/prov_last.out"
        check_201 "PUT base.qcow2"
        R[pc_${k}_load]="$(loadavg)"
        m0="$(metric_sc "$sock" /v1/vms POST 201)"
        create_sock "$sock" "${k}s"
        m1="$(metric_sc "$sock" /v1/vms POST 201)"
        create_https "$addr" "${k}h"
        m2="$(metric_sc "$sock" /v1/vms POST 201)"
        create_stats "${k}s"; create_stats "${k}h"
        R[pc_${k}s_daemon]="$(metric_mean_ms "$m0" "$m1")"; R[pc_${k}h_daemon]="$(metric_mean_ms "$m1" "$m2")"
        log "create ($k): socket median ${R[pc_${k}s_med]} p90 ${R[pc_${k}s_p90]} ms (daemon mean ${R[pc_${k}s_daemon]}); HTTPS keep-alive median ${R[pc_${k}h_med]} p90 ${R[pc_${k}h_p90]} ms (daemon mean ${R[pc_${k}h_daemon]})"
    }
    log "create: 20 + 20 VMs from image base (overlay) on test:///default"
    create_phase "$P_T_SOCK" "$P_T_ADDR" t
    stop_pid "$P_T_PID"; P_T_PID=""

    if [ "$SKIP_QEMU" != 1 ]; then
        need virsh "tests/setup-host.sh"
        virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd is not answering on qemu:///system (tests/setup-host.sh)"
        write_conf "$P_Q_CONF" "$P_Q_DIR" "qemu:///system"
        start_daemon "$P_Q_CONF" "$P_Q_ADDR" "$P_Q_SOCK" "$P_Q_DIR/first.out"
        P_Q_PID=$started_pid
        P_TOKEN="$(awk '/admin token:/ { print $3 }' "$P_Q_DIR/first.out")"
        [ -n "$P_TOKEN" ] || die "no admin token in $P_Q_DIR/first.out"
        log "create: 20 + 20 VMs from image base (overlay) on qemu:///system (real domains)"
        create_phase "$P_Q_SOCK" "$P_Q_ADDR" q
        # Proof that these were real libvirt domains: count them, then delete them through the API.
        R[pc_q_domains]="$(virsh -c qemu:///system list --all --name | grep -c "^$P_PREFIX" || true)"
        t0=$EPOCHREALTIME
        for d in $(seq -f "qs-%g" 1 20) $(seq -f "qh-%g" 1 20); do
            code="$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$P_Q_SOCK" -X DELETE "http://x/v1/vms/$P_PREFIX$d")"
            case "$code" in 200|204) ;; *) die "DELETE VM $P_PREFIX$d answered $code" ;; esac
        done
        R[pc_q_delete_each]="$(awk -v s="$t0" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.1f", (e - s) * 1000 / 40 }')"

        # ------------------------------------------------ 4c. console round trip
        log "console: real TCG guest on qemu:///system"
        bash "$repo/tests/guest/build-guest.sh" "$GUEST_SRC" >&2
        cp "$GUEST_SRC/vmlinuz" "$GUEST_SRC/initramfs.gz" "$P_Q_DIR/boot/"
        "$NC" --socket "$P_Q_SOCK" vm create --name "$P_CON_VM" --memory 128 \
            --kernel vmlinuz --initrd initramfs.gz --cmdline "console=ttyS0 panic=-1 quiet" >/dev/null
        "$NC" --socket "$P_Q_SOCK" vm start "$P_CON_VM" >/dev/null
        t0=$EPOCHREALTIME; up=0
        for i in $(seq 1 1200); do
            if curl -sf --unix-socket "$P_Q_SOCK" "http://x/v1/vms/$P_CON_VM/console/log" 2>/dev/null | grep -q NOVACRON-GUEST-UP \
                || grep -rqs NOVACRON-GUEST-UP "$P_Q_DIR" 2>/dev/null; then
                up=1; break
            fi
            sleep 0.1
        done
        [ "$up" = 1 ] || die "the console guest did not boot in 120 s"
        R[pcon_boot]="$(ms "$t0" "$EPOCHREALTIME")"
        sleep 3   # let the shell settle on the console
        if ! "$VENV/bin/python" -c 'import websockets' 2>/dev/null; then
            log "console: installing the PyPI package websockets into $VENV"
            "$PY" -m venv "$VENV" >&2 && "$VENV/bin/pip" install -q websockets >&2 \
                || die "cannot install websockets into $VENV (python3-venv, PyPI)"
        fi
        cat > "$RESULTS/prov_console.py" <<'PY'
# console round trip: send "echo $((N+1))\n", wait for the line N+1.
# Modes: https (wss:// + bearer token), unix (the local socket), and pty:
# the guest's serial pty opened directly (no daemon, no libvirt stream),
# the floor set by QEMU and the TCG guest.
import asyncio, os, random, re, select, ssl, sys, time

def pty_main(path, n):
    import tty
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    buf = bytearray()

    def until(pat, timeout):
        deadline = time.perf_counter() + timeout
        while not pat.search(buf):
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            if select.select([fd], [], [], left)[0]:
                buf.extend(os.read(fd, 65536))
        return True

    for _ in range(20):
        os.write(fd, b"echo $((40000+2))\n")
        if until(re.compile(rb"(?:^|\n)40002\r?\n"), 3):
            break
    else:
        sys.exit("no answer from the guest shell")
    until(re.compile(rb"(?!x)x"), 0.3)
    buf.clear()
    rng = random.Random(7)
    for _ in range(n):
        k = rng.randrange(100000, 900000)
        t0 = time.perf_counter()
        os.write(fd, b"echo $((%d+1))\n" % k)
        if not until(re.compile(rb"(?:^|\n)%d\r?\n" % (k + 1)), 10):
            sys.exit(f"no answer for {k}+1 in 10 s")
        print("%.2f" % ((time.perf_counter() - t0) * 1000), flush=True)
        until(re.compile(rb"(?!x)x"), 0.3)
        buf.clear()

async def main(mode, target, token, vm, n):
    from websockets.asyncio.client import connect, unix_connect
    path = f"/v1/vms/{vm}/console"
    kw = dict(compression=None, ping_interval=None, max_size=None, open_timeout=10)
    if mode == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the daemon's self-signed cert, loopback only
        cm = connect(f"wss://{target}{path}", ssl=ctx,
                     additional_headers={"Authorization": f"Bearer {token}"}, **kw)
    else:
        cm = unix_connect(target, f"ws://localhost{path}", **kw)
    async with cm as ws:
        buf = bytearray()

        async def until(pat, timeout):
            deadline = time.perf_counter() + timeout
            while not pat.search(buf):
                left = deadline - time.perf_counter()
                if left <= 0:
                    return False
                try:
                    msg = await asyncio.wait_for(ws.recv(), left)
                except asyncio.TimeoutError:
                    return False
                buf.extend(msg if isinstance(msg, bytes) else msg.encode())
            return True

        async def drain():
            await until(re.compile(rb"(?!x)x"), 0.3)
            buf.clear()

        # Sync with the shell first (it may still be printing boot messages).
        for _ in range(20):
            await ws.send(b"echo $((40000+2))\n")
            if await until(re.compile(rb"(?:^|\n)40002\r?\n"), 3):
                break
        else:
            sys.exit("no answer from the guest shell")
        await drain()
        rng = random.Random(7)
        for _ in range(n):
            k = rng.randrange(100000, 900000)
            pat = re.compile(rb"(?:^|\n)%d\r?\n" % (k + 1))
            t0 = time.perf_counter()
            await ws.send(b"echo $((%d+1))\n" % k)
            if not await until(pat, 10):
                sys.exit(f"no answer for {k}+1 in 10 s")
            print("%.2f" % ((time.perf_counter() - t0) * 1000), flush=True)
            await drain()

if sys.argv[1] == "pty":
    pty_main(sys.argv[2], int(sys.argv[5]))
else:
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
PY
        R[pcon_load]="$(loadavg)"
        "$VENV/bin/python" "$RESULTS/prov_console.py" https "$P_Q_ADDR" "$P_TOKEN" "$P_CON_VM" 20 \
            > "$RESULTS/prov_console_https.txt" || die "console benchmark (HTTPS) failed"
        "$VENV/bin/python" "$RESULTS/prov_console.py" unix "$P_Q_SOCK" - "$P_CON_VM" 20 \
            > "$RESULTS/prov_console_unix.txt" || die "console benchmark (socket) failed"
        # Baseline without the daemon: the same probe on the guest's pty (no
        # console session is open now, so nothing else reads it).
        pty="$(virsh -c qemu:///system ttyconsole "$P_CON_VM")"
        [ -c "$pty" ] || die "no console pty for $P_CON_VM ($pty)"
        "$VENV/bin/python" "$RESULTS/prov_console.py" pty "$pty" - - 20 \
            > "$RESULTS/prov_console_pty.txt" || die "console benchmark (pty) failed"
        for k in https unix pty; do
            [ "$(wc -l < "$RESULTS/prov_console_$k.txt")" = 20 ] || die "console ($k): expected 20 round trips"
            R[pcon_${k}_med]="$(median < "$RESULTS/prov_console_$k.txt")"
            R[pcon_${k}_p90]="$(pct 90 < "$RESULTS/prov_console_$k.txt")"
            R[pcon_${k}_min]="$(sort -g "$RESULTS/prov_console_$k.txt" | head -n1)"
            R[pcon_${k}_max]="$(sort -g "$RESULTS/prov_console_$k.txt" | tail -n1)"
        done
        log "console round trip: HTTPS median ${R[pcon_https_med]} p90 ${R[pcon_https_p90]} ms; socket median ${R[pcon_unix_med]} p90 ${R[pcon_unix_p90]} ms; pty direct median ${R[pcon_pty_med]} p90 ${R[pcon_pty_p90]} ms"
        "$NC" --socket "$P_Q_SOCK" vm delete "$P_CON_VM" --force >/dev/null
    fi
    prov_cleanup
fi

# ======================================================= results
ok() { if awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN { exit !((op == "ge" && v >= t) || (op == "le" && v <= t)) }'; then echo "met"; else echo "MISSED"; fi; }
anon_mb() { echo "$1" | sed -n 's/.*RssAnon=\([0-9]*\)kB.*/\1/p' | awk '{ printf "%.1f", $1 / 1024 }'; }

{
echo "NovaCron Edge benchmark, ${R[date]}, ${R[cpu]}"
if [ "$ONLY_PROVISION" != 1 ]; then
echo "binary $BIN: ${R[bin_bytes]} bytes (stripped); GET /v1/vms body ${R[list_bytes]} bytes (${R[list_n]} VMs: $NVMS + the test driver's own)"
else
echo "binary $BIN: ${R[bin_bytes]} bytes (stripped); provisioning section only"
fi
echo
printf '%-52s %-28s %-12s %s\n' "metric" "value" "target" "status"
if [ "$ONLY_PROVISION" != 1 ]; then
printf '%-52s %-28s %-12s %s\n' "ours GET /v1/vms, 64 conns: req/s" "${R[o64_rps]}" ">= 20000" "$(ok "${R[o64_rps]}" ge 20000)"
printf '%-52s %-28s %-12s %s\n' "ours 64 conns: p50 / p99 ms" "${R[o64_p50]} / ${R[o64_p99]}" "" ""
printf '%-52s %-28s %-12s %s\n' "ours 1 conn: req/s" "${R[o1_rps]}" "" ""
printf '%-52s %-28s %-12s %s\n' "ours 1 conn: p50 / p99 ms" "${R[o1_p50]} / ${R[o1_p99]}" "p99 <= 0.5" "$(ok "${R[o1_p99]}" le 0.5)"
printf '%-52s %-28s %-12s %s\n' "ours 100k requests, 16 conns: req/s" "${R[o100k_rps]}" "" ""
printf '%-52s %-28s %-12s %s\n' "status codes (64c / 1c)" "${R[o64_codes]} / ${R[o1_codes]}" "" ""
printf '%-52s %-28s %-12s %s\n' "ours /v1/vms over local socket, no TLS: 64c req/s" "${R[s64_rps]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  local socket 64c p50/p99 ms; 1c p50/p99 ms" "${R[s64_p50]}/${R[s64_p99]}; ${R[s1_p50]}/${R[s1_p99]}" "" ""
printf '%-52s %-28s %-12s %s\n' "ours /v1/health over HTTPS (no auth): 64c req/s" "${R[h64_rps]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  /v1/health 1c p50/p99 ms" "${R[h1_p50]}/${R[h1_p99]}" "" ""
printf '%-52s %-28s %-12s %s\n' "ours daemon CPU per HTTPS /v1/vms request (us)" "${R[cpu_us_per_req]} (daemon used ${R[oha_cpu_share]} of 2 cores)" "" ""
if [ "$SKIP_BASELINE" != 1 ]; then
printf '%-52s %-28s %-12s %s\n' "limit: $BASELINE_ROUNDS rounds of ${BASELINE_DURATION}s, load avg at start" "${R[b_load]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  ours 64c req/s: median (min-max)" "${R[lim_o64]} (${R[lim_o64_spread]})" "" ""
printf '%-52s %-28s %-12s %s\n' "  baseline 64c req/s: median (min-max)" "${R[lim_b64]} (${R[lim_b64_spread]})" "" ""
printf '%-52s %-28s %-12s %s\n' "  throughput ours / baseline (per round)" "${R[lim_tput]} (${R[lim_r64_runs]})" "" ""
printf '%-52s %-28s %-12s %s\n' "  ours 1c p99 ms: median (min-max)" "${R[lim_o1]} (${R[lim_o1_spread]})" "" ""
printf '%-52s %-28s %-12s %s\n' "  baseline 1c p99 ms: median (min-max)" "${R[lim_b1]} (${R[lim_b1_spread]})" "" ""
printf '%-52s %-28s %-12s %s\n' "  p99 ours / baseline (per round)" "${R[lim_p99]} (${R[lim_r1_runs]})" "" ""
fi
fi
if [ "$SKIP_INCUS" != 1 ]; then
printf '%-52s %-28s %-12s %s\n' "incus GET /1.0/instances ($NVMS, URLs), 64c req/s" "${R[i64_rps]}" "" ""
printf '%-52s %-28s %-12s %s\n' "incus /1.0/instances 64c: p50 / p99 ms" "${R[i64_p50]} / ${R[i64_p99]}" "" ""
printf '%-52s %-28s %-12s %s\n' "incus /1.0/instances 1c: req/s; p50 / p99 ms" "${R[i1_rps]}; ${R[i1_p50]} / ${R[i1_p99]}" "" ""
printf '%-52s %-28s %-12s %s\n' "incus ?recursion=1 (full objects), 64c req/s" "${R[ir64_rps]}" "" ""
printf '%-52s %-28s %-12s %s\n' "incus ?recursion=1 64c: p50 / p99 ms" "${R[ir64_p50]} / ${R[ir64_p99]}" "" ""
printf '%-52s %-28s %-12s %s\n' "incus ?recursion=1 1c: req/s; p50 / p99 ms" "${R[ir1_rps]}; ${R[ir1_p50]} / ${R[ir1_p99]}" "" ""
r1="$(ratio "${R[o64_rps]}" "${R[i64_rps]}")"; r2="$(ratio "${R[o64_rps]}" "${R[ir64_rps]}")"
printf '%-52s %-28s %-12s %s\n' "throughput ratio ours / incus (URL list)" "${r1}x" ">= 5x" "$(ok "$r1" ge 5)"
printf '%-52s %-28s %-12s %s\n' "throughput ratio ours / incus (recursion=1)" "${r2}x" "" ""
printf '%-52s %-28s %-12s %s\n' "incus body bytes: URLs / recursion=1" "${R[incus_urls_bytes]} / ${R[incus_list_bytes]} (${R[incus_n]} inst.)" "" ""
fi
if [ "$ONLY_PROVISION" != 1 ]; then
printf '%-52s %-28s %-12s %s\n' "ours idle after start ($NVMS VMs)" "${R[rss_start]}" "anon<=12MB" "$(ok "$(anon_mb "${R[rss_start]}")" le 12)"
printf '%-52s %-28s %-12s %s\n' "ours after the ${DURATION}s load runs" "${R[rss_after_load]}" "" ""
printf '%-52s %-28s %-12s %s\n' "ours after +100k requests" "${R[rss_after_100k]}" "anon<=12MB" "$(ok "$(anon_mb "${R[rss_after_100k]}")" le 12)"
printf '%-52s %-28s %-12s %s\n' "ours after +200k requests (growth check)" "${R[rss_after_200k]}" "no growth" ""
if [ "$SKIP_INCUS" != 1 ]; then
printf '%-52s %-28s %-12s %s\n' "incusd idle ($NVMS instances)" "${R[incus_rss_start]}" "" ""
printf '%-52s %-28s %-12s %s\n' "incusd after its load runs" "${R[incus_rss_after]}" "" ""
fi
printf '%-52s %-28s %-12s %s\n' "ours exec -> /v1/ready 200, median of 5 (ms)" "${R[startup_med]}" "<= 100" "$(ok "${R[startup_med]}" le 100)"
printf '%-52s %-28s %-12s %s\n' "  runs (ms)" "${R[startup_runs]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  daemon-reported startup_ms" "${R[startup_log_ms]}" "" ""
printf '%-52s %-28s %-12s %s\n' "ours VM create via CLI, each (ms, test driver)" "${R[create_each_ms]}" "" ""
fi
if [ "$RUN_START" = 1 ]; then
printf '%-52s %-28s %-12s %s\n' "VM start: novacron vm start (CLI), median ms" "${R[start_cli]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  runs" "${R[start_cli_runs]}" "" ""
printf '%-52s %-28s %-12s %s\n' "VM start: curl POST over the socket, median ms" "${R[start_curl]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  runs" "${R[start_curl_runs]}" "" ""
printf '%-52s %-28s %-12s %s\n' "VM start: virsh start, median ms" "${R[start_virsh]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  runs" "${R[start_virsh_runs]}" "" ""
r3="$(ratio "${R[start_cli]}" "${R[start_virsh]}")"; r4="$(ratio "${R[start_curl]}" "${R[start_virsh]}")"
printf '%-52s %-28s %-12s %s\n' "VM start ratio CLI / virsh" "$r3" "<= 1.1" "$(ok "$r3" le 1.1)"
printf '%-52s %-28s %-12s %s\n' "VM start ratio curl / virsh" "$r4" "<= 1.1" "$(ok "$r4" le 1.1)"
printf '%-52s %-28s %-12s %s\n' "guest console shows NOVACRON-GUEST-UP" "${R[guest_up]:-not found}" "" ""
fi
if [ "$SKIP_PROVISION" != 1 ]; then
r7="$(ratio "${R[p_cat]}" "${R[p_cli]}")"
printf '%-52s %-28s %-12s %s\n' "upload file: random data, bytes (page cache warm)" "$P_BYTES" "" ""
printf '%-52s %-28s %-12s %s\n' "  load avg at the start of the upload runs" "${R[p_load_upload]}" "" ""
printf '%-52s %-28s %-12s %s\n' "cat FILE > /dev/null: median s; MB/s" "${R[p_cat]}; $(mbps "${R[p_cat]}")" "" ""
printf '%-52s %-28s %-12s %s\n' "  runs s" "${R[p_cat_runs]}" "" ""
for k in https https11 sock; do
    case $k in https) what="curl PUT over HTTPS (default: ${R[p_https_proto]})" ;;
        https11) what="curl --http1.1 PUT over HTTPS" ;; sock) what="curl PUT over the Unix socket" ;; esac
    r="$(ratio "${R[p_cat]}" "${R[p_$k]}")"
    printf '%-52s %-28s %-12s %s\n' "upload $what: median s; MB/s" "${R[p_$k]}; $(mbps "${R[p_$k]}")" "" ""
    printf '%-52s %-28s %-12s %s\n' "  runs s | daemon CPU s | curl CPU s" "${R[p_${k}_runs]} | ${R[p_${k}_cpu]} | ${R[p_${k}_curl]}" "" ""
    printf '%-52s %-28s %-12s %s\n' "  daemon-side mean (metrics histogram, ms)" "${R[p_${k}_daemon_ms]}" "" ""
    printf '%-52s %-28s %-12s %s\n' "  ratio upload / cat" "$r" ">= 0.7" "$(ok "$r" ge 0.7)"
done
printf '%-52s %-28s %-12s %s\n' "upload CLI over HTTPS --no-checksum: median s; MB/s" "${R[p_cli]}; $(mbps "${R[p_cli]}")" "" ""
printf '%-52s %-28s %-12s %s\n' "  runs (s)" "${R[p_cli_runs]}" "" ""
printf '%-52s %-28s %-12s %s\n' "upload ratio CLI / cat" "$r7" ">= 0.7" "$(ok "$r7" ge 0.7)"
printf '%-52s %-28s %-12s %s\n' "upload CLI over HTTPS with its SHA-256 (1 run): s" "${R[p_cli_sum]}; $(mbps "${R[p_cli_sum]}") MB/s" "" ""
printf '%-52s %-28s %-12s %s\n' "sha256sum FILE: median s; MB/s" "${R[p_sha]}; $(mbps "${R[p_sha]}")" "" ""
printf '%-52s %-28s %-12s %s\n' "openssl dgst -sha256 FILE (SHA-NI): median s; MB/s" "${R[p_ossl]}; $(mbps "${R[p_ossl]}")" "" ""
printf '%-52s %-28s %-12s %s\n' "dd bs=1M to /var/tmp: median s; MB/s" "${R[p_dd]}; $(mbps "${R[p_dd]}")" "" ""
printf '%-52s %-28s %-12s %s\n' "dd bs=1M conv=fsync to /var/tmp: median s; MB/s" "${R[p_ddf]}; $(mbps "${R[p_ddf]}")" "" ""
printf '%-52s %-28s %-12s %s\n' "upload limit: slower of openssl dgst and dd: s; MB/s" "${R[p_limit]}; $(mbps "${R[p_limit]}")" "" ""
printf '%-52s %-28s %-12s %s\n' "  runs s: openssl | dd" "${R[p_ossl_runs]} | ${R[p_dd_runs]}" "" ""
for k in https https11 sock cli; do
    printf '%-52s %-28s %-12s %s\n' "  upload $k: limit / ours (1.00 = at the limit)" "$(ratio "${R[p_limit]}" "${R[p_$k]}")" "" ""
done
for k in t q; do
    [ -n "${R[pc_${k}s_med]:-}" ] || continue
    [ "$k" = t ] && where="test:///default" || where="qemu:///system"
    printf '%-52s %-28s %-12s %s\n' "VM create from image ($where), load avg" "${R[pc_${k}_load]}" "" ""
    printf '%-52s %-28s %-12s %s\n' "  curl over the socket: median / p90 ms" "${R[pc_${k}s_med]} / ${R[pc_${k}s_p90]}" "<= 50" "$(ok "${R[pc_${k}s_med]}" le 50)"
    printf '%-52s %-28s %-12s %s\n' "  same, daemon-side mean ms (metrics)" "${R[pc_${k}s_daemon]}" "" ""
    printf '%-52s %-28s %-12s %s\n' "  HTTPS keep-alive: median / p90 ms" "${R[pc_${k}h_med]} / ${R[pc_${k}h_p90]}" "<= 50" "$(ok "${R[pc_${k}h_med]}" le 50)"
    printf '%-52s %-28s %-12s %s\n' "  same, daemon-side mean ms (metrics)" "${R[pc_${k}h_daemon]}" "" ""
done
if [ -n "${R[pc_q_domains]:-}" ]; then
printf '%-52s %-28s %-12s %s\n' "  libvirt domains defined by the qemu creates" "${R[pc_q_domains]}" "40" ""
printf '%-52s %-28s %-12s %s\n' "  DELETE each (qemu:///system, ms)" "${R[pc_q_delete_each]}" "" ""
fi
if [ -n "${R[pcon_https_med]:-}" ]; then
printf '%-52s %-28s %-12s %s\n' "console guest: start -> NOVACRON-GUEST-UP (ms); load" "${R[pcon_boot]}; ${R[pcon_load]}" "" ""
printf '%-52s %-28s %-12s %s\n' "console echo round trip, wss:// HTTPS: median / p90 ms" "${R[pcon_https_med]} / ${R[pcon_https_p90]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  min / max ms" "${R[pcon_https_min]} / ${R[pcon_https_max]}" "" ""
printf '%-52s %-28s %-12s %s\n' "console echo round trip, Unix socket: median / p90 ms" "${R[pcon_unix_med]} / ${R[pcon_unix_p90]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  min / max ms" "${R[pcon_unix_min]} / ${R[pcon_unix_max]}" "" ""
printf '%-52s %-28s %-12s %s\n' "baseline: the guest's pty directly: median / p90 ms" "${R[pcon_pty_med]} / ${R[pcon_pty_p90]}" "" ""
printf '%-52s %-28s %-12s %s\n' "  min / max ms" "${R[pcon_pty_min]} / ${R[pcon_pty_max]}" "" ""
fi
fi
echo
echo "load average at the end: $(loadavg)"
} | tee "$RESULTS/results.txt"
