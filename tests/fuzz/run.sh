#!/bin/bash
# Fuzzes the peer-link frame decoder with cargo-fuzz (libFuzzer) for
# SECONDS (default 300) and prints libFuzzer's summary (executions run).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# The corpus stays in tests/fuzz/corpus/ (not committed). The target
# writes its seeds (a frame of every Message variant, as the current code
# encodes it) into tests/fuzz/seeds/ before it reads the corpus, so each run
# starts from the wire version it fuzzes.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-300}
mkdir -p corpus/frame_decoder seeds/frame_decoder
NOVACRON_FUZZ_SEEDS=seeds/frame_decoder exec cargo +nightly fuzz run --fuzz-dir . frame_decoder \
    corpus/frame_decoder seeds/frame_decoder -- \
    -max_total_time="$seconds" -max_len=70000 -print_final_stats=1
