//! `cargo xtask vm-kernels`: fetches Debian's kernel packages and unpacks them under
//! `<cache>/vm/kernels/<suite>/` (`$ICMP_GUARD_CACHE`, default `/var/cache/icmp-guard`), once per
//! machine rather than once per clone.
//!
//! The package name carries an ABI number that changes with every point release, so
//! it is always resolved from `linux-image-amd64`'s dependency in the suite, never
//! written down here.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{Kernel, KernelChoice, check_host_packages, run_checked};

pub const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Written after a successful extraction: "<package> <version>". Its presence is what
/// makes a second run skip the work.
const STAMP: &str = ".icmp-guard-kernel";

#[derive(Debug, Args)]
pub struct VmKernelsArgs {
    /// Which kernel(s) to fetch
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: KernelChoice,
    /// Re-resolve and re-fetch even if a kernel is already unpacked (picks up a newer
    /// ABI after a Debian point release)
    #[arg(long)]
    pub refresh: bool,
}

pub fn run(args: VmKernelsArgs) -> Result<()> {
    check_host_packages(false)?;
    for kernel in args.kernel.kernels() {
        let k = ensure(kernel, args.refresh)?;
        println!(
            "{:<5} {:<9} {} {} -> {}",
            kernel.label(),
            kernel.suite(),
            k.package,
            k.version,
            k.vmlinuz.display()
        );
    }
    Ok(())
}

/// An unpacked kernel ready to boot.
#[derive(Debug, Clone)]
pub struct KernelImage {
    pub package: String,
    pub version: String,
    pub vmlinuz: PathBuf,
}

