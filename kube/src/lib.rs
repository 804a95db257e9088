//! Tessera's Kubernetes integration. The pure core: [`intent`] (pod and namespace
//! annotations and labels to the pod intents the CNI plugin reads) and [`decisions`]
//! (sticky addresses, leak GC by Calico's rule, Node deletion as decommission), [`sync`] (the
//! controller's state machine); [`controller`] is the kube-rs adapter.

pub mod controller;
pub mod decisions;
pub mod intent;
pub mod sync;
