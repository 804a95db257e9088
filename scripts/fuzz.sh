#!/usr/bin/env bash
# Fuzzes every target in fuzz/ with libFuzzer for a bounded time each (default 60 s; the
# long budget is 3600): BGP decoder, speaker core, CNI config, CNI_ARGS, resource YAML,
# stored IPAM blocks.
# Each starts from the committed seeds in fuzz/corpus/<target>/ and adds what it finds
# there (only seed-* files are committed). CI runs the seeds and a few thousand variations
# of them as ordinary tests instead (tests/tests/fuzz_corpus.rs).
# cargo-fuzz wants nightly rustc flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET=${1:-60}
TARGETS=${2:-"bgp_decode speaker_core cni_config cni_args resources_yaml stored_block"}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in $TARGETS; do
  echo "== $t for ${SECONDS_PER_TARGET}s"
  mkdir -p "corpus/$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048
done
