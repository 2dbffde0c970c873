//! icmp-guard: the agent and CLI. See README.md for what each module is for.
pub mod audit;
pub mod config;
pub mod policy;
