//! icmp-guard: the agent and CLI.
//!
//! The modules follow the data path of `icmp-guard run`:
//! - [`sources`]: where the truth comes from: policy files, the agent config, workloads;
//! - [`compile`]: policies and workloads → the exact keys the kernel looks up, with executable
//!   identities resolved;
//! - [`kernel`]: the programs loaded and attached, the maps written, kernel struct offsets;
//! - [`events`]: decision records from the ring buffer → KubeArmor alerts;
//! - [`agent`]: the running agent that wires these stages together, with [`agent::guard`] for the
//!   inbound ICMP guard's.
//!
//! Beside them: [`audit`] (EC2-044 for security groups) and the other CLI commands in [`cli`].
pub mod agent;
pub mod audit;
pub mod cli;
pub mod compile;
pub mod events;
pub mod kernel;
pub mod outputs;
pub mod sources;
