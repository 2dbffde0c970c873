//! Sources of truth: KubeArmor policy files (and the embedded default), the agent config, the
//! Kubernetes API (pods, namespaces, this node, policy custom resources), the containers running
//! on this node, the workloads policies select, and the network interfaces the guard can hold.
pub mod config;
pub mod containers;
pub mod interfaces;
pub mod kubernetes;
pub mod policy;
pub mod workload;
