//! Booting Debian kernels under qemu (TCG) with a throw-away initramfs, so that the
//! BPF LSM path can be tested: the host kernel here refuses LSM programs.
//!
//! Layout of the caches (never committed):
//! - under `<cache>/vm/` (`$ICMP_GUARD_CACHE`, default `/var/cache/icmp-guard`: outside the
//!   clone, so a fresh clone does not download the kernels again):
//!   - `apt/<suite>/`: a separate apt state for suites other than the machine's own
//!   - `debs/<suite>/`: downloaded kernel packages
//!   - `kernels/<suite>/`: `dpkg-deb -x` of the kernel package (`boot/vmlinuz-*`)
//! - under `<target>/vm/`:
//!   - `initramfs/`: the staging tree and the packed `initrd.gz` of the last run
//!   - `logs/<kernel>-<timestamp>.log`: the serial console of every boot

pub mod initramfs;
pub mod kernels;
pub mod qemu;
pub mod run;
pub mod systemd;
pub mod test;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;

/// The Debian kernels the VM tests run on, named by their upstream series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kernel {
    /// bullseye (Debian 11)
    #[value(name = "5.10")]
    V5_10,
    /// bookworm (Debian 12, this machine's own suite)
    #[value(name = "6.1")]
    V6_1,
    /// trixie (Debian 13)
    #[value(name = "6.12")]
    V6_12,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::V5_10, Kernel::V6_1, Kernel::V6_12];

    pub fn label(self) -> &'static str {
        match self {
            Kernel::V5_10 => "5.10",
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
        }
    }

    pub fn suite(self) -> &'static str {
        match self {
            Kernel::V5_10 => "bullseye",
            Kernel::V6_1 => "bookworm",
            Kernel::V6_12 => "trixie",
        }
    }

    /// bookworm is what this machine runs: its own apt sources already serve it, so
    /// no separate apt state is needed (and none is downloaded).
    pub fn uses_machine_sources(self) -> bool {
        self == Kernel::V6_1
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// `--kernel` of vm-kernels and vm-test: one kernel or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    #[value(name = "5.10")]
    V5_10,
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

impl KernelChoice {
    pub fn kernels(self) -> Vec<Kernel> {
        match self {
            KernelChoice::V5_10 => vec![Kernel::V5_10],
            KernelChoice::V6_1 => vec![Kernel::V6_1],
            KernelChoice::V6_12 => vec![Kernel::V6_12],
            KernelChoice::All => Kernel::ALL.to_vec(),
        }
    }
}

/// A command inside the VM exited non-zero (or the VM run failed in a way that has
/// an exit code to pass on); `main` exits with `code` after printing `message`.
#[derive(Debug)]
pub struct GuestExit {
    pub code: i32,
    pub message: String,
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for GuestExit {}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root; this is fixed at build time,
    // which is what we want: `cargo xtask` always builds it from this checkout.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// `cargo metadata --no-deps` of this workspace.
pub fn cargo_metadata() -> Result<serde_json::Value> {
    let out = Command::new(cargo_bin())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .context("running `cargo metadata`")?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")
}

/// Cargo's target directory for this workspace (honours CARGO_TARGET_DIR and
/// `build.target-dir`, which is why we ask cargo instead of assuming `target/`).
pub fn target_dir() -> Result<PathBuf> {
    let v = cargo_metadata()?;
    let dir = v["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// `<target>/vm`, created if missing.
pub fn vm_dir() -> Result<PathBuf> {
    let dir = target_dir()?.join("vm");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The cargo that started us (`cargo xtask` sets CARGO), so nested builds use the
/// same toolchain.
pub fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// Something the VM tooling needs from a Debian package.
struct Requirement {
    package: &'static str,
    present: fn() -> bool,
}

pub fn in_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Checks the Debian packages the VM runs need and names the one `apt-get install`
/// that fixes all missing ones (scripts/vm-deps.txt lists the same packages).
pub fn check_host_packages(need_qemu: bool) -> Result<()> {
    let mut reqs = vec![
        Requirement {
            package: "busybox-static",
            present: || Path::new(initramfs::BUSYBOX).is_file(),
        },
        Requirement {
            package: "cpio",
            present: || in_path("cpio"),
        },
        Requirement {
            package: "debian-archive-keyring",
            present: || Path::new(kernels::ARCHIVE_KEYRING).is_file(),
        },
    ];
    if need_qemu {
        reqs.insert(
            0,
            Requirement {
                package: "qemu-system-x86",
                present: || in_path("qemu-system-x86_64"),
            },
        );
    }
    let missing: Vec<&str> = reqs
        .iter()
        .filter(|r| !(r.present)())
        .map(|r| r.package)
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing Debian packages for the VM tests: {0}\n  fix: apt-get update && apt-get install -y {0}",
            missing.join(" ")
        );
    }
    Ok(())
}

/// UTC timestamp `YYYYMMDDTHHMMSSZ` for log names (no date crate for one format).
pub fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs)
}

pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run_checked(cmd: &mut Command) -> Result<std::process::Output> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("could not start {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "19700101T000000Z");
        assert_eq!(format_utc(951_782_400), "20000229T000000Z");
        assert_eq!(format_utc(1_767_225_599), "20251231T235959Z");
    }
}
