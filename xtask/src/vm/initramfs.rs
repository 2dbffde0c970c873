//! Builds the VM's initramfs: a staging tree with busybox, the requested host files
//! (at the same absolute paths, with every shared library `ldd` lists and the
//! dynamic loader), a few /etc files and the generated /init, packed with
//! `cpio -H newc | gzip`.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// busybox-static's binary. It must be static: it is what runs /init before any
/// library path is known to be complete.
pub const BUSYBOX: &str = "/bin/busybox";

const INIT_TEMPLATE: &str = include_str!("../../vm/init.sh");

/// Decides which entries of an included directory tree are left out.
pub type Exclude = fn(&Path) -> bool;

/// One host file or directory to put into the guest.
#[derive(Clone, Debug)]
pub struct Include {
    pub host: PathBuf,
    /// `None`: same absolute path as on the host, with host symlinks reproduced.
    /// `Some(p)`: copied (symlinks followed) to `p` inside the guest.
    pub guest: Option<PathBuf>,
    pub exclude: Option<Exclude>,
}

impl Include {
    pub fn same(host: impl Into<PathBuf>) -> Include {
        Include {
            host: host.into(),
            guest: None,
            exclude: None,
        }
    }

    pub fn at(host: impl Into<PathBuf>, guest: impl Into<PathBuf>) -> Include {
        Include {
            host: host.into(),
            guest: Some(guest.into()),
            exclude: None,
        }
    }

    /// `HOST` or `HOST:GUEST`, as given to `vm-run --include`.
    pub fn parse(spec: &str) -> Result<Include> {
        let inc = match spec.split_once(':') {
            Some((host, guest)) => Include::at(host, guest),
            None => Include::same(spec),
        };
        if !inc.host.is_absolute() || inc.guest.as_ref().is_some_and(|g| !g.is_absolute()) {
            bail!("--include {spec}: paths must be absolute (HOST or HOST:GUEST)");
        }
        Ok(inc)
    }
}

/// `/usr/bin/python3` and its standard library, so that a test can run
/// `/usr/bin/python3 -c 'import socket; ...'` inside. The whole stdlib is taken
/// (a hand-picked module list would break on the first test importing something
/// else) minus what no test needs: the test suite, GUI, build config, 2to3, docs.
pub fn python_includes() -> Result<Vec<Include>> {
    let exe = Path::new("/usr/bin/python3");
    let real = fs::canonicalize(exe).with_context(|| {
        format!(
            "{} not found: apt-get install -y python3-minimal",
            exe.display()
        )
    })?;
    let version = real
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("python3."))
        .with_context(|| format!("cannot tell the python version from {}", real.display()))?;
    let stdlib = Path::new("/usr/lib").join(version);
    if !stdlib.join("os.py").is_file() {
        bail!(
            "{} has no os.py: apt-get install -y lib{version}-stdlib",
            stdlib.display()
        );
    }
    Ok(vec![
        Include::same(exe),
        Include {
            host: stdlib,
            guest: None,
            exclude: Some(python_exclude),
        },
    ])
}

fn python_exclude(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let parent = p
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if parent.starts_with("python3.") {
        return matches!(
            name,
            "test"
                | "idlelib"
                | "tkinter"
                | "turtledemo"
                | "ensurepip"
                | "lib2to3"
                | "pydoc_data"
                | "distutils"
                | "site-packages"
                | "dist-packages"
        ) || name.starts_with("config-3");
    }
    if parent == "lib-dynload" {
        return name.starts_with("_test")
            || name.starts_with("_ctypes_test")
            || name.starts_with("_xxtestfuzz")
            || name.starts_with("xxlimited");
    }
    false
}

/// What goes into one initramfs.
pub struct Contents<'a> {
    pub includes: &'a [Include],
    /// Directories to create empty (e.g. a mount point a test expects).
    pub empty_dirs: &'a [PathBuf],
    pub env: &'a [(String, String)],
    pub command: &'a [String],
    pub nonce: &'a str,
}

