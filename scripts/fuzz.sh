#!/usr/bin/env bash
# Fuzzes the BGP message decoder for a bounded time (default 60 s).
# cargo-fuzz wants nightly rustc flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../routed"
SECONDS_TO_RUN=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 cargo fuzz run decode -- -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=2048
