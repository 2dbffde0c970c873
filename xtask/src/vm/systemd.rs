//! `cargo xtask vm-systemd`: the systemd unit under a live systemd. A Debian bookworm root
//! filesystem made by `mmdebstrap` from the machine's own mirror (cached as an ext4 image under
//! `$ICMP_GUARD_CACHE/vm-systemd/`), booted under qemu (TCG) with a Debian kernel from the
//! `vm-kernels` cache and `lsm=lockdown,capability,bpf`, systemd as PID 1.
//!
//! Each run copies the cached image (sparse), writes the agent, the unit from
//! `deploy/icmp-guard.service`, a policy and `xtask/vm-systemd/` into the copy with `debugfs`
//! (no mount, no network in the VM), and boots it. A small initramfs loads the disk's modules
//! (Debian builds virtio and ext4 as modules) and `switch_root`s to `/sbin/init`.
//! `icmp-guard-vm-checks.service` then runs `checks.sh`, which installs the agent as the
//! README says and reports one PASS/FAIL line per check on the serial console; this side reads
//! them and fails unless every requested check passed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use sha2::{Digest, Sha256};

use super::{GuestExit, Kernel, initramfs, kernels, qemu, run_checked, timestamp, vm_dir};
use super::{in_path, workspace_root};

/// The suite of the root filesystem: the machine's own, so its apt sources serve it.
const SUITE: &str = "bookworm";
/// What the checks run besides systemd: ping, hping3, python3 (the socket loop), ip, getcap,
/// ps. Changing this list changes the cache key, so the next run builds a new root filesystem.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "iputils-ping",
    "hping3",
    "python3-minimal",
    "iproute2",
    "libcap2-bin",
    "procps",
];
/// Bumped whenever `customize` changes what goes into the cached image.
const ROOTFS_RECIPE: &str = "1";
const IMAGE_SIZE: u64 = 1536 << 20;
/// The machine's apt sources; mmdebstrap reads the mirror (and the security suite) from it.
const SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const MARKER: &str = "ICMP_GUARD_SYSTEMD";
/// The modules the initramfs loads before it can mount the root (those not built in).
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4", "crc32c_generic"];
/// The highest `systemd-analyze security` exposure the unit may have (the `security` check);
/// measured on the unit as committed, so losing hardening fails the check.
const MAX_EXPOSURE: &str = "1.7";
const GUEST_DIR: &str = "/opt/icmp-guard-vm";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Check {
    /// `systemctl enable --now` starts the agent and it enforces with the LSM enforcer
    Start,
    /// ping works; hping3 is refused and its alert is in the unit's log directory
    Ping,
    /// no refused socket gets through across `systemctl restart`
    Restart,
    /// no refused socket gets through from `systemctl kill -s KILL` until systemd restarted it
    Kill,
    /// `systemctl stop` gives every socket back
    Stop,
    /// `systemd-analyze security` scores the unit at most at the committed exposure
    Security,
    /// each capability of the bounding set is needed (drops them one at a time; slow)
    Caps,
}

impl Check {
    const DEFAULT: [Check; 6] = [
        Check::Start,
        Check::Ping,
        Check::Restart,
        Check::Kill,
        Check::Stop,
        Check::Security,
    ];

    fn name(self) -> &'static str {
        match self {
            Check::Start => "start",
            Check::Ping => "ping",
            Check::Restart => "restart",
            Check::Kill => "kill",
            Check::Stop => "stop",
            Check::Security => "security",
            Check::Caps => "caps",
        }
    }
}

#[derive(Debug, Args)]
pub struct VmSystemdArgs {
    /// Kernel to boot
    #[arg(long, value_enum, default_value = "6.1")]
    pub kernel: Kernel,
    /// Checks to run, comma-separated (default: start,ping,restart,kill,stop,security)
    #[arg(long, value_enum, value_delimiter = ',')]
    pub check: Vec<Check>,
    /// Use this agent binary instead of building `-p icmp-guard --release`
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Install this unit file instead of deploy/icmp-guard.service (to try a variant)
    #[arg(long, value_name = "PATH")]
    pub unit: Option<PathBuf>,
    /// Build the cached root filesystem again even if one exists
    #[arg(long)]
    pub refresh_rootfs: bool,
    /// Seconds before the VM is killed and the run counts as failed
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
}

