#!/bin/bash
# Fuzzes the frame decoders with cargo-fuzz (libFuzzer), each target for
# SECONDS (default 300), and prints libFuzzer's summary of each (executions
# run). Usage: run.sh [SECONDS [TARGET...]]; the targets default to all:
# frame_decoder (peer link) and disk_frame_decoder (data plane to data
# plane). Needs the nightly toolchain and cargo-fuzz (`cargo install
# cargo-fuzz`). The corpus stays in tests/fuzz/corpus/TARGET (not
# committed). Each target writes its seeds (a frame of every message
# variant, as the current code encodes it) into tests/fuzz/seeds/TARGET
# before it reads the corpus, so each run starts from the wire version it
# fuzzes.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_decoder disk_frame_decoder)
for target in "${targets[@]}"; do
    echo "== $target: $seconds s"
    mkdir -p "corpus/$target" "seeds/$target"
    NOVACRON_FUZZ_SEEDS="seeds/$target" cargo +nightly fuzz run --fuzz-dir . "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=70000 -print_final_stats=1
done
