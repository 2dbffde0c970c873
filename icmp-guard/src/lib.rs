//! icmp-guard: the agent and CLI. See README.md for what each module is for.
pub mod agent;
pub mod alert;
pub mod audit;
pub mod compile;
pub mod config;
pub mod enforcer;
pub mod identity;
pub mod kernel_offsets;
pub mod policy;
pub mod probe;
pub mod sandbox;
pub mod simulation;
pub mod workload;