pub fn run(args: VmSystemdArgs) -> Result<()> {
    let start = Instant::now();
    check_host_tools()?;
    let checks: BTreeSet<Check> = if args.check.is_empty() {
        Check::DEFAULT.into_iter().collect()
    } else {
        args.check.iter().copied().collect()
    };
    let agent = match &args.agent {
        Some(p) => p.clone(),
        None => super::test::build_agent()?,
    };
    let root = workspace_root();
    let unit = args
        .unit
        .clone()
        .unwrap_or_else(|| root.join("deploy").join("icmp-guard.service"));
    for p in [&agent, &unit] {
        if !p.is_file() {
            bail!("{} does not exist", p.display());
        }
    }

    let base = ensure_rootfs(args.refresh_rootfs)?;
    let kernel = kernels::ensure(args.kernel, false)?;
    let kernel_dir = kernel
        .vmlinuz
        .parent()
        .and_then(Path::parent)
        .context("the kernel has no package directory")?
        .to_path_buf();

    let dir = vm_dir()?.join("systemd");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let modules = stage_modules(&kernel_dir, &dir.join("modules"))?;
    let initrd =
        initramfs::build_with_init(&dir.join("initramfs"), &modules, &boot_init(&modules))?;

    let nonce = format!(
        "{:x}{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        std::process::id()
    );
    let disk = dir.join(format!("disk-{}.ext4", args.kernel.label()));
    let t = Instant::now();
    prepare_disk(&base, &disk, &agent, &unit, &checks, &nonce)?;
    eprintln!(
        "vm-systemd: {} ready in {:.1} s (copy of {} with the run's files)",
        disk.display(),
        t.elapsed().as_secs_f64(),
        base.display()
    );

    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    let log = logs.join(format!("{}-{}.log", args.kernel.label(), timestamp()));
    let mut cmd = qemu::qemu_command(
        &kernel.vmlinuz,
        &initrd,
        "root=/dev/vda rw console=ttyS0 quiet lsm=lockdown,capability,bpf panic=-1",
    );
    cmd.arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            disk.display()
        ))
        .args(["-nic", "none"]);
    let done = format!("{MARKER} {nonce} DONE");
    let raw = qemu::run_qemu(cmd, &log, Duration::from_secs(args.timeout), Some(&done))?;
    let report = parse_console(&raw.console, &nonce);
    if raw.killed_after_done {
        eprintln!(
            "vm-systemd: the VM did not power off within {} s of its last check; stopped it",
            qemu::DONE_GRACE.as_secs()
        );
    }
    // The disk is a throw-away copy; the log keeps what it showed.
    let _ = fs::remove_file(&disk);

    println!();
    for (k, v) in &report.info {
        println!("vm-systemd: {k}: {v}");
    }
    println!("{:<9} {:<6} detail", "check", "result");
    let mut failed = Vec::new();
    for c in &checks {
        let (ok, detail) = match report.results.get(c.name()) {
            Some((ok, detail)) => (*ok, detail.clone()),
            None => (
                false,
                "no result line: the check did not run to its end".to_string(),
            ),
        };
        println!(
            "{:<9} {:<6} {detail}",
            c.name(),
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failed.push(c.name());
        }
    }
    let extra: Vec<&String> = report
        .results
        .keys()
        .filter(|k| !checks.iter().any(|c| c.name() == k.as_str()))
        .collect();
    if !extra.is_empty() {
        bail!(
            "the VM reported checks that were not asked for: {extra:?} (log {})",
            log.display()
        );
    }
    if !report.done {
        let why = if raw.timed_out {
            format!("the VM was killed after {} s", args.timeout)
        } else if raw.console.contains("Kernel panic") {
            "the kernel panicked".to_string()
        } else {
            format!("qemu exited with {}", raw.status)
        };
        bail!(
            "checks.sh did not finish (no DONE line): {why}; console log {}",
            log.display()
        );
    }
    println!(
        "vm-systemd: kernel {}, {} check(s) in {:.0} s (VM {:.0} s); console log {}",
        args.kernel,
        checks.len(),
        start.elapsed().as_secs_f64(),
        raw.elapsed.as_secs_f64(),
        log.display()
    );
    if !failed.is_empty() {
        return Err(GuestExit {
            code: 1,
            message: format!("vm-systemd: failed: {}", failed.join(", ")),
        }
        .into());
    }
    println!("vm-systemd: ok");
    Ok(())
}

