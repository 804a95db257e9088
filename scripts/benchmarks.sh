#!/usr/bin/env bash
# Runs Tessera's benchmarks and regenerates the generated section of BENCHMARKS.md (every
# ratio beside its target) and the plots in docs/benchmarks/ with tessera-benchreport.
#
#   scripts/benchmarks.sh                 # every benchmark (about 1.5 hours on 2 cores)
#   scripts/benchmarks.sh cni ipam        # some of them; the others keep their last run
#   scripts/benchmarks.sh --report        # only the report, from what is recorded
#   scripts/benchmarks.sh --list
#
# Each benchmark records its run in target/bench-results/<name>.json. Needs root (the
# benchmarks build network namespaces) and the programs scripts/install-deps.sh installs.
# SOAK_MINUTES (30) sets the soak's length.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL="cni ipam ipam_blocks tunnel ipip_vm pod_device_vm routed node_convergence scale_view scale_cluster soak"

run_one() {
  case "$1" in
    "cni") cargo bench -p tessera-cni --bench cni_latency ;;
    "ipam") ./target/release/ipam-bench ;;
    "ipam_blocks") ./target/release/ipam-blocks-bench ;;
    "tunnel") cargo bench -p tessera-tunnel --bench throughput ;;
    "ipip_vm") cargo bench -p tessera-tunnel --bench ipip_vm ;;
    "pod_device_vm") cargo bench -p tessera-cni --bench pod_device_vm ;;
    "routed") cargo bench -p tessera-routed --bench convergence ;;
    "node_convergence") cargo bench -p tessera-node --bench convergence ;;
    "scale_view") cargo bench -p tessera-node --bench scale_view ;;
    "scale_cluster") cargo bench -p tessera-node --bench scale_cluster ;;
    "soak") ./target/release/tessera-soak --minutes "${SOAK_MINUTES:-30}" ;;
    *) echo "unknown benchmark $1 (one of: $ALL)" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  --list) echo "$ALL"; exit 0 ;;
  --report) shift; set -- ;;
  "") set -- $ALL ;;
esac

# The benchmarks start the release binaries (agents, CNI plugin, speaker) next to them.
cargo build --release --workspace --bins
failed=()
for b in "$@"; do
  echo "== $b"
  # One benchmark failing does not cost the others' runs; the report says what it has.
  run_one "$b" || failed+=("$b")
done
./target/release/tessera-benchreport
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]} (their rows keep their last recorded run, if any)" >&2
  exit 1
fi
