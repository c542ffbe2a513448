#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 host, as root: installs what is
# missing (libvirt + QEMU from bookworm-backports, the tiny guest's parts),
# starts libvirtd, then lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup-host.sh
bash tests/guest/build-guest.sh "${NOVACRON_GUEST_DIR:-/var/tmp/novacron-guest}"

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# --no-fail-fast: one failing test binary must not hide the others.
cargo test --all-targets --locked --no-fail-fast
