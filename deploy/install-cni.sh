#!/bin/sh
# Installs Tessera's CNI plugins and network configuration on a node: what the DaemonSet's
# init container runs (with the host's /opt/cni/bin and /etc/cni/net.d mounted).
#
#   install-cni.sh [BIN_SOURCE_DIR] [CONFLIST]
# Environment: CNI_BIN_DIR (default /opt/cni/bin), CNI_CONF_DIR (default /etc/cni/net.d),
#   ETCD_ENDPOINTS (comma-separated; replaces the conflist's endpoints; the older name
#   TESSERA_ETCD_ENDPOINTS is read too), ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE
#   (etcd's TLS files, e.g. a mounted Secret: copied to CNI_CONF_DIR/tessera-tls/, where the
#   plugin on the host reads them), TESSERA_NODENAME (written to /var/lib/tessera/nodename).
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
ENDPOINTS=${ETCD_ENDPOINTS:-${TESSERA_ETCD_ENDPOINTS:-}}
DATASTORE=""
if [ -n "$ENDPOINTS" ]; then
  DATASTORE="\"etcdEndpoints\": [$(printf '%s' "$ENDPOINTS" | sed 's/[^,][^,]*/"&"/g')]"
fi
TLS_DIR="$CONF_DIR/tessera-tls"
for spec in ETCD_CA_CERT_FILE:etcdCACertFile:ca.pem ETCD_CERT_FILE:etcdCertFile:cert.pem ETCD_KEY_FILE:etcdKeyFile:key.pem; do
  var=${spec%%:*}
  rest=${spec#*:}
  field=${rest%%:*}
  name=${rest#*:}
  eval "source_file=\${$var:-}"
  [ -n "$source_file" ] || continue
  [ -n "$ENDPOINTS" ] || { echo "install-cni: $var is set but ETCD_ENDPOINTS is not" >&2; exit 1; }
  [ -r "$source_file" ] || { echo "install-cni: $var: cannot read $source_file" >&2; exit 1; }
  mkdir -p "$TLS_DIR"
  cp "$source_file" "$TLS_DIR/.$name.tmp"
  chmod 0600 "$TLS_DIR/.$name.tmp"
  mv -f "$TLS_DIR/.$name.tmp" "$TLS_DIR/$name"
  DATASTORE="$DATASTORE, \"$field\": \"$TLS_DIR/$name\""
done
if [ -n "$DATASTORE" ]; then
  sed "s#^\( *\)\"datastore\": {.*},\$#\1\"datastore\": { $DATASTORE, \"timeoutMs\": 5000 },#" "$CONF" > "$TMP"
else
  cp "$CONF" "$TMP"
fi
# In a pod: a kubeconfig from its ServiceAccount for the plugin on the host (it reads a pod
# from the apiserver when the Kubernetes controllers have not written its intent yet).
SA_DIR=${SERVICEACCOUNT_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
if [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && [ -r "$SA_DIR/token" ]; then
  KUBECONFIG_FILE="$CONF_DIR/tessera-kubeconfig"
  CA_DATA=$(base64 -w0 < "$SA_DIR/ca.crt")
  TOKEN=$(cat "$SA_DIR/token")
  umask 077
  SERVER="https://${KUBERNETES_SERVICE_HOST}:${KUBERNETES_SERVICE_PORT:-443}"
  printf 'apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: %s\n    certificate-authority-data: %s\nusers:\n- name: tessera-cni\n  user:\n    token: %s\ncontexts:\n- name: tessera\n  context: { cluster: local, user: tessera-cni }\ncurrent-context: tessera\n' \
    "$SERVER" "$CA_DATA" "$TOKEN" > "$KUBECONFIG_FILE.tmp"
  mv -f "$KUBECONFIG_FILE.tmp" "$KUBECONFIG_FILE"
  sed "s#^\( *\)\"datastore\": \(.*\)\$#\1\"datastore\": \2\n\1\"kubernetes\": { \"kubeconfig\": \"$KUBECONFIG_FILE\" },#" "$TMP" > "$TMP.k"
  mv -f "$TMP.k" "$TMP"
fi
mv -f "$TMP" "$CONF_DIR/10-tessera.conflist"
if [ -n "${TESSERA_NODENAME:-}" ]; then
  printf '%s\n' "$TESSERA_NODENAME" > "$STATE_DIR/nodename"
fi
echo "install-cni: installed tessera, tessera-ipam in $BIN_DIR and 10-tessera.conflist in $CONF_DIR"
