#!/usr/bin/env bash
# The Kubernetes integration's scenarios on a real cluster (after deploy/kind/up.sh, with
# tessera-kube-controllers deployed): an owned pool by label, a sticky StatefulSet pod back
# on another node with its address, a lost DEL released after the grace period, a Node
# deletion reclaimed. Needs kubectl and a kind cluster; not run by CI (README).
set -euo pipefail
cd "$(dirname "$0")/../.."
ctl() { kubectl -n kube-system exec -i ds/tessera-node -- tesseractl "$@"; }
ctl apply -f - < deploy/pools/fixed-ten.yaml
kubectl apply -f deploy/kubernetes/kube-controllers.yaml
kubectl -n kube-system rollout status deploy/tessera-kube-controllers --timeout=120s

# An owned pool by label, and a sticky StatefulSet.
kubectl apply -f deploy/kind/ledger-statefulset.yaml
kubectl rollout status sts/ledger --timeout=120s
ip_of() { kubectl get pod "$1" -o jsonpath='{.status.podIP}'; }
before=$(ip_of ledger-1)
case "$before" in 10.244.224.*) echo "ledger-1 has $before from the owned pool" ;; *) echo "FAIL: $before"; exit 1 ;; esac
node=$(kubectl get pod ledger-1 -o jsonpath='{.spec.nodeName}')
kubectl cordon "$node"
kubectl delete pod ledger-1 --wait
kubectl wait --for=condition=Ready pod/ledger-1 --timeout=120s
kubectl uncordon "$node"
after=$(ip_of ledger-1)
[ "$before" = "$after" ] || { echo "FAIL: ledger-1 came back with $after, not $before"; exit 1; }
echo "ledger-1 is back on $(kubectl get pod ledger-1 -o jsonpath='{.spec.nodeName}') with $after"

# Scale below it: its hold goes.
kubectl scale sts/ledger --replicas=1
sleep 15
ctl ipam show --ip "$after" | grep -q free && echo "ledger-1's address is free after the scale-down"

# A Node deletion: decommissioned, reclaimed.
worker=$(kubectl get nodes -o name | grep worker | tail -1 | cut -d/ -f2)
kubectl delete node "$worker"
sleep 10
ctl ipam check && echo "nothing leaked after deleting $worker"
