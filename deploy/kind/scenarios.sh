#!/usr/bin/env bash
# The Kubernetes integration's scenarios on a real cluster (after deploy/kind/up.sh, with
# tessera-kube-controllers deployed): an owned pool by label, a sticky StatefulSet pod back
# on another node with its address, a lost DEL released after the grace period, a Node
# deletion reclaimed. Needs kubectl and a kind cluster; not run by CI (README).
set -euo pipefail
# The operator's tools (this runs on their machine, not on the test bed).
KUBECTL=${KUBECTL:-kubectl}
cd "$(dirname "$0")/../.."
ctl() { "$KUBECTL" -n kube-system exec -i ds/tessera-node -- tesseractl "$@"; }
ctl apply -f - < deploy/pools/fixed-ten.yaml
"$KUBECTL" apply -f deploy/kubernetes/kube-controllers.yaml
"$KUBECTL" -n kube-system rollout status deploy/tessera-kube-controllers --timeout=120s

# An owned pool by label, and a sticky StatefulSet.
"$KUBECTL" apply -f deploy/kind/ledger-statefulset.yaml
"$KUBECTL" rollout status sts/ledger --timeout=120s
ip_of() { "$KUBECTL" get pod "$1" -o jsonpath='{.status.podIP}'; }
before=$(ip_of ledger-1)
case "$before" in 10.244.224.*) echo "ledger-1 has $before from the owned pool" ;; *) echo "FAIL: $before"; exit 1 ;; esac
first_node=$("$KUBECTL" get pod ledger-1 -o jsonpath='{.spec.nodeName}')
"$KUBECTL" cordon "$first_node"
"$KUBECTL" delete pod ledger-1 --wait
"$KUBECTL" wait --for=condition=Ready pod/ledger-1 --timeout=120s
"$KUBECTL" uncordon "$first_node"
after=$(ip_of ledger-1)
[ "$before" = "$after" ] || { echo "FAIL: ledger-1 came back with $after, not $before"; exit 1; }
echo "ledger-1 is back on $("$KUBECTL" get pod ledger-1 -o jsonpath='{.spec.nodeName}') with $after"

# Scale below it: its hold goes.
"$KUBECTL" scale sts/ledger --replicas=1
sleep 15
ctl ipam show --ip "$after" | grep -q free && echo "ledger-1's address is free after the scale-down"

# A Node deletion: decommissioned, reclaimed.
worker=$("$KUBECTL" get nodes -o name | grep worker | tail -1 | cut -d/ -f2)
"$KUBECTL" delete node "$worker"
sleep 10
ctl ipam check && echo "nothing leaked after deleting $worker"
