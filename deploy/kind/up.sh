#!/usr/bin/env bash
# Brings up deploy/kind/cluster.yaml with Tessera on it, using the cluster's own etcd (with
# its client certificates) as Tessera's datastore. Needs kind, kubectl and docker or podman;
# not run by CI. Usage: deploy/kind/up.sh [CLUSTER_NAME]
set -euo pipefail
# The operator's tools (this runs on their machine, not on the test bed).
KUBECTL=${KUBECTL:-kubectl}
KIND=${KIND:-kind}
cd "$(dirname "$0")/../.."
NAME=${1:-tessera}
VERSION=$(awk -F'"' '/^version =/ {print $2; exit}' Cargo.toml)
./deploy/image/build.sh --save /tmp/tessera-image.tar >/dev/null
"$KIND" create cluster --name "$NAME" --config deploy/kind/cluster.yaml
"$KIND" load image-archive --name "$NAME" /tmp/tessera-image.tar
CP="$NAME-control-plane"
ENGINE=$(command -v docker || command -v podman)
ETCD_IP=$("$ENGINE" inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$CP")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for f in ca.crt healthcheck-client.crt healthcheck-client.key; do
  "$ENGINE" exec "$CP" cat "/etc/kubernetes/pki/etcd/$f" > "$TMP/$f"
done
"$KUBECTL" -n kube-system create secret generic tessera-etcd-tls \
  --from-file=ca.pem="$TMP/ca.crt" --from-file=cert.pem="$TMP/healthcheck-client.crt" \
  --from-file=key.pem="$TMP/healthcheck-client.key"
"$KUBECTL" apply -f deploy/kubernetes/rbac.yaml
sed -e "s#https://10.0.0.1:2379#https://$ETCD_IP:2379#g" -e "s#localhost/tessera:[0-9.]*#localhost/tessera:$VERSION#" \
  deploy/kubernetes/tessera-node.yaml | "$KUBECTL" apply -f -
"$KUBECTL" -n kube-system rollout status ds/tessera-node --timeout=180s
POD=$("$KUBECTL" -n kube-system get pod -l k8s-app=tessera-node -o jsonpath='{.items[0].metadata.name}')
for p in deploy/pools/bgp.yaml deploy/pools/ipv6.yaml; do
  "$KUBECTL" -n kube-system exec -i "$POD" -- env ETCD_ENDPOINTS="https://$ETCD_IP:2379" \
    ETCD_CA_CERT_FILE=/etc/tessera/etcd/ca.pem ETCD_CERT_FILE=/etc/tessera/etcd/cert.pem \
    ETCD_KEY_FILE=/etc/tessera/etcd/key.pem tesseractl apply -f - < "$p"
done
echo "kind cluster $NAME is up with Tessera"
