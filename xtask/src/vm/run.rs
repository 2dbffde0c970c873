//! `cargo xtask vm-run`: the VM runner exposed directly, for debugging.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::initramfs::{self, Include};
use super::qemu::{self, DEFAULT_TIMEOUT_SECS, VmSpec};
use super::{GuestExit, Kernel};

#[derive(Debug, Args)]
pub struct VmRunArgs {
    /// Kernel to boot
    #[arg(long, value_enum, default_value = "6.1")]
    pub kernel: Kernel,
    /// Host file or directory to put in the VM: HOST (same path inside, with its
    /// shared libraries) or HOST:GUEST (copied to GUEST)
    #[arg(long = "include", value_name = "PATH")]
    pub includes: Vec<String>,
    /// Include /usr/bin/python3 and its standard library
    #[arg(long)]
    pub python: bool,
    /// Environment variable for the command, K=V
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Seconds before the VM is killed and the run counts as failed
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Command and arguments run as root inside the VM (PATH lookup inside)
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(args: VmRunArgs) -> Result<()> {
    let mut includes = args
        .includes
        .iter()
        .map(|s| Include::parse(s))
        .collect::<Result<Vec<_>>>()?;
    // An absolute host program given as the command is obviously meant to be there.
    if let Some(first) = args.command.first() {
        let p = Path::new(first);
        if p.is_absolute() && p.exists() && !includes.iter().any(|i| i.host == p) {
            includes.push(Include::same(p));
        }
    }
    if args.python {
        includes.extend(initramfs::python_includes()?);
    }
    let spec = VmSpec {
        kernel: args.kernel,
        includes,
        empty_dirs: Vec::<PathBuf>::new(),
        env: parse_env(&args.env)?,
        command: args.command,
        timeout: Duration::from_secs(args.timeout),
    };
    let outcome = qemu::run(&spec)?;
    if outcome.exit_code != 0 {
        return Err(GuestExit {
            code: outcome.exit_code,
            message: format!(
                "the command exited with code {} inside the VM (log: {})",
                outcome.exit_code,
                outcome.log.display()
            ),
        }
        .into());
    }
    Ok(())
}

pub fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {kv}: expected K=V"))
        })
        .collect()
}
