#!/usr/bin/env bash
# Builds Tessera's image with podman, from Debian packages only (no container registry):
#   deploy/image/build.sh [--profile release|debug] [--tag TAG] [--save FILE.tar]
# The base (Debian minbase with iproute2, nftables and CA certificates, made by mmdebstrap
# from this machine's apt sources) is cached in /var/cache/tessera/image and imported once
# as localhost/tessera-base. Prints the image name. Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

PROFILE=release
TAG=$(awk -F'"' '/^version =/ {print $2; exit}' Cargo.toml)
SAVE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --save) SAVE=$2; shift 2 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "build.sh: podman and mmdebstrap need root here" >&2
  exit 1
fi

# The base: rebuilt only when its package list or the Debian release changes.
. /etc/os-release
PACKAGES=ca-certificates,iproute2,nftables
CACHE=/var/cache/tessera/image
BASE_TAR="$CACHE/base-$VERSION_CODENAME-$(printf '%s' "$PACKAGES" | sha256sum | cut -c1-12).tar"
mkdir -p "$CACHE"
if [ ! -s "$BASE_TAR" ]; then
  echo "build.sh: making the Debian $VERSION_CODENAME base with mmdebstrap" >&2
  # The mirror apt uses here (the only one reachable may be a local one).
  SOURCES=()
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then SOURCES=("$f"); break; fi
  done
  mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
    --customize-hook='rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/var/cache/apt/*' \
    --format=tar "$VERSION_CODENAME" "$BASE_TAR.tmp" "${SOURCES[@]}"
  mv -f "$BASE_TAR.tmp" "$BASE_TAR"
fi
BASE_ID=$(basename "$BASE_TAR" .tar)
if [ "$(podman image inspect --format '{{index .Labels "tessera.base"}}' localhost/tessera-base:latest 2>/dev/null || true)" != "$BASE_ID" ]; then
  podman import --quiet --change "LABEL tessera.base=$BASE_ID" "$BASE_TAR" localhost/tessera-base:latest >/dev/null
fi

# The binaries, stripped (the image carries no debug info).
BINS="tessera-node tessera-routed tesseractl tessera-kube-controllers tessera tessera-ipam"
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet $(printf -- "-p %s " tessera-node tessera-routed tesseractl tessera-kube-controllers tessera-cni)
  OUT=target/release
else
  cargo build --quiet --workspace --bins
  OUT=target/debug
fi
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/bin" "$CTX/deploy"
for b in $BINS; do
  strip -o "$CTX/bin/$b" "$OUT/$b"
done
cp deploy/install-cni.sh deploy/10-tessera.conflist "$CTX/deploy/"
podman build --quiet --pull=never -f deploy/image/Containerfile -t "localhost/tessera:$TAG" "$CTX" >/dev/null
if [ -n "$SAVE" ]; then
  podman save --quiet -o "$SAVE" "localhost/tessera:$TAG"
fi
echo "localhost/tessera:$TAG"