/// Builds `<dir>/staging` and packs it into `<dir>/initrd.gz`, which is returned.
pub fn build(dir: &Path, contents: &Contents<'_>) -> Result<PathBuf> {
    let mut st = Staging::with_busybox(dir)?;
    // /bin/sh is the host's (dash on Debian), not busybox: busybox sh runs its own
    // applets before PATH, so a test's `sh -c "ping ..."` would get busybox ping.
    if Path::new("/bin/sh").exists() {
        st.add_host(Path::new("/bin/sh"), None)?;
    }
    // Small, and without them getprotobyname()/getservbyname() (python's socket
    // module, hping3, nmap) fail inside the guest.
    for f in ["/etc/protocols", "/etc/services"] {
        if Path::new(f).exists() {
            st.add_host(Path::new(f), None)?;
        }
    }
    for inc in contents.includes {
        let guest = inc.guest.as_deref().unwrap_or(&inc.host);
        if let Some(m) = MOUNTED_OVER.iter().find(|m| guest.starts_with(m)) {
            bail!(
                "cannot include {} at {}: /init mounts a fresh filesystem on {m}, which would hide it; \
                 put it elsewhere, e.g. --include {}:/opt/{}",
                inc.host.display(),
                guest.display(),
                inc.host.display(),
                guest.file_name().unwrap_or_default().to_string_lossy()
            );
        }
        if fs::symlink_metadata(&inc.host).is_err() {
            bail!("cannot include {}: it does not exist", inc.host.display());
        }
        match &inc.guest {
            None => st.add_host(&inc.host, inc.exclude)?,
            Some(guest) => st.add_mapped(&inc.host, guest, inc.exclude)?,
        }
    }
    for d in contents.empty_dirs {
        st.guest_dir(d)?;
    }
    // Written after the includes so the contract (root/nobody, localhost, files then
    // loopback-only DNS) holds even if someone includes the host's /etc.
    st.write_file("/etc/passwd", PASSWD, 0o644)?;
    st.write_file("/etc/group", GROUP, 0o644)?;
    st.write_file("/etc/hosts", HOSTS, 0o644)?;
    st.write_file("/etc/nsswitch.conf", NSSWITCH, 0o644)?;
    st.write_file("/etc/resolv.conf", RESOLV_CONF, 0o644)?;
    st.write_file("/etc/hostname", "icmp-guard-vm\n", 0o644)?;
    st.write_file("/init", &render_init(contents)?, 0o755)?;

    let initrd = dir.join("initrd.gz");
    pack(&st.root, &initrd)?;
    Ok(initrd)
}

/// An initramfs with only busybox, the given files (host path, guest path; copied with their
/// shared libraries) and `init` as /init: for a boot that hands over to a real root
/// filesystem, e.g. one that loads the disk's modules and `switch_root`s to systemd.
pub fn build_with_init(dir: &Path, files: &[(PathBuf, PathBuf)], init: &str) -> Result<PathBuf> {
    let mut st = Staging::with_busybox(dir)?;
    for (host, guest) in files {
        st.add_mapped(host, guest, None)?;
    }
    st.write_file("/init", init, 0o755)?;
    let initrd = dir.join("initrd.gz");
    pack(&st.root, &initrd)?;
    Ok(initrd)
}

/// Mount points /init covers with a fresh filesystem (see xtask/vm/init.sh).
const MOUNTED_OVER: [&str; 5] = ["/tmp", "/run", "/dev", "/proc", "/sys"];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
// Debian calls gid 65534 "nogroup"; "nobody" is there too for tools that expect it.
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n";
const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n";
// glibc >= 2.34 has the files and dns backends built in, so no libnss_*.so is needed. Names
// resolve through DNS after /etc/hosts as on a real node: the seed scenario needs hping3's
// resolver to open its udp socket. The only nameserver is loopback and the VM has no NIC.
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
                        networks: files\nprotocols: files\nservices: files\n";
const RESOLV_CONF: &str = "nameserver 127.0.0.1\n";

