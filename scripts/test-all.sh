#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what it needs, then format,
# lint, unit, property and end-to-end tests (network namespaces, real etcd). Needs root.
# Every test binary runs even when an earlier one fails; the last line is the summary.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "the tests build network namespaces: run them as root" >&2; exit 1; }
  exec sudo -E "$0" "$@"
fi

./scripts/install-deps.sh

# A fresh clone gains nothing from incremental caches, which double target/'s size.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests run the workspace's binaries (agent, CNI plugin, speaker) from target/.
cargo build --workspace --bins

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
sum() { grep -E '^test result:' "$log" | grep -oE "[0-9]+ $1" | awk '{s += $1} END {print s + 0}'; }
passed=$(sum passed)
failed=$(sum failed)
# A test binary that dies before its summary (a crash, a panic in a fixture) fails its
# target without a count: cargo lists the failed targets at the end.
targets=$(grep -cE '^    `-p ' "$log" || true)
echo
echo "$passed passed, $failed failed$([ "$targets" -gt 0 ] && echo " ($targets test binaries failed)")"
exit "$status"
