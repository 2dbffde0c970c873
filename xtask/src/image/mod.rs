//! `cargo xtask image`: the agent as an OCI image, built on this machine without pulling
//! anything. The image holds the agent at `/usr/bin/icmp-guard`, exactly the shared libraries
//! `ldd` lists for it and the dynamic loader (with Debian's merged-/usr symlinks that lead to
//! them), a two-line `/etc/passwd` and `/etc/group`, an empty `/tmp`, and the licences of what
//! it ships. No shell, no package manager, no CA bundle: the agent talks to nothing but the
//! kernel today, and with in-cluster configuration the Kubernetes API's CA comes from the
//! service-account mount.
//!
//! The binary stays dynamically linked against the machine's glibc: a static glibc build
//! (`-C target-feature=+crt-static`) links, but glibc then loads NSS modules with dlopen at run
//! time for name lookups (the Kubernetes API host, later), which a static image cannot satisfy;
//! the musl target is not installed here and rustup's archive is not reachable.
//!
//! `cargo xtask image-test` (in [`import_test`]) proves the archive loads.

pub mod import_test;
pub mod oci;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::vm::{self, initramfs, workspace_root};
use oci::{ImageSpec, Node, Tree};

pub const REPOSITORY: &str = "icmp-guard";
const GUEST_AGENT: &str = "/usr/bin/icmp-guard";

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Use this agent binary instead of building `-p icmp-guard --release`
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Where to write the archive (default: <target>/image/icmp-guard.tar)
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
}

pub fn run(args: ImageArgs) -> Result<()> {
    let built = build(args.agent.as_deref(), args.output.as_deref())?;
    built.print();
    Ok(())
}

/// A written archive.
pub struct Built {
    pub path: PathBuf,
    pub archive: oci::Archive,
    pub agent_size: u64,
    pub files: Vec<String>,
    pub tags: Vec<String>,
}

impl Built {
    pub fn print(&self) {
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        let a = &self.archive;
        println!(
            "image: {} ({:.2} MiB), tags {}",
            self.path.display(),
            mib(a.bytes.len() as u64),
            self.tags.join(" ")
        );
        println!(
            "  manifest {} (config {})",
            a.manifest_digest, a.config_digest
        );
        println!("  names    {}", a.names.join(" "));
        println!(
            "  layer    {} ({:.2} MiB gzip, {:.2} MiB uncompressed; agent {:.2} MiB)",
            a.layer_digest,
            mib(a.layer_size),
            mib(a.layer_uncompressed_size),
            mib(self.agent_size)
        );
        println!("  files    {}", self.files.join(" "));
    }
}

