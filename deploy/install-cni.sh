#!/bin/sh
# Installs Tessera's CNI plugins and network configuration on a node: what the DaemonSet's
# init container runs (with the host's /opt/cni/bin and /etc/cni/net.d mounted).
#
#   install-cni.sh [BIN_SOURCE_DIR] [CONFLIST]
# Environment: CNI_BIN_DIR (default /opt/cni/bin), CNI_CONF_DIR (default /etc/cni/net.d),
#   TESSERA_ETCD_ENDPOINTS (comma-separated; replaces the conflist's endpoints),
#   TESSERA_NODENAME (written to /var/lib/tessera/nodename).
set -eu
SRC=${1:-$(dirname "$0")/../target/release}
CONF=${2:-$(dirname "$0")/10-tessera.conflist}
BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}
CONF_DIR=${CNI_CONF_DIR:-/etc/cni/net.d}
STATE_DIR=${TESSERA_STATE_DIR:-/var/lib/tessera}

mkdir -p "$BIN_DIR" "$CONF_DIR" "$STATE_DIR"
for b in tessera tessera-ipam; do
  [ -x "$SRC/$b" ] || { echo "install-cni: $SRC/$b not found (cargo build --release first)" >&2; exit 1; }
  # Copy then rename: a runtime never executes a half-written plugin.
  cp "$SRC/$b" "$BIN_DIR/.$b.tmp"
  chmod 0755 "$BIN_DIR/.$b.tmp"
  mv -f "$BIN_DIR/.$b.tmp" "$BIN_DIR/$b"
done

TMP="$CONF_DIR/.10-tessera.conflist.tmp"
if [ -n "${TESSERA_ETCD_ENDPOINTS:-}" ]; then
  EPS=$(printf '%s' "$TESSERA_ETCD_ENDPOINTS" | sed 's/[^,][^,]*/"&"/g')
  sed "s#\"etcdEndpoints\": \[[^]]*\]#\"etcdEndpoints\": [$EPS]#" "$CONF" > "$TMP"
else
  cp "$CONF" "$TMP"
fi
mv -f "$TMP" "$CONF_DIR/10-tessera.conflist"
if [ -n "${TESSERA_NODENAME:-}" ]; then
  printf '%s\n' "$TESSERA_NODENAME" > "$STATE_DIR/nodename"
fi
echo "install-cni: installed tessera, tessera-ipam in $BIN_DIR and 10-tessera.conflist in $CONF_DIR"
