//! CLI commands beside `run`: `probe`, `test` (the seed's simulation) and the sandbox it runs
//! probes in.
pub mod guard_bench;
pub mod pod;
pub mod probe;
pub mod sandbox;
pub mod simulation;
pub mod unload;
