//! `cargo xtask k8s build`: the Debian packages the cluster needs, Kubernetes 1.20
//! built from Debian bookworm's `kubernetes` source package, and the two images.
//!
//! No registry ships Kubernetes server binaries for this machine, but bookworm's
//! source package carries the whole vendor tree and builds offline. Everything goes
//! to `<cache>/k8s/` (see `mod.rs`); a second run finds the binaries and images there
//! and only checks that the packages are still installed.

use std::fs;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{BINARIES, Layout, image, run_checked};
use crate::vm::timestamp;

/// Debian packages the harness uses, by what needs them. `start`/`stop` need the
/// runtime ones; the build needs the toolchain ones; the testbox image copies
/// busybox, ping, hping3 and bash from the host.
const PACKAGES: &[&str] = &[
    // runtime
    "etcd-server",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    // `nft delete table`: the only way to remove a table iptables-nft created, so
    // that `stop` leaves `iptables-save` exactly as it was
    "nftables",
    "iproute2",
    "openssl",
    // build
    "golang-go",
    "rsync",
    "jq",
    "make",
    "gcc",
    "libc6-dev",
    "golang-github-modern-go-reflect2-dev",
    "debian-archive-keyring",
    // image contents
    "busybox-static",
    "hping3",
    "iputils-ping",
    "bash",
];

/// The Debian source package and what it unpacks to.
const SOURCE_PACKAGE: &str = "kubernetes";
const SUITE: &str = "bookworm";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// The vendored reflect2 1.0.1 crashes the apiserver under Go >= 1.18 on the first
/// custom-resource create; Debian's packaged reflect2 is the fixed one.
const REFLECT2_DEBIAN: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";
const REFLECT2_VENDOR: &str = "vendor/github.com/modern-go/reflect2";

