#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 host, as root: installs what is
# missing (libvirt + QEMU from bookworm-backports, the tiny guest's parts),
# starts libvirtd, then lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup-host.sh
bash tests/guest/build-guest.sh "${NOVACRON_GUEST_DIR:-/var/tmp/novacron-guest}"

# A cold build from a clean clone: incremental compilation only adds work.
export CARGO_INCREMENTAL=0

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# --no-fail-fast: one failing test binary must not hide the others.
# --include-ignored: the tests that boot a real guest or need sushy-emulator
# are #[ignore] for a plain `cargo test`; here everything they need is set up.
cargo test --all-targets --locked --no-fail-fast -- --include-ignored