/// Makes sure the kernel for `kernel` is unpacked; downloads only what is missing.
pub fn ensure(kernel: Kernel, refresh: bool) -> Result<KernelImage> {
    // Kernels are downloaded once per machine, not once per clone.
    let vm = crate::cache::cache_dir().join("vm");
    let dest = vm.join("kernels").join(kernel.suite());
    if !refresh && let Some(img) = already_unpacked(&dest)? {
        return Ok(img);
    }

    let apt = AptState::new(kernel, &vm)?;
    let package = apt.resolve_image_package()?;
    let version = apt.candidate_version(&package)?;
    eprintln!(
        "vm-kernels: {} ({}) resolves to {package} {version}",
        kernel.label(),
        kernel.suite()
    );

    let debs = vm.join("debs").join(kernel.suite());
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = match find_deb(&debs, &package, &version)? {
        Some(deb) => deb,
        None => {
            eprintln!("vm-kernels: downloading {package} {version} ...");
            apt.download(&package, &version, &debs)?;
            find_deb(&debs, &package, &version)?.with_context(|| {
                format!(
                    "apt-get download {package}={version} succeeded but no .deb appeared in {}",
                    debs.display()
                )
            })?
        }
    };

    // Unpack into a fresh directory so that a half-finished earlier run (or an older
    // ABI) never mixes with this one; the stamp is written last.
    if dest.exists() {
        fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    eprintln!(
        "vm-kernels: unpacking {} into {}",
        deb.display(),
        dest.display()
    );
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
    let vmlinuz = find_vmlinuz(&dest)?;
    fs::write(dest.join(STAMP), format!("{package} {version}\n"))
        .with_context(|| format!("writing the stamp in {}", dest.display()))?;
    Ok(KernelImage {
        package,
        version,
        vmlinuz,
    })
}

fn already_unpacked(dest: &Path) -> Result<Option<KernelImage>> {
    let Ok(stamp) = fs::read_to_string(dest.join(STAMP)) else {
        return Ok(None);
    };
    let mut parts = stamp.split_whitespace();
    let (Some(package), Some(version)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    match find_vmlinuz(dest) {
        Ok(vmlinuz) => Ok(Some(KernelImage {
            package: package.to_string(),
            version: version.to_string(),
            vmlinuz,
        })),
        Err(_) => Ok(None),
    }
}

fn find_vmlinuz(dest: &Path) -> Result<PathBuf> {
    let boot = dest.join("boot");
    let mut found = Vec::new();
    for entry in fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("vmlinuz-") {
            found.push(entry.path());
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("no boot/vmlinuz-* in {}", dest.display()),
        _ => bail!(
            "several kernels in {}: {found:?}; remove the directory and run `cargo xtask vm-kernels` again",
            boot.display()
        ),
    }
}

/// apt-get names downloaded files `<pkg>_<version with ':' as %3a>_<arch>.deb`.
fn find_deb(dir: &Path, package: &str, version: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_{}_", version.replace(':', "%3a"));
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// Either the machine's own apt configuration (bookworm) or a private one under
/// `<target>/vm/apt/<suite>/` that leaves the machine's sources, lists and caches
/// untouched.
struct AptState {
    kernel: Kernel,
    /// `-o` options selecting the private state; empty for the machine's own.
    options: Vec<String>,
}

impl AptState {
    fn new(kernel: Kernel, vm: &Path) -> Result<AptState> {
        if kernel.uses_machine_sources() {
            return Ok(AptState {
                kernel,
                options: Vec::new(),
            });
        }
        let root = vm.join("apt").join(kernel.suite());
        let lists = root.join("lists");
        let cache = root.join("cache");
        fs::create_dir_all(lists.join("partial"))
            .with_context(|| format!("creating {}", lists.display()))?;
        fs::create_dir_all(cache.join("archives").join("partial"))
            .with_context(|| format!("creating {}", cache.display()))?;
        let sources = root.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by={ARCHIVE_KEYRING}] {MIRROR} {} main\n",
                kernel.suite()
            ),
        )
        .with_context(|| format!("writing {}", sources.display()))?;
        let options = vec![
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            // Keeps apt from rewriting the machine's /var/cache/apt/*.bin with
            // another suite's package cache.
            format!("Dir::Cache={}", cache.display()),
            // The lists and download directories belong to root; without this apt
            // warns that the unprivileged _apt user cannot write there.
            "APT::Sandbox::User=root".to_string(),
        ];
        let state = AptState { kernel, options };
        eprintln!(
            "vm-kernels: apt-get update for {} (private state in {})",
            kernel.suite(),
            root.display()
        );
        run_checked(state.command("apt-get").args(["-q", "update"]))
            .with_context(|| format!("updating the apt lists for {}", kernel.suite()))?;
        Ok(state)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in &self.options {
            cmd.arg("-o").arg(o);
        }
        // Parsing apt's output: make sure it is not translated.
        cmd.env("LC_ALL", "C");
        cmd
    }

    fn resolve_image_package(&self) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        match parse_image_dependency(&text) {
            Some(p) => Ok(p),
            None if self.options.is_empty() => bail!(
                "apt-cache knows no linux-image-amd64 dependency in this machine's sources \
                 (stderr: {}).\n  fix: apt-get update",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            None => bail!(
                "no linux-image-amd64 dependency found in {} (stderr: {})",
                self.kernel.suite(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    fn candidate_version(&self, package: &str) -> Result<String> {
        let out = run_checked(self.command("apt-cache").args(["policy", package]))?;
        parse_candidate(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
            format!(
                "apt-cache policy {package} shows no candidate in {}",
                self.kernel.suite()
            )
        })
    }

    fn download(&self, package: &str, version: &str, into: &Path) -> Result<()> {
        let mut cmd = self.command("apt-get");
        cmd.args(["-q", "download", &format!("{package}={version}")])
            .current_dir(into);
        if self.options.is_empty() {
            // Same reason as for the private state: `into` is root's.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        run_checked(&mut cmd)?;
        Ok(())
    }
}

/// `apt-cache depends linux-image-amd64` → the versioned image package, e.g.
/// `linux-image-6.1.0-56-amd64` (skips `<virtual>` and non-image dependencies).
fn parse_image_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_string)
}

fn parse_candidate(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_dependency() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_image_dependency(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let trixie = "linux-image-amd64\n  Depends: firmware-thing\n  Depends: linux-image-6.12.57+deb13-amd64\n";
        assert_eq!(
            parse_image_dependency(trixie).as_deref(),
            Some("linux-image-6.12.57+deb13-amd64")
        );
        assert_eq!(parse_image_dependency("linux-image-amd64\n"), None);
    }

    #[test]
    fn candidate() {
        let text = "linux-image-6.1.0-56-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n";
        assert_eq!(parse_candidate(text).as_deref(), Some("6.1.192-2"));
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
    }
}