/// POSIX-shell single quoting.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn render_init(c: &Contents<'_>) -> Result<String> {
    if c.command.is_empty() {
        bail!("no command to run inside the VM");
    }
    let mut env = String::new();
    for (k, v) in c.env {
        let valid = k
            .chars()
            .next()
            .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
            && k.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !valid {
            bail!("invalid environment variable name {k:?}");
        }
        env.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    let cmd = c
        .command
        .iter()
        .map(|a| sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    // Echoed as one single-quoted word, so it prints exactly what runs.
    let display = sh_quote(&format!("ICMP_GUARD_VM_RUN: {cmd}"));
    Ok(INIT_TEMPLATE
        .replace("@ENV@", &env)
        .replace("@CMD_DISPLAY@", &display)
        .replace("@CMD@", &cmd)
        .replace("@NONCE@", c.nonce))
}

/// `cd staging && find . | cpio -o -H newc | gzip`, without a shell so each
/// stage's failure is seen.
fn pack(staging: &Path, out: &Path) -> Result<()> {
    let mut list = Vec::new();
    collect_paths(staging, Path::new("."), &mut list)?;
    let out_file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;

    let mut cpio = Command::new("cpio")
        .args([
            "--null",
            "--create",
            "--format=newc",
            "--owner=0:0",
            "--quiet",
        ])
        .current_dir(staging)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cpio (apt-get install -y cpio)")?;
    let cpio_out = cpio.stdout.take().expect("piped");
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(cpio_out)
        .stdout(out_file)
        .spawn()
        .context("starting gzip")?;
    {
        let mut stdin = cpio.stdin.take().expect("piped");
        for p in &list {
            stdin.write_all(p.as_os_str().as_encoded_bytes())?;
            stdin.write_all(b"\0")?;
        }
    }
    let cs = cpio.wait()?;
    let gs = gzip.wait()?;
    if !cs.success() || !gs.success() {
        bail!("packing the initramfs failed (cpio: {cs}, gzip: {gs})");
    }
    Ok(())
}

/// Paths relative to the staging root, directories before their contents, sorted
/// so that two builds of the same tree give the same archive.
fn collect_paths(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    entries.sort();
    for name in entries {
        let p = rel.join(&name);
        out.push(p.clone());
        if fs::symlink_metadata(root.join(&p))?.is_dir() {
            collect_paths(root, &p, out)?;
        }
    }
    Ok(())
}

struct Staging {
    root: PathBuf,
    /// Host paths already added (symlink chains and library lists repeat a lot).
    seen: HashSet<PathBuf>,
}

impl Staging {
    /// A fresh `<dir>/staging` with the base directories, the host's merged-/usr layout
    /// (/bin -> usr/bin, /sbin -> usr/sbin, /lib64 ...), so that `busybox --install` finds
    /// every applet directory and host paths work, and busybox itself.
    fn with_busybox(dir: &Path) -> Result<Staging> {
        let staging_root = dir.join("staging");
        if staging_root.exists() {
            fs::remove_dir_all(&staging_root)
                .with_context(|| format!("removing the old {}", staging_root.display()))?;
        }
        fs::create_dir_all(&staging_root)
            .with_context(|| format!("creating {}", staging_root.display()))?;
        let mut st = Staging {
            root: staging_root,
            seen: HashSet::new(),
        };
        for d in ["dev", "proc", "sys", "tmp", "run", "root", "etc"] {
            st.guest_dir(Path::new("/").join(d).as_path())?;
        }
        for d in ["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/lib", "/lib64"] {
            if Path::new(d).exists() {
                st.add_dir_only(Path::new(d))?;
            }
        }
        st.add_host(Path::new(BUSYBOX), None)?;
        Ok(st)
    }

    /// Where the guest path `guest` (a directory) lives in the staging tree,
    /// resolving symlinks already placed there the way the guest kernel will (an
    /// absolute link target means the guest's root, never the host's), and creating
    /// missing directories. Writing only through paths from here keeps every write
    /// inside the staging tree.
    fn guest_dir(&self, guest: &Path) -> Result<PathBuf> {
        let mut cur = PathBuf::from("/");
        let mut queue: VecDeque<OsString> = normal_components(guest);
        let mut hops = 0;
        while let Some(name) = queue.pop_front() {
            if name == ".." {
                cur.pop();
                continue;
            }
            let cand = cur.join(&name);
            let real = self.staged(&cand);
            match fs::symlink_metadata(&real) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        bail!("symlink loop under {} in the staging tree", guest.display());
                    }
                    let target = fs::read_link(&real)?;
                    if target.is_absolute() {
                        cur = PathBuf::from("/");
                    }
                    let mut rest = normal_components(&target);
                    rest.extend(queue);
                    queue = rest;
                }
                Ok(m) if m.is_dir() => cur = cand,
                Ok(_) => bail!(
                    "{} is a file in the staging tree but {} needs it to be a directory",
                    cand.display(),
                    guest.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&real)
                        .with_context(|| format!("creating {}", real.display()))?;
                    cur = cand;
                }
                Err(e) => return Err(e).context(format!("inspecting {}", real.display())),
            }
        }
        Ok(self.staged(&cur))
    }

    fn staged(&self, guest_abs: &Path) -> PathBuf {
        self.root
            .join(guest_abs.strip_prefix("/").unwrap_or(guest_abs))
    }

    /// Staging location for the guest file `guest` (its parent resolved).
    fn guest_file(&self, guest: &Path) -> Result<PathBuf> {
        let parent = guest.parent().unwrap_or(Path::new("/"));
        let name = guest
            .file_name()
            .with_context(|| format!("{} has no file name", guest.display()))?;
        Ok(self.guest_dir(parent)?.join(name))
    }

    fn write_file(&self, guest: &str, text: &str, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.guest_file(Path::new(guest))?;
        if fs::symlink_metadata(&p).is_ok() {
            fs::remove_file(&p)?;
        }
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Adds `host` at the same absolute path. Symlinks, both in the path's
    /// ancestors (/lib -> usr/lib, /lib64) and at its end (/usr/bin/python3 ->
    /// python3.11), are reproduced as symlinks and their targets added too, so the
    /// guest resolves names exactly as the host does. Directories are copied
    /// recursively; ELF files bring their shared libraries and loader.
    fn add_host(&mut self, host: &Path, exclude: Option<Exclude>) -> Result<()> {
        let host = normalize(host);
        if !self.seen.insert(host.clone()) {
            return Ok(());
        }
        // Ancestors: reproduce any symlinked directory on the way.
        let parent = host.parent().unwrap_or(Path::new("/")).to_path_buf();
        let resolved = self.add_dir_only(&parent)?;
        let real = resolved.join(host.file_name().unwrap_or_default());
        let m = fs::symlink_metadata(&real)
            .with_context(|| format!("inspecting {}", real.display()))?;
        let ft = m.file_type();
        if ft.is_symlink() {
            self.place_symlink(&real)?;
            let target = normalize(&resolved.join(fs::read_link(&real)?));
            // A dangling link is reproduced as it is (the host has it dangling too).
            if fs::symlink_metadata(&target).is_ok() {
                self.add_host(&target, exclude)?;
            }
        } else if ft.is_dir() {
            self.guest_dir(&real)?;
            let mut names: Vec<_> = fs::read_dir(&real)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for name in names {
                let child = real.join(name);
                if exclude.is_some_and(|f| f(&child)) {
                    continue;
                }
                self.add_host(&child, exclude)?;
            }
        } else if ft.is_file() {
            let dst = self.guest_file(&real)?;
            copy_file(&real, &dst)?;
            if is_elf(&real)? {
                self.add_elf_deps(&real)?;
            }
        } else {
            eprintln!(
                "vm: skipping {} (not a file, directory or symlink)",
                real.display()
            );
        }
        Ok(())
    }

    /// Makes sure the host directory `dir` exists in the guest (with its symlinked
    /// ancestors), without copying its contents. Returns `dir` with its symlinks resolved.
    fn add_dir_only(&mut self, dir: &Path) -> Result<PathBuf> {
        let mut resolved = PathBuf::from("/");
        for name in normal_components(dir) {
            let p = resolved.join(&name);
            let m =
                fs::symlink_metadata(&p).with_context(|| format!("inspecting {}", p.display()))?;
            if m.file_type().is_symlink() {
                self.place_symlink(&p)?;
                let target = normalize(&resolved.join(fs::read_link(&p)?));
                self.add_dir_only(&target)?;
                resolved = fs::canonicalize(&p)?;
            } else {
                self.guest_dir(&p)?;
                resolved = p;
            }
        }
        Ok(resolved)
    }

    /// Creates, at the guest path `link` (a host symlink whose ancestors are already
    /// real directories), a symlink with the same target text.
    fn place_symlink(&mut self, link: &Path) -> Result<()> {
        let target = fs::read_link(link)?;
        let parent = link.parent().unwrap_or(Path::new("/"));
        let dst = self
            .guest_dir(parent)?
            .join(link.file_name().unwrap_or_default());
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.file_type().is_symlink() && fs::read_link(&dst)? == target => Ok(()),
            Ok(_) => bail!(
                "{} is both a symlink on the host and something else in the guest tree",
                link.display()
            ),
            Err(_) => symlink(&target, &dst)
                .with_context(|| format!("creating the symlink {}", dst.display())),
        }
    }

    /// Copies `host` to the guest path `guest`, following symlinks (used for the
    /// binaries under test, which live at a different path inside).
    fn add_mapped(&mut self, host: &Path, guest: &Path, exclude: Option<Exclude>) -> Result<()> {
        let m = fs::metadata(host).with_context(|| format!("inspecting {}", host.display()))?;
        if m.is_dir() {
            self.guest_dir(guest)?;
            let mut names: Vec<_> = fs::read_dir(host)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for name in names {
                let child = host.join(&name);
                if exclude.is_some_and(|f| f(&child)) {
                    continue;
                }
                self.add_mapped(&child, &guest.join(&name), exclude)?;
            }
        } else {
            let dst = self.guest_file(guest)?;
            copy_file(host, &dst)?;
            if is_elf(host)? {
                self.add_elf_deps(host)?;
            }
        }
        Ok(())
    }

    fn add_elf_deps(&mut self, elf: &Path) -> Result<()> {
        for lib in ldd(elf)? {
            self.add_host(&lib, None)?;
        }
        Ok(())
    }
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    if fs::symlink_metadata(dst).is_ok() {
        fs::remove_file(dst).with_context(|| format!("replacing {}", dst.display()))?;
    }
    // fs::copy keeps the permission bits (the executable bit matters).
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    Ok(())
}