fn check_host_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("xz", "xz-utils"),
    ] {
        if !in_path(tool) && !missing.contains(&package) {
            missing.push(package);
        }
    }
    if !Path::new(initramfs::BUSYBOX).is_file() {
        missing.push("busybox-static");
    }
    if !Path::new(SOURCES).is_file() {
        bail!(
            "{SOURCES} is missing: vm-systemd builds its root filesystem from this machine's Debian mirror"
        );
    }
    if !missing.is_empty() {
        bail!(
            "missing Debian packages for vm-systemd: {0}\n  fix: apt-get install -y {0} (scripts/setup.sh does)",
            missing.join(" ")
        );
    }
    Ok(())
}

fn rootfs_key() -> String {
    let mut h = Sha256::new();
    h.update(SUITE);
    for p in PACKAGES {
        h.update(b"\0");
        h.update(p);
    }
    h.update(b"\0recipe ");
    h.update(ROOTFS_RECIPE);
    h.update(CUSTOMIZE_UNITS_MASKED.join(" "));
    let d = h.finalize();
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The cached root filesystem image, built first if missing. Returns the ext4 image path.
fn ensure_rootfs(refresh: bool) -> Result<PathBuf> {
    let dir = crate::cache::cache_dir()
        .join("vm-systemd")
        .join(format!("{SUITE}-{}", rootfs_key()));
    let image = dir.join("rootfs.ext4");
    let stamp = dir.join("built");
    if !refresh && image.is_file() && stamp.is_file() {
        return Ok(image);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tree = dir.join("rootfs");
    let t = Instant::now();
    eprintln!(
        "vm-systemd: building the {SUITE} root filesystem with mmdebstrap into {} (once; a few minutes)",
        tree.display()
    );
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=essential", "--mode=root", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        // Manuals, docs and translations are most of the size and nothing in the VM reads
        // them; the copyright files stay.
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        ])
        .arg(SUITE)
        .arg(&tree)
        .arg(SOURCES)
        .env("LC_ALL", "C");
    run_checked(&mut cmd).context("mmdebstrap failed")?;
    let mmdebstrap_secs = t.elapsed().as_secs_f64();
    customize(&tree)?;
    let packages = run_checked(Command::new("chroot").arg(&tree).args([
        "dpkg-query",
        "-W",
        "-f",
        "${Package} ${Version}\\n",
    ]))?;
    fs::write(dir.join("packages.txt"), &packages.stdout)?;

    let t2 = Instant::now();
    let f = fs::File::create(&image)?;
    f.set_len(IMAGE_SIZE)?;
    drop(f);
    run_checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "icmp-guard-vm", "-d"])
            .arg(&tree)
            .arg(&image),
    )
    .context("mkfs.ext4 -d failed")?;
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    let summary = format!(
        "{SUITE} {} packages; mmdebstrap {mmdebstrap_secs:.0} s, mkfs.ext4 {:.0} s, total {:.0} s\n",
        String::from_utf8_lossy(&packages.stdout).lines().count(),
        t2.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    fs::write(&stamp, &summary)?;
    eprintln!("vm-systemd: root filesystem {}: {summary}", image.display());
    Ok(image)
}

/// Units that would only slow the boot down or write to the console the checks report on.
const CUSTOMIZE_UNITS_MASKED: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "systemd-firstboot.service",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
];

/// Host-side changes to the fresh tree before it becomes the cached image.
fn customize(tree: &Path) -> Result<()> {
    let etc = tree.join("etc");
    fs::write(etc.join("hostname"), "icmp-guard-systemd-vm\n")?;
    // A fixed machine id: with none, systemd treats the boot as a first boot and
    // systemd-firstboot may ask questions on the console.
    fs::write(etc.join("machine-id"), "5f1c0e0ad0c54b1b9a3f1ca7b2d4e6f8\n")?;
    fs::write(
        etc.join("fstab"),
        "# The initramfs of `cargo xtask vm-systemd` mounts /dev/vda on / read-write.\n",
    )?;
    let system = etc.join("systemd").join("system");
    fs::create_dir_all(&system)?;
    for unit in CUSTOMIZE_UNITS_MASKED {
        let link = system.join(unit);
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link)?;
        }
        std::os::unix::fs::symlink("/dev/null", &link)
            .with_context(|| format!("masking {unit}"))?;
    }
    Ok(())
}