pub fn run() -> Result<()> {
    let layout = Layout::new()?;
    let t0 = Instant::now();
    ensure(&layout)?;
    println!(
        "k8s build: binaries in {}, images in {} ({:.0} s)",
        layout.bin.display(),
        layout.images.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Packages, binaries, images: each step only if its result is missing.
pub fn ensure(layout: &Layout) -> Result<()> {
    ensure_packages()?;
    if !binaries_present(layout) {
        build_binaries(layout)?;
    }
    if !image::images_present(layout) {
        let pause_c = layout
            .source_tree_if_unpacked()
            .map(|t| t.join("build/pause/linux/pause.c"))
            .filter(|p| p.is_file());
        let pause_c = match pause_c {
            Some(p) => p,
            None => unpack_source(layout)?.join("build/pause/linux/pause.c"),
        };
        image::build_images(layout, &pause_c)?;
    }
    Ok(())
}

pub fn binaries_present(layout: &Layout) -> bool {
    BINARIES.iter().all(|b| is_executable(&layout.bin.join(b)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Installs the missing packages in one apt-get call (after an `apt-get update`,
/// since a fresh machine's lists may be empty or stale).
fn ensure_packages() -> Result<()> {
    let missing = missing_packages(PACKAGES)?;
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "k8s build: installing Debian packages: {}",
        missing.join(" ")
    );
    run_checked(
        Command::new("apt-get")
            .args(["-q", "update"])
            .env("LC_ALL", "C"),
    )
    .context("apt-get update failed; the packages cannot be installed without it")?;
    run_checked(
        Command::new("apt-get")
            .args(["-q", "-y", "--no-install-recommends", "install"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))?;
    let still = missing_packages(PACKAGES)?;
    if !still.is_empty() {
        bail!(
            "still not installed after apt-get install: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn missing_packages(pkgs: &[&str]) -> Result<Vec<String>> {
    // One dpkg-query for all of them; unknown packages make it exit 1 but still
    // print the known ones, so the exit status is not used.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status}\n"])
        .args(pkgs)
        .env("LC_ALL", "C")
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, s)| s.trim() == "installed")
        .map(|(p, _)| p.split(':').next().unwrap_or(p))
        .collect();
    Ok(pkgs
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

/// The machine's own Debian mirror: the first `URIs:` of a deb822 stanza that serves
/// bookworm, else a `deb` line of sources.list, else deb.debian.org.
fn machine_mirror() -> String {
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        && let Some(uri) = mirror_from_deb822(&text)
    {
        return uri;
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list")
        && let Some(uri) = mirror_from_list(&text)
    {
        return uri;
    }
    FALLBACK_MIRROR.to_string()
}

fn mirror_from_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .next()
        };
        let suites = field("Suites:").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == SUITE)
            && let Some(uris) = field("URIs:")
            && let Some(uri) = uris.split_whitespace().next()
        {
            return Some(uri.to_string());
        }
    }
    None
}

fn mirror_from_list(text: &str) -> Option<String> {
    text.lines()
        .map(str::split_whitespace)
        .filter_map(|mut w| {
            if w.next()? != "deb" {
                return None;
            }
            let mut uri = w.next()?;
            if uri.starts_with('[') {
                // options: skip up to the closing bracket
                while !uri.ends_with(']') {
                    uri = w.next()?;
                }
                uri = w.next()?;
            }
            (w.next()? == SUITE).then(|| uri.to_string())
        })
        .next()
}

/// Downloads (once) and unpacks (once) the source package's upstream tarball under
/// `<cache>/k8s/src/`, with the reflect2 replacement applied. Debian's own patches
/// are not applied: they target Debian's build system, not `make WHAT=...`.
fn unpack_source(layout: &Layout) -> Result<PathBuf> {
    if let Some(tree) = layout.source_tree_if_unpacked() {
        return Ok(tree);
    }
    fs::create_dir_all(&layout.src)
        .with_context(|| format!("creating {}", layout.src.display()))?;
    let orig = match find_orig_tarball(&layout.src)? {
        Some(t) => t,
        None => {
            download_source(layout)?;
            find_orig_tarball(&layout.src)?.with_context(|| {
                format!(
                    "apt-get source --download-only {SOURCE_PACKAGE} left no *.orig.tar.gz in {}",
                    layout.src.display()
                )
            })?
        }
    };
    // Unpack into a scratch directory and rename at the end, so a half-unpacked tree
    // is never mistaken for a complete one.
    let scratch = layout.src.join("unpack.tmp");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    eprintln!("k8s build: unpacking {}", orig.display());
    run_checked(
        Command::new("tar")
            .arg("-xzf")
            .arg(&orig)
            .arg("-C")
            .arg(&scratch),
    )?;
    let top = fs::read_dir(&scratch)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("build/pause/linux/pause.c").is_file())
        .with_context(|| format!("{} holds no Kubernetes tree", orig.display()))?;

    let vendored = top.join(REFLECT2_VENDOR);
    if !Path::new(REFLECT2_DEBIAN).is_dir() {
        bail!(
            "{REFLECT2_DEBIAN} is missing: apt-get install -y golang-github-modern-go-reflect2-dev"
        );
    }
    fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    run_checked(
        Command::new("cp")
            .arg("-r")
            .arg(REFLECT2_DEBIAN)
            .arg(&vendored),
    )?;
    // Kubernetes 1.20 builds only in GOPATH mode, from k8s.io/kubernetes.
    let gopath_src = top.join(".go/src/k8s.io");
    fs::create_dir_all(&gopath_src)?;
    std::os::unix::fs::symlink("../../..", gopath_src.join("kubernetes"))
        .context("linking .go/src/k8s.io/kubernetes")?;

    let tree = layout.src.join("kubernetes");
    fs::rename(&top, &tree)
        .with_context(|| format!("moving {} to {}", top.display(), tree.display()))?;
    fs::remove_dir_all(&scratch)?;
    Ok(tree)
}

fn find_orig_tarball(dir: &Path) -> Result<Option<PathBuf>> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&format!("{SOURCE_PACKAGE}_")) && name.ends_with(".orig.tar.gz") {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// `apt-get source --download-only kubernetes` through a private apt state that has
/// a deb-src line for the machine's own mirror, leaving the machine's sources,
/// lists and caches untouched.
fn download_source(layout: &Layout) -> Result<()> {
    let apt = &layout.apt;
    let lists = apt.join("lists");
    let cache = apt.join("cache");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(cache.join("archives/partial"))?;
    let mirror = machine_mirror();
    let sources = apt.join("sources.list");
    fs::write(
        &sources,
        format!("deb-src [signed-by={KEYRING}] {mirror} {SUITE} main\n"),
    )
    .with_context(|| format!("writing {}", sources.display()))?;
    let apt_cmd = |program: &str| {
        let mut c = Command::new(program);
        for o in [
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            "APT::Sandbox::User=root".to_string(),
        ] {
            c.arg("-o").arg(o);
        }
        c.env("LC_ALL", "C");
        c
    };
    eprintln!(
        "k8s build: fetching the {SUITE} source index from {mirror} (private apt state in {})",
        apt.display()
    );
    run_checked(apt_cmd("apt-get").args(["-q", "update"]))
        .context("apt-get update with the private deb-src state")?;
    eprintln!("k8s build: downloading the {SOURCE_PACKAGE} source package ...");
    run_checked(
        apt_cmd("apt-get")
            .args(["-q", "source", "--download-only", SOURCE_PACKAGE])
            .current_dir(&layout.src),
    )?;
    Ok(())
}

/// `make WHAT=...` in GOPATH mode with CGO off (static binaries), logged to a file,
/// with a progress line every 30 s. Kubernetes' scripts put Go's build cache in
/// `_output/local/go/cache` inside the tree, which is in the cache dir too, so a
/// rebuild after the binaries were deleted is much faster than a cold one.
fn build_binaries(layout: &Layout) -> Result<()> {
    let tree = unpack_source(layout)?;
    let gopath = tree.join(".go");
    let workdir = gopath.join("src/k8s.io/kubernetes");
    fs::create_dir_all(&layout.logs)?;
    let log_path = layout.logs.join(format!("build-{}.log", timestamp()));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let what: Vec<String> = BINARIES.iter().map(|b| format!("cmd/{b}")).collect();
    eprintln!(
        "k8s build: building {} (about 10 minutes cold on 2 cores); log: {}",
        BINARIES.join(" "),
        log_path.display()
    );
    let t0 = Instant::now();
    let mut child = Command::new("make")
        .arg(format!("WHAT={}", what.join(" ")))
        .current_dir(&workdir)
        .env("GOPATH", &gopath)
        .env("CGO_ENABLED", "0")
        // GOPATH mode: a go.mod-aware default would refuse the vendor tree.
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting make (apt-get install -y make)")?;
    let mut last_progress = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        std::thread::sleep(Duration::from_secs(1));
        let secs = t0.elapsed().as_secs();
        if last_progress.elapsed() >= Duration::from_secs(30) {
            last_progress = Instant::now();
            // make says nothing while `go install` runs; the package Go's compiler
            // works on is the better progress sign.
            let what = go_compiling()
                .map(|p| format!("compiling {p}"))
                .or_else(|| last_line(&log_path))
                .unwrap_or_default();
            eprintln!("k8s build: [{:>2}:{:02}] {what}", secs / 60, secs % 60);
        }
    };
    if !status.success() {
        bail!(
            "building Kubernetes failed ({status}); the last lines of {}:\n{}",
            log_path.display(),
            tail(&log_path, 30)
        );
    }
    let out = workdir.join("_output/bin");
    fs::create_dir_all(&layout.bin)?;
    for b in BINARIES {
        let src = out.join(b);
        let tmp = layout.bin.join(format!(".{b}.tmp"));
        fs::copy(&src, &tmp).with_context(|| {
            format!(
                "copying {} (make succeeded; see {})",
                src.display(),
                log_path.display()
            )
        })?;
        fs::rename(&tmp, layout.bin.join(b))?;
    }
    eprintln!(
        "k8s build: Kubernetes built in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The package a Go `compile` process is building (`-p <package>`), if one runs.
fn go_compiling() -> Option<String> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !argv.first().is_some_and(|a| a.ends_with(b"/compile")) {
            continue;
        }
        if let Some(w) = argv.windows(2).find(|w| w[0] == b"-p") {
            return Some(String::from_utf8_lossy(w[1]).into_owned());
        }
    }
    None
}

/// The last non-empty line of a growing log (only its last 4 KiB are read).
fn last_line(path: &Path) -> Option<String> {
    let mut f = fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .last()
        .map(|l| l.chars().take(160).collect())
}

pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_sources() {
        let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_deb822(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_from_deb822("Types: deb\nSuites: trixie\n"), None);
        let list = "# x\ndeb-src http://a/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://b/debian bookworm main\n";
        assert_eq!(mirror_from_list(list).as_deref(), Some("http://b/debian"));
    }
}
