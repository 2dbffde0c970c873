//! The project's cache directory, outside the clone.
//!
//! CI runs every submission in a fresh clone, so anything expensive to rebuild (the
//! Kubernetes binaries take ~10 minutes on two cores) must not live in `target/`.
//! `$ICMP_GUARD_CACHE` moves it; the default is `/var/cache/icmp-guard`, which
//! survives across clones on the same machine.

use std::path::PathBuf;

/// Environment variable that overrides the cache location.
pub const CACHE_ENV: &str = "ICMP_GUARD_CACHE";
const DEFAULT_CACHE: &str = "/var/cache/icmp-guard";

/// `$ICMP_GUARD_CACHE` or `/var/cache/icmp-guard`, created if missing.
///
/// Panics only if the directory cannot be created, with the reason and the variable
/// that moves it: every caller needs the directory, and there is nothing sensible
/// to fall back on (the clone is exactly where the cache must not go).
pub fn cache_dir() -> PathBuf {
    let dir = std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!(
            "cannot create the cache directory {}: {e}; set {CACHE_ENV} to a writable directory",
            dir.display()
        );
    }
    dir
}