/// Copies the boot modules of `kernel_dir` (an unpacked kernel package) that are not built in,
/// and their dependencies, uncompressed into `out` as `NN-name.ko`, in load order; returns
/// (host, guest) pairs for the initramfs. The package carries no modules.dep (depmod runs at
/// install time), so dependencies come from each module's own `.modinfo` `depends=`.
fn stage_modules(kernel_dir: &Path, out: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    // bookworm's packages install into /lib/modules, trixie's into /usr/lib/modules.
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| kernel_dir.join(d))
        .find(|d| d.is_dir())
        .with_context(|| format!("no lib/modules in {}", kernel_dir.display()))?;
    let modules_dir = single_subdir(&modules_dir)?;
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .with_context(|| format!("reading {}/modules.builtin", modules_dir.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(module_name)
        .collect();
    let mut files = BTreeMap::new();
    index_modules(&modules_dir.join("kernel"), &mut files)?;

    let mut loaded: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seen = BTreeSet::new();
    for w in BOOT_MODULES {
        if builtin.contains(*w) {
            continue;
        }
        if !files.contains_key(*w) {
            bail!(
                "the kernel in {} has {w} neither built in nor as a module",
                kernel_dir.display()
            );
        }
        add_module(w, &files, &builtin, &mut seen, &mut loaded)?;
    }
    if out.exists() {
        fs::remove_dir_all(out)?;
    }
    fs::create_dir_all(out)?;
    let mut staged = Vec::new();
    for (i, (name, data)) in loaded.iter().enumerate() {
        let file = format!("{i:02}-{name}.ko");
        fs::write(out.join(&file), data)?;
        staged.push((out.join(&file), PathBuf::from("/modules").join(file)));
    }
    Ok(staged)
}

/// Module name → file, for every module under `dir`.
fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, files)?;
        } else if p.to_string_lossy().contains(".ko") {
            files.insert(module_name(&p.to_string_lossy()), p);
        }
    }
    Ok(())
}

/// Appends `name` to `loaded` after its dependencies (depth first).
fn add_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    loaded: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    if builtin.contains(name) || !seen.insert(name.to_string()) {
        return Ok(());
    }
    let path = files
        .get(name)
        .with_context(|| format!("module {name} is needed but not in the kernel package"))?;
    let data = read_module(path)?;
    let info = modinfo(&data).with_context(|| format!("reading .modinfo of {}", path.display()))?;
    for (k, v) in &info {
        if k == "depends" {
            for dep in v.split(',').filter(|d| !d.is_empty()) {
                add_module(&dep.replace('-', "_"), files, builtin, seen, loaded)?;
            }
        }
    }
    loaded.push((name.to_string(), data));
    Ok(())
}

/// A module file's bytes, decompressed (Debian compresses them with xz from trixie on).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let p = path.to_string_lossy();
    Ok(if p.ends_with(".ko.xz") {
        run_checked(Command::new("xz").arg("-dc").arg(path))?.stdout
    } else if p.ends_with(".ko.zst") {
        run_checked(Command::new("zstd").arg("-dcq").arg(path))?.stdout
    } else if p.ends_with(".ko.gz") {
        run_checked(Command::new("gzip").arg("-dc").arg(path))?.stdout
    } else {
        fs::read(path).with_context(|| format!("reading {}", path.display()))?
    })
}

/// The `key=value` strings of an ELF64 little-endian module's `.modinfo` section.
fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>> {
    fn uint(b: &[u8], at: usize, len: usize) -> Result<u64> {
        let s = b.get(at..at + len).context("truncated ELF")?;
        Ok(s.iter()
            .rev()
            .fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
    }
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("not a 64-bit little-endian ELF file");
    }
    let shoff = uint(elf, 0x28, 8)? as usize;
    let shentsize = uint(elf, 0x3a, 2)? as usize;
    let shnum = uint(elf, 0x3c, 2)? as usize;
    let shstrndx = uint(elf, 0x3e, 2)? as usize;
    let section = |i: usize| -> Result<(u64, usize, usize)> {
        let h = shoff + i * shentsize;
        Ok((
            uint(elf, h, 4)?,
            uint(elf, h + 24, 8)? as usize,
            uint(elf, h + 32, 8)? as usize,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf.get(stroff..stroff + strsize).context("truncated ELF")?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = elf.get(off..off + size).context("truncated .modinfo")?;
            return Ok(data
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = String::from_utf8_lossy(kv);
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect());
        }
    }
    bail!("no .modinfo section")
}

fn single_subdir(dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!(
            "expected one kernel's modules in {}, found {n}",
            dir.display()
        ),
    }
}

