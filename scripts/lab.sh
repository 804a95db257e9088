#!/usr/bin/env bash
# The lab: installs the Debian packages, builds, and brings up a cluster of network
# namespaces (etcd, a router, 4 nodes on 2 subnets, an agent per node, pools in every mode,
# pods through the real CNI plugin), prints who reaches whom, and tears it all down.
# Pass --keep to leave it up (Ctrl-C tears it down), --nodes N for more nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "the lab builds network namespaces: run it as root" >&2; exit 1; }
  exec sudo -E "$0" "$@"
fi
./scripts/install-deps.sh
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi
cargo build --workspace --bins --quiet
exec ./target/debug/tessera-lab "$@"
