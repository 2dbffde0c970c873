//! `icmp-guard unload`: removes a pinned set at once. Every socket is allowed again the moment
//! its link goes, whatever its lease says; a running agent keeps nothing pinned after this.

use std::path::PathBuf;

use anyhow::Result;

use crate::kernel::{enforcer, pins};

#[derive(clap::Args, Debug)]
pub struct UnloadArgs {
    /// The pin directory of the set to remove.
    #[arg(long, default_value = pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

pub fn run(args: &UnloadArgs) -> Result<()> {
    enforcer::check_root()?;
    let before = pins::status(&args.pin_dir);
    if !before.pinned && !args.pin_dir.exists() {
        println!(
            "nothing is pinned at {}: no icmp-guard programs to remove",
            args.pin_dir.display()
        );
        return Ok(());
    }
    let removed = pins::unload(&args.pin_dir)?;
    println!(
        "removed the pinned set at {} ({} pins{}); every socket is allowed again",
        args.pin_dir.display(),
        removed.len(),
        if before.agent_alive {
            format!(
                "; its agent, pid {}, still runs but no longer enforces: stop it",
                before.agent_pid
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