/// `kernel/fs/ext4/ext4.ko.xz` → `ext4`.
fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// /init of the boot initramfs: load the modules, mount the disk, hand over to systemd.
fn boot_init(modules: &[(PathBuf, PathBuf)]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         # Written by `cargo xtask vm-systemd`: loads the disk's modules, mounts /dev/vda and\n\
         # hands over to systemd.\n\
         /bin/busybox mount -t devtmpfs devtmpfs /dev\n\
         exec </dev/console >/dev/console 2>&1\n\
         /bin/busybox --install -s\n\
         mount -t proc proc /proc\n",
    );
    for (_, guest) in modules {
        s.push_str(&format!(
            "insmod {0} || echo \"ICMP_GUARD_VM_WARN: insmod {0} failed\"\n",
            guest.display()
        ));
    }
    s.push_str(
        "i=0\n\
         while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n\
         mkdir -p /newroot\n\
         if ! mount -t ext4 -o rw /dev/vda /newroot; then\n\
         \x20   echo \"ICMP_GUARD_VM_WARN: cannot mount /dev/vda; block devices: $(ls /sys/class/block)\"\n\
         \x20   poweroff -f\n\
         fi\n\
         umount /proc\n\
         mount --move /dev /newroot/dev\n\
         exec switch_root /newroot /sbin/init\n",
    );
    s
}

/// `disk` = a sparse copy of `base` with this run's files written in by debugfs.
fn prepare_disk(
    base: &Path,
    disk: &Path,
    agent: &Path,
    unit: &Path,
    checks: &BTreeSet<Check>,
    nonce: &str,
) -> Result<()> {
    run_checked(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(base)
            .arg(disk),
    )?;
    let root = workspace_root();
    let here = root.join("xtask").join("vm-systemd");
    let run_env = disk.with_extension("run.env");
    let names: Vec<&str> = checks.iter().map(|c| c.name()).collect();
    fs::write(
        &run_env,
        format!(
            "NONCE={nonce}\nCHECKS=\"{}\"\nMAX_EXPOSURE={MAX_EXPOSURE}\n",
            names.join(" ")
        ),
    )?;
    let policy = root.join("policies").join("host").join("strict.yaml");
    // (host file, guest directory, guest name, mode)
    let files: Vec<(PathBuf, &str, &str, u32)> = vec![
        (agent.to_path_buf(), GUEST_DIR, "icmp-guard", 0o755),
        (unit.to_path_buf(), GUEST_DIR, "icmp-guard.service", 0o644),
        (here.join("checks.sh"), GUEST_DIR, "checks.sh", 0o755),
        (
            here.join("socket_loop.py"),
            GUEST_DIR,
            "socket_loop.py",
            0o755,
        ),
        (run_env.clone(), GUEST_DIR, "run.env", 0o644),
        (policy, "/opt/icmp-guard-vm/policies", "strict.yaml", 0o644),
        (
            here.join("private-ping.yaml"),
            "/opt/icmp-guard-vm/policies",
            "private-ping.yaml",
            0o644,
        ),
        (
            here.join("icmp-guard-vm-checks.service"),
            "/etc/systemd/system",
            "icmp-guard-vm-checks.service",
            0o644,
        ),
    ];
    let mut script = String::from("mkdir /opt/icmp-guard-vm\nmkdir /opt/icmp-guard-vm/policies\n");
    for (host, dir, name, mode) in &files {
        if !host.is_file() {
            bail!("{} does not exist", host.display());
        }
        script.push_str(&format!(
            "cd {dir}\nwrite {} {name}\nsif {name} mode 0{:o}\nsif {name} uid 0\nsif {name} gid 0\n",
            host.display(),
            0o100000 | mode
        ));
    }
    script.push_str(
        "cd /etc/systemd/system/multi-user.target.wants\n\
         symlink icmp-guard-vm-checks.service /etc/systemd/system/icmp-guard-vm-checks.service\n",
    );
    let cmds = disk.with_extension("debugfs");
    fs::write(&cmds, &script)?;
    let out = run_checked(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(disk),
    )?;
    // debugfs exits 0 even when a command fails; it says so on stderr.
    let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if !errors.is_empty() {
        bail!(
            "debugfs could not write the run's files into {}:\n{}",
            disk.display(),
            errors.join("\n")
        );
    }
    // And read back what was written, byte for byte.
    for (host, dir, name, _) in &files {
        let guest = format!("{dir}/{name}");
        let back = disk.with_extension("readback");
        let _ = fs::remove_file(&back);
        run_checked(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump {guest} {}", back.display()))
                .arg(disk),
        )?;
        if fs::read(&back).ok() != Some(fs::read(host)?) {
            bail!(
                "{guest} in {} does not match {}",
                disk.display(),
                host.display()
            );
        }
        let _ = fs::remove_file(&back);
    }
    let _ = fs::remove_file(&cmds);
    let _ = fs::remove_file(&run_env);
    Ok(())
}