pub fn build(agent: Option<&Path>, output: Option<&Path>) -> Result<Built> {
    let agent = match agent {
        Some(p) => p.to_path_buf(),
        None => vm::test::build_agent()?,
    };
    let agent_bytes = fs::read(&agent).with_context(|| format!("reading {}", agent.display()))?;
    if !initramfs::is_elf(&agent)? {
        bail!("{} is not an ELF executable", agent.display());
    }
    let version = workspace_version()?;
    let tree = image_tree(&agent, agent_bytes.clone())?;
    let tags = vec![version.clone(), "latest".to_string()];
    let spec = ImageSpec {
        repository: REPOSITORY.to_string(),
        tags: tags.clone(),
        entrypoint: vec![GUEST_AGENT.to_string()],
        cmd: vec!["run".to_string()],
        env: vec!["PATH=/usr/bin".to_string()],
        labels: BTreeMap::from([
            (
                "org.opencontainers.image.title".to_string(),
                REPOSITORY.to_string(),
            ),
            ("org.opencontainers.image.version".to_string(), version),
            (
                "org.opencontainers.image.licenses".to_string(),
                workspace_license()?,
            ),
        ]),
        epoch: source_date_epoch()?,
    };
    let archive = oci::build(&tree, &spec)?;

    let path = match output {
        Some(p) => p.to_path_buf(),
        None => vm::target_dir()?.join("image").join("icmp-guard.tar"),
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written beside and renamed, so a reader never sees half an archive.
    let tmp = path.with_extension("tar.partial");
    fs::write(&tmp, &archive.bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    let files = tree
        .nodes()
        .filter(|(_, n)| !matches!(n, Node::Dir { .. }))
        .map(|(p, _)| format!("/{p}"))
        .collect();
    Ok(Built {
        path,
        archive,
        agent_size: agent_bytes.len() as u64,
        files,
        tags: tags.iter().map(|t| format!("{REPOSITORY}:{t}")).collect(),
    })
}

/// The image's filesystem for `agent` (whose bytes are `agent_bytes`).
fn image_tree(agent: &Path, agent_bytes: Vec<u8>) -> Result<Tree> {
    let mut t = Tree::default();
    t.add_file(GUEST_AGENT, agent_bytes, 0o755)?;
    let libs = initramfs::ldd(agent)?;
    if libs.is_empty() {
        eprintln!("image: {} is static; no libraries added", agent.display());
    }
    let mut copyrights = BTreeMap::new();
    for lib in &libs {
        t.add_host(lib)?;
        let package = debian_package_of(lib)?;
        let copyright = PathBuf::from(format!("/usr/share/doc/{package}/copyright"));
        if !copyright.is_file() {
            bail!(
                "{} comes from {package}, which has no {}; its licence would be missing from the image",
                lib.display(),
                copyright.display()
            );
        }
        copyrights.insert(package, copyright);
    }
    // The licences of what the image redistributes (glibc, libgcc): Debian's copyright files.
    for copyright in copyrights.values() {
        t.add_file(
            &copyright.to_string_lossy(),
            fs::read(copyright).with_context(|| format!("reading {}", copyright.display()))?,
            0o644,
        )?;
    }
    t.add_file(
        "/usr/share/doc/icmp-guard/copyright",
        own_copyright()?.into_bytes(),
        0o644,
    )?;
    // root for the agent (it needs its capabilities), nobody for anything that asks.
    t.add_file(
        "/etc/passwd",
        b"root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n"
            .to_vec(),
        0o644,
    )?;
    t.add_file(
        "/etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    )?;
    t.insert("/tmp", Node::Dir { mode: 0o1777 })?;
    Ok(t)
}

/// The Debian package that ships `lib` (`dpkg -S`, trying the path as `ldd` printed it and
/// as it resolves, since merged /usr registers files under either).
fn debian_package_of(lib: &Path) -> Result<String> {
    let mut candidates = vec![lib.to_path_buf()];
    if let Ok(real) = fs::canonicalize(lib) {
        candidates.push(real.clone());
        if let Ok(rest) = real.strip_prefix("/usr") {
            candidates.push(Path::new("/").join(rest));
        }
    }
    for c in &candidates {
        let out = Command::new("dpkg")
            .arg("-S")
            .arg(c)
            .env("LC_ALL", "C")
            .output()
            .context("running dpkg -S")?;
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(pkg) = text
                .lines()
                .next()
                .and_then(|l| l.split_once(':'))
                .map(|(p, _)| p.trim().to_string())
            {
                return Ok(pkg);
            }
        }
    }
    bail!(
        "no Debian package ships {} (dpkg -S); its licence cannot be put into the image",
        lib.display()
    )
}

/// The project's own licence statement, from the workspace manifest, plus any licence texts
/// at the workspace root.
fn own_copyright() -> Result<String> {
    let license = workspace_license()?;
    let mut text = format!(
        "icmp-guard\nLicense: {license} (SPDX expression, from the workspace Cargo.toml)\n"
    );
    let root = workspace_root();
    let mut texts: Vec<PathBuf> = fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("LICENSE") || n.starts_with("LICENCE"))
        })
        .collect();
    texts.sort();
    for p in texts {
        text.push_str(&format!(
            "\n--- {} ---\n",
            p.file_name().unwrap_or_default().to_string_lossy()
        ));
        text.push_str(&fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?);
    }
    Ok(text)
}

fn icmp_guard_package() -> Result<serde_json::Value> {
    let meta = vm::cargo_metadata()?;
    meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == REPOSITORY).cloned())
        .context("`cargo metadata` lists no icmp-guard package")
}

pub fn workspace_version() -> Result<String> {
    icmp_guard_package()?["version"]
        .as_str()
        .map(str::to_string)
        .context("icmp-guard has no version in `cargo metadata`")
}

fn workspace_license() -> Result<String> {
    icmp_guard_package()?["license"]
        .as_str()
        .map(str::to_string)
        .context("icmp-guard has no license in `cargo metadata`")
}

/// Every mtime in the image and its `created` date: `SOURCE_DATE_EPOCH` if set (the
/// reproducible-builds convention), else 0, so the digest depends on the content only.
fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}
