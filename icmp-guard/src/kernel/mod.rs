//! The kernel side as the agent drives it: the enforcer (programs and maps) and the struct
//! offsets it hands the programs.
pub mod enforcer;
pub mod guard;
pub mod offsets;
pub mod pins;
pub mod state;