pub fn is_elf(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(f.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF")
}

/// The shared objects `ldd` lists for `elf` (including the dynamic loader); empty
/// for static binaries.
pub fn ldd(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .env("LC_ALL", "C")
        .output()
        .context("running ldd")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}{}", elf.display(), stdout, stderr);
    }
    parse_ldd(&stdout).with_context(|| format!("libraries of {}", elf.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.contains("statically linked") {
            continue;
        }
        if let Some((name, rest)) = line.split_once("=>") {
            let rest = rest.trim();
            if rest.starts_with("not found") {
                bail!("ldd: {} not found on this machine", name.trim());
            }
            if let Some(path) = rest
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                libs.push(PathBuf::from(path));
            }
        } else if let Some(path) = line
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            // The loader: "/lib64/ld-linux-x86-64.so.2 (0x...)". linux-vdso has no
            // path and is skipped.
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The normal and `..` components of `p`, for walking it one name at a time.
pub fn normal_components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Lexical normalisation of an absolute path (`.` and `..` removed). Only applied
/// to paths whose ancestors were already resolved, where it is exact.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibcap.so.2 => /lib/x86_64-linux-gnu/libcap.so.2 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libcap.so.2"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("ping"), "ping");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$(x)"), "'$(x)'");
    }

    #[test]
    fn init_rendering() {
        let env = vec![("A_B".to_string(), "x y".to_string())];
        let cmd = vec!["ping".to_string(), "-c1".to_string(), "$x".to_string()];
        let init = render_init(&Contents {
            includes: &[],
            empty_dirs: &[],
            env: &env,
            command: &cmd,
            nonce: "abc",
        })
        .unwrap();
        assert!(init.contains("export A_B='x y'\n"));
        assert!(init.contains("run ping -c1 '$x' </dev/null"));
        assert!(init.contains("ICMP_GUARD_VM_EXIT=$rc run=abc"));
        for placeholder in ["@ENV@", "@CMD@", "@CMD_DISPLAY@", "@NONCE@"] {
            assert!(!init.contains(placeholder), "{placeholder} left in /init");
        }
        let bad = vec![("1X".to_string(), String::new())];
        assert!(
            render_init(&Contents {
                includes: &[],
                empty_dirs: &[],
                env: &bad,
                command: &cmd,
                nonce: "n",
            })
            .is_err()
        );
    }

    #[test]
    fn staging_resolves_symlinks_inside_the_tree() {
        let dir = std::env::temp_dir().join(format!("xtask-staging-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("usr/lib")).unwrap();
        // An absolute link must resolve inside the staging root, not on the host.
        symlink("/usr/lib", dir.join("lib")).unwrap();
        let st = Staging {
            root: dir.clone(),
            seen: HashSet::new(),
        };
        let got = st.guest_dir(Path::new("/lib/x86_64-linux-gnu")).unwrap();
        assert_eq!(got, dir.join("usr/lib/x86_64-linux-gnu"));
        assert!(got.is_dir());
        fs::remove_dir_all(&dir).unwrap();
    }
}
