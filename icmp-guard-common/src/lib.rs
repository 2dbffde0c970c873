//! Types shared by the icmp-guard kernel programs and the agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side writes these bytes into maps and
//! the ring buffer, and userspace reads the very same layout. Keep fields explicitly padded so the
//! layout is identical on both sides and no uninitialised padding reaches a map key.
#![no_std]

pub mod class;
pub mod event;
pub mod guard;
pub mod maps;
pub mod offsets;

pub use class::{Class, classify};
