#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what it needs, then format,
# lint, unit, property and end-to-end tests (network namespaces, real etcd). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi

./scripts/install-deps.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests run the workspace's binaries (agent, CNI plugin, speaker) from target/.
cargo build --workspace --bins
cargo test --workspace
