//! Sources of truth: KubeArmor policy files (and the embedded default), the agent config, and
//! the workloads policies select, and the network interfaces the guard can hold.
pub mod config;
pub mod interfaces;
pub mod policy;
pub mod workload;
