//! `cargo xtask image-test`: builds the image archive (or takes one) and proves that the real
//! loaders accept it under the right names, and that the agent runs from it:
//!
//! 1. a throw-away containerd (Debian's 1.6) with its own config, root, state and socket in a
//!    scratch directory, the CRI plugin off: `ctr -n k8s.io images import`, then both tags must
//!    be listed with our manifest digest, then `ctr run` of the image with `--version`;
//! 2. podman with its own storage root, run root and tmp dir: `podman load -i`, both tags
//!    listed, then `podman run --rm --privileged icmp-guard:latest --version`, which goes through
//!    the image's entrypoint.
//!
//! Nothing is shared with another containerd or podman on the machine. A missing containerd,
//! ctr or podman is a failure that names the package, never a skip.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{REPOSITORY, oci, workspace_version};
use crate::vm::{in_path, run_checked};

#[derive(Debug, Args)]
pub struct ImageTestArgs {
    /// Test this archive instead of building one with `cargo xtask image`
    #[arg(long, value_name = "PATH")]
    pub archive: Option<PathBuf>,
    /// Agent binary for the image built here (default: build `-p icmp-guard --release`)
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Only import into containerd and check the tags (no `ctr run`, no podman)
    #[arg(long)]
    pub import_only: bool,
}

