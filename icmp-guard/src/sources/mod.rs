//! Sources of truth: KubeArmor policy files (and the embedded default), the agent config, and
//! the workloads policies select.
pub mod config;
pub mod policy;
pub mod workload;