#[derive(Debug, Default)]
struct Report {
    /// check → (passed, detail)
    results: BTreeMap<String, (bool, String)>,
    info: Vec<(String, String)>,
    done: bool,
}

/// Reads checks.sh's lines carrying this boot's nonce (anywhere in a line: kernel messages can
/// land in front of them on the serial console).
fn parse_console(console: &str, nonce: &str) -> Report {
    let mut r = Report::default();
    let prefix = format!("{MARKER} {nonce} ");
    for line in console.lines() {
        let Some(i) = line.find(&prefix) else {
            continue;
        };
        let rest = line[i + prefix.len()..].trim_end();
        let mut words = rest.splitn(2, ' ');
        match (words.next(), words.next()) {
            (Some("DONE"), _) => r.done = true,
            (Some("INFO"), Some(kv)) => {
                let (k, v) = kv.split_once(' ').unwrap_or((kv, ""));
                r.info.push((k.to_string(), v.to_string()));
            }
            (Some("RESULT"), Some(res)) => {
                let mut p = res.splitn(3, ' ');
                let (Some(check), Some(verdict)) = (p.next(), p.next()) else {
                    continue;
                };
                let detail = p.next().unwrap_or("").to_string();
                // A check reported twice counts as failed unless every report passed.
                let ok = verdict == "PASS";
                r.results
                    .entry(check.to_string())
                    .and_modify(|e| {
                        e.0 &= ok;
                        e.1 = format!("{}; {detail}", e.1);
                    })
                    .or_insert((ok, detail));
            }
            _ => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_report() {
        let c = "ICMP_GUARD_SYSTEMD n1 INFO kernel 6.1.0-56-amd64\n\
                 [  3.1] x ICMP_GUARD_SYSTEMD n1 RESULT start PASS active (pid 4)\n\
                 ICMP_GUARD_SYSTEMD n1 RESULT kill FAIL 3 sockets opened\n\
                 ICMP_GUARD_SYSTEMD other RESULT stop PASS forged\n\
                 ICMP_GUARD_SYSTEMD n1 DONE\n";
        let r = parse_console(c, "n1");
        assert!(r.done);
        assert_eq!(r.results["start"], (true, "active (pid 4)".to_string()));
        assert!(!r.results["kill"].0);
        assert!(
            !r.results.contains_key("stop"),
            "another boot's nonce does not count"
        );
        assert_eq!(
            r.info,
            vec![("kernel".to_string(), "6.1.0-56-amd64".to_string())]
        );
        assert!(!parse_console("ICMP_GUARD_SYSTEMD n1 RESULT start PASS x\n", "n1").done);
        let twice = parse_console(
            "ICMP_GUARD_SYSTEMD n RESULT ping PASS a\nICMP_GUARD_SYSTEMD n RESULT ping FAIL b\n",
            "n",
        );
        assert!(!twice.results["ping"].0);
    }

    /// A minimal ELF64 with a section-name table and a `.modinfo` section.
    fn elf_with_modinfo(modinfo_data: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo_data);
        let shoff = elf.len();
        // Section 0 (null), 1 (.shstrtab), 2 (.modinfo).
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, strtab_off, shstrtab.len()),
            (11, modinfo_off, modinfo_data.len()),
        ] {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        }
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn module_info() {
        let elf = elf_with_modinfo(b"license=GPL\0depends=mbcache,jbd2,crc16\0name=ext4\0");
        let info = modinfo(&elf).unwrap();
        assert!(info.contains(&("depends".to_string(), "mbcache,jbd2,crc16".to_string())));
        assert!(info.contains(&("name".to_string(), "ext4".to_string())));
        assert!(modinfo(b"\x7fELF\x01\x01").is_err());
        assert!(modinfo(&elf[..70]).is_err());
        assert_eq!(module_name("kernel/crypto/crc32c-intel.ko"), "crc32c_intel");
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
    }

    #[test]
    fn cache_key_is_stable() {
        assert_eq!(rootfs_key(), rootfs_key());
        assert_eq!(rootfs_key().len(), 12);
    }
}