pub fn run(args: ImageTestArgs) -> Result<()> {
    let start = Instant::now();
    require_tools(!args.import_only)?;
    let (archive, manifest_digest) = match &args.archive {
        Some(p) => (p.clone(), manifest_digest_of(p)?),
        None => {
            let built = super::build(args.agent.as_deref(), None)?;
            built.print();
            (built.path, built.archive.manifest_digest)
        }
    };
    let version = workspace_version()?;
    let tags = [version.clone(), "latest".to_string()];
    let scratch = Scratch::new()?;
    println!("image-test: scratch directory {}", scratch.dir.display());

    let t = Instant::now();
    let ctrd = Containerd::start(&scratch.dir.join("containerd"))?;
    let out = ctrd.ctr(&["images", "import", &archive.to_string_lossy()])?;
    print!("{out}");
    let listed = ctrd.ctr(&["images", "ls"])?;
    for tag in &tags {
        let name = oci::containerd_name(REPOSITORY, tag);
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .with_context(|| {
                format!("containerd did not list {name} after the import:\n{listed}")
            })?;
        if !line.contains(&manifest_digest) {
            bail!("containerd lists {name} with another digest than {manifest_digest}:\n{line}");
        }
        println!("image-test: containerd has {name} ({manifest_digest})");
    }
    if !args.import_only {
        let id = format!("icmp-guard-image-test-{}", std::process::id());
        let latest = oci::containerd_name(REPOSITORY, "latest");
        let fifo = scratch.dir.join("fifo");
        let out = ctrd.ctr(&[
            "run",
            "--rm",
            "--fifo-dir",
            &fifo.to_string_lossy(),
            &latest,
            &id,
            "/usr/bin/icmp-guard",
            "--version",
        ])?;
        check_version(&out, &version, "ctr run")?;
    }
    ctrd.stop()?;
    println!(
        "image-test: containerd import{} passed in {:.1} s",
        if args.import_only { "" } else { " and run" },
        t.elapsed().as_secs_f64()
    );

    if !args.import_only {
        let t = Instant::now();
        let podman = Podman::new(&scratch.dir.join("podman"))?;
        print!(
            "{}",
            podman.run(&["load", "-i", &archive.to_string_lossy()])?
        );
        let listed = podman.run(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.Digest}}"])?;
        for tag in &tags {
            let found = listed.lines().find(|l| {
                l.split_whitespace().next().is_some_and(|n| {
                    n == format!("localhost/{REPOSITORY}:{tag}")
                        || n == oci::containerd_name(REPOSITORY, tag)
                })
            });
            let Some(line) = found else {
                bail!("podman did not list {REPOSITORY}:{tag} after `podman load`:\n{listed}");
            };
            println!("image-test: podman has {line}");
        }
        let out = podman.run(&[
            "run",
            "--rm",
            "--privileged",
            "--network",
            "none",
            // podman raises RLIMIT_NOFILE (to 1048576) for the container by default, which
            // needs CAP_SYS_RESOURCE where runc sets it; where that capability is missing (as
            // on this machine), the container never starts. Lowering is always allowed.
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            &format!("{REPOSITORY}:latest"),
            "--version",
        ])?;
        check_version(&out, &version, "podman run")?;
        println!(
            "image-test: podman load and run passed in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    drop(scratch);
    println!(
        "image-test: ok ({}; {:.1} s)",
        archive.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn check_version(out: &str, version: &str, what: &str) -> Result<()> {
    let want = format!("icmp-guard {version}");
    if !out.lines().any(|l| l.trim() == want) {
        bail!("{what}: expected `{want}` from the agent in the image, got:\n{out}");
    }
    println!("image-test: {what} printed `{want}`");
    Ok(())
}

fn require_tools(all: bool) -> Result<()> {
    let mut missing = Vec::new();
    for (tool, package) in [("containerd", "containerd"), ("ctr", "containerd")] {
        if !in_path(tool) {
            missing.push(package);
        }
    }
    if all {
        if !in_path("podman") {
            missing.push("podman");
        }
        if !in_path("runc") {
            missing.push("runc");
        }
    }
    missing.dedup();
    if !missing.is_empty() {
        bail!(
            "image-test needs {0}, missing here: apt-get install -y {0} (scripts/setup.sh does)",
            missing.join(" ")
        );
    }
    Ok(())
}

/// The manifest digest of an archive written by `cargo xtask image` (read from index.json).
fn manifest_digest_of(archive: &Path) -> Result<String> {
    let f = fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut ar = tar::Archive::new(f);
    for e in ar.entries()? {
        let mut e = e?;
        if e.path()?.as_os_str() == "index.json" {
            let v: serde_json::Value = serde_json::from_reader(&mut e)?;
            return v["manifests"][0]["digest"]
                .as_str()
                .map(str::to_string)
                .context("index.json has no manifest digest");
        }
    }
    bail!(
        "{} has no index.json: not an OCI archive",
        archive.display()
    )
}

/// A scratch directory in the system temp dir (short: the containerd socket path must fit in
/// 108 bytes); everything mounted under it is unmounted and it is removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Scratch> {
        let dir =
            std::env::temp_dir().join(format!("icmp-guard-image-test-{}", std::process::id()));
        if dir.exists() {
            cleanup_dir(&dir);
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        cleanup_dir(&self.dir);
    }
}

/// Unmounts whatever containerd's or podman's overlay storage left mounted under `dir`
/// (deepest first), then removes it.
fn cleanup_dir(dir: &Path) {
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(unescape_mount))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let c = std::ffi::CString::new(m.clone()).unwrap_or_default();
        // SAFETY: a plain syscall on a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "image-test: could not unmount {m}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("image-test: could not remove {}: {e}", dir.display());
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

struct Containerd {
    child: Option<Child>,
    socket: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Result<Containerd> {
        fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        // Everything containerd writes goes under `dir`: root, state, sockets, /opt plugin.
        // CRI is off: an import needs none of it, and it would look for CNI and a pause image.
        fs::write(
            &config,
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
                opt = dir.join("opt").display(),
            ),
        )?;
        let log_path = dir.join("containerd.log");
        let log = fs::File::create(&log_path)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd (apt-get install -y containerd)")?;
        let mut c = Containerd {
            child: Some(child),
            socket,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = c.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                c.child = None;
                bail!(
                    "containerd exited with {status} at start; its log:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if c.socket.exists() && c.ctr(&["version"]).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} within 30 s; its log:\n{}",
                    c.socket.display(),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(c)
    }

    fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = run_checked(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["--namespace", "k8s.io"])
                .args(args),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    /// SIGTERM to our containerd (and to any shim it left, found by our socket in its command
    /// line), SIGKILL after 10 s.
    fn shutdown(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        for pid in shims_of(&self.socket) {
            // SAFETY: plain syscall on a pid whose command line names our private socket.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                child.wait()?;
                bail!(
                    "containerd did not stop on SIGTERM within 10 s (killed); log in {}",
                    self.dir.display()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("image-test: {e:#}");
        }
    }
}

/// containerd-shim processes started for the containerd on `socket`.
fn shims_of(socket: &Path) -> Vec<i32> {
    let want = socket.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_shim = args.first().is_some_and(|a| a.contains("containerd-shim"));
        if is_shim && args.contains(&want) {
            pids.push(pid);
        }
    }
    pids
}

/// podman with private storage, run and tmp directories, cgroupfs and no event log, so it
/// shares nothing with another podman on the machine.
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Result<Podman> {
        for d in ["root", "run", "tmp"] {
            fs::create_dir_all(dir.join(d))?;
        }
        Ok(Podman {
            dir: dir.to_path_buf(),
        })
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = run_checked(
            Command::new("podman")
                .arg("--root")
                .arg(self.dir.join("root"))
                .arg("--runroot")
                .arg(self.dir.join("run"))
                .arg("--tmpdir")
                .arg(self.dir.join("tmp"))
                .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
                .args(args)
                .env("LC_ALL", "C"),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
