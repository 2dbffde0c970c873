//! The generic VM runner: builds the initramfs, boots a Debian kernel under
//! qemu-system-x86_64 (TCG), streams the serial console to the terminal and to a
//! log file, and returns the command's exit code read from the init's marker line.
//!
//! A boot that does not print the marker (kernel panic, init crash, timeout) is an
//! error, never a pass.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::initramfs::{self, Contents, Include};
use super::{Kernel, check_host_packages, kernels, timestamp, vm_dir};

pub const EXIT_MARKER: &str = "ICMP_GUARD_VM_EXIT=";
const LSM_MARKER: &str = "ICMP_GUARD_VM_LSM=";
const KERNEL_MARKER: &str = "ICMP_GUARD_VM_KERNEL=";
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;
/// `quiet` keeps the console (slow to emulate, and noisy) to warnings; lsm= turns
/// the BPF LSM on (Debian builds it in but leaves it off by default); panic=-1
/// reboots at once on a panic, which -no-reboot turns into qemu exiting.
const KERNEL_CMDLINE: &str = "console=ttyS0 quiet lsm=lockdown,capability,bpf panic=-1";

/// What to run in one VM boot.
pub struct VmSpec {
    pub kernel: Kernel,
    pub includes: Vec<Include>,
    pub empty_dirs: Vec<PathBuf>,
    pub env: Vec<(String, String)>,
    pub command: Vec<String>,
    pub timeout: Duration,
}

/// A boot that reached the end of /init.
#[derive(Debug)]
pub struct VmOutcome {
    pub exit_code: i32,
    /// The whole serial console, lossily decoded, `\r` removed.
    pub console: String,
    pub log: PathBuf,
    /// From starting qemu to qemu exiting (boot, command, power-off).
    pub elapsed: Duration,
    /// `uname -r` inside.
    pub kernel_release: Option<String>,
    /// `/sys/kernel/security/lsm` inside.
    pub lsm: Option<String>,
}

pub fn run(spec: &VmSpec) -> Result<VmOutcome> {
    check_host_packages(true)?;
    let image = kernels::ensure(spec.kernel, false)?;
    let vm = vm_dir()?;

    let nonce = nonce();
    let build_start = Instant::now();
    let initrd = initramfs::build(
        &vm.join("initramfs"),
        &Contents {
            includes: &spec.includes,
            empty_dirs: &spec.empty_dirs,
            env: &spec.env,
            command: &spec.command,
            nonce: &nonce,
        },
    )?;
    let size = fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "vm: initramfs {} ({:.1} MiB, built in {:.1} s); kernel {} {}",
        initrd.display(),
        size as f64 / (1024.0 * 1024.0),
        build_start.elapsed().as_secs_f64(),
        image.package,
        image.version
    );

    let logs = vm.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join(format!("{}-{}.log", spec.kernel.label(), timestamp()));
    boot(
        &image.vmlinuz,
        &initrd,
        &log_path,
        spec.timeout,
        &nonce,
        spec.kernel,
    )
}

fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    log_path: &Path,
    timeout: Duration,
    nonce: &str,
    kernel: Kernel,
) -> Result<VmOutcome> {
    let mut cmd = qemu_command(vmlinuz, initrd, KERNEL_CMDLINE);
    // No NIC: the tests only need lo, and probing a NIC costs boot time.
    cmd.args(["-nic", "none"]);
    let raw = run_qemu(cmd, log_path, timeout, None)?;
    let console = raw.console;
    let elapsed = raw.elapsed;
    let parsed = parse_console(&console, nonce);
    let where_ = format!("kernel {kernel}, console log {}", log_path.display());
    match parsed.exit_code {
        Some(exit_code) => {
            eprintln!(
                "vm: {} finished in {:.1} s, command exit code {exit_code}",
                parsed.kernel_release.as_deref().unwrap_or(kernel.label()),
                elapsed.as_secs_f64()
            );
            Ok(VmOutcome {
                exit_code,
                console,
                log: log_path.to_path_buf(),
                elapsed,
                kernel_release: parsed.kernel_release,
                lsm: parsed.lsm,
            })
        }
        None if raw.timed_out => bail!(
            "the VM did not finish within {} s and was killed; the command's result is unknown ({where_})",
            timeout.as_secs()
        ),
        None => {
            let why = if console.contains("Kernel panic") {
                "the kernel panicked"
            } else if parsed.kernel_release.is_none() {
                "/init never ran to its first report (kernel or initramfs problem)"
            } else {
                "/init stopped before reporting the command's exit code"
            };
            bail!(
                "the VM ended without the {EXIT_MARKER} marker: {why}; qemu exited with {} after {:.1} s ({where_})",
                raw.status,
                elapsed.as_secs_f64()
            )
        }
    }
}

/// qemu-system-x86_64 under TCG with a serial console, booting `vmlinuz` with `initrd`.
/// KVM is not used on purpose: on this kind of machine it hung at "Booting from ROM"; TCG
/// is slow but works.
pub fn qemu_command(vmlinuz: &Path, initrd: &Path, cmdline: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1536", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline]);
    cmd
}

/// A qemu run that ended (by itself or killed at the timeout).
pub struct RawRun {
    /// The whole serial console, lossily decoded, `\r` removed.
    pub console: String,
    pub status: std::process::ExitStatus,
    pub elapsed: Duration,
    pub timed_out: bool,
    /// Killed because it was still running [`DONE_GRACE`] after printing the `done` marker.
    pub killed_after_done: bool,
}

/// How long a VM may take to power off after printing its `done` marker.
pub const DONE_GRACE: Duration = Duration::from_secs(60);

/// Runs `cmd` (a qemu command line), streaming the serial console to the terminal and to
/// `log_path`, and kills it at `timeout`, or [`DONE_GRACE`] after the console showed `done`
/// (the guest said it has finished; its power-off is not worth waiting for any longer).
pub fn run_qemu(
    mut cmd: Command,
    log_path: &Path,
    timeout: Duration,
    done: Option<&str>,
) -> Result<RawRun> {
    let log = fs::File::create(log_path)
        .with_context(|| format!("creating the log {}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log));
    // stdin is not the terminal: qemu would put it in raw mode and swallow ^C.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("vm: {cmd:?}");
    eprintln!("vm: console log: {}", log_path.display());

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install -y qemu-system-x86)")?;
    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let out_thread = {
        let src = child.stdout.take().expect("piped");
        let log = Arc::clone(&log);
        let console = Arc::clone(&console);
        thread::spawn(move || pump(src, io::stdout(), log, Some(console)))
    };
    let err_thread = {
        let src = child.stderr.take().expect("piped");
        let log = Arc::clone(&log);
        thread::spawn(move || pump(src, io::stderr(), log, None))
    };

    let deadline = start + timeout;
    let mut timed_out = false;
    let mut done_at: Option<Instant> = None;
    let mut killed_after_done = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().context("waiting for the killed qemu")?;
        }
        if let Some(marker) = done {
            match done_at {
                None => {
                    let seen = console
                        .lock()
                        .map(|c| String::from_utf8_lossy(&c).contains(marker))
                        .unwrap_or(false);
                    if seen {
                        done_at = Some(Instant::now());
                    }
                }
                Some(t) if t.elapsed() >= DONE_GRACE => {
                    killed_after_done = true;
                    let _ = child.kill();
                    break child.wait().context("waiting for the killed qemu")?;
                }
                Some(_) => {}
            }
        }
        thread::sleep(Duration::from_millis(100));
    };
    let elapsed = start.elapsed();
    let _ = out_thread.join();
    let _ = err_thread.join();

    let raw = console.lock().map(|c| c.clone()).unwrap_or_default();
    if !raw.ends_with(b"\n") {
        // A killed or crashed VM stops mid-line; keep our messages on their own.
        println!();
    }
    Ok(RawRun {
        console: String::from_utf8_lossy(&raw).replace('\r', ""),
        status,
        elapsed,
        timed_out,
        killed_after_done,
    })
}

/// Copies a qemu output stream to the terminal and the log (and keeps the console
/// for parsing), without terminal escape sequences. Errors writing to the terminal
/// are ignored so a closed pipe on our stdout does not lose the log.
fn pump(
    mut src: impl Read,
    mut term: impl Write,
    log: Arc<Mutex<fs::File>>,
    keep: Option<Arc<Mutex<Vec<u8>>>>,
) {
    let mut buf = [0u8; 8192];
    let mut filter = EscapeFilter::default();
    let mut clean = Vec::with_capacity(buf.len());
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        clean.clear();
        filter.push(&buf[..n], &mut clean);
        let buf = &clean[..];
        let n = buf.len();
        let _ = term.write_all(&buf[..n]);
        let _ = term.flush();
        if let Ok(mut f) = log.lock() {
            let _ = f.write_all(&buf[..n]);
        }
        if let Some(keep) = &keep
            && let Ok(mut k) = keep.lock()
        {
            k.extend_from_slice(&buf[..n]);
        }
    }
}

/// Drops ANSI/VT escape sequences. SeaBIOS and the kernel send `ESC c` (full
/// terminal reset, which would wipe the user's scrollback) and `ESC [?7l` (no line
/// wrap); they also land in front of /init's first report line.
#[derive(Default)]
struct EscapeFilter {
    state: EscState,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum EscState {
    #[default]
    Text,
    /// After ESC.
    Esc,
    /// Inside `ESC [ ...` until its final byte.
    Csi,
}

impl EscapeFilter {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.state = match (self.state, b) {
                (EscState::Text, 0x1b) => EscState::Esc,
                (EscState::Text, _) => {
                    out.push(b);
                    EscState::Text
                }
                (EscState::Esc, b'[') => EscState::Csi,
                // Two-byte sequences such as `ESC c`, `ESC 7`.
                (EscState::Esc, _) => EscState::Text,
                (EscState::Csi, 0x40..=0x7e) => EscState::Text,
                (EscState::Csi, _) => EscState::Csi,
            };
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Parsed {
    exit_code: Option<i32>,
    kernel_release: Option<String>,
    lsm: Option<String>,
}

/// Reads the init's report lines. The marker must carry this boot's nonce, so a
/// test that prints a marker-like line cannot fake the verdict. The marker is
/// searched anywhere in a line because kernel messages can land mid-line on the
/// serial console.
fn parse_console(console: &str, nonce: &str) -> Parsed {
    let mut p = Parsed::default();
    let suffix = format!(" run={nonce}");
    for line in console.lines() {
        if let Some(rest) = line
            .find(EXIT_MARKER)
            .map(|i| &line[i + EXIT_MARKER.len()..])
            && let Some(code) = rest
                .trim_end()
                .strip_suffix(&suffix)
                .and_then(|c| c.trim().parse::<i32>().ok())
        {
            p.exit_code = Some(code);
        }
        if let Some(i) = line.find(KERNEL_MARKER) {
            p.kernel_release = Some(line[i + KERNEL_MARKER.len()..].trim().to_string());
        }
        if let Some(i) = line.find(LSM_MARKER) {
            p.lsm = Some(line[i + LSM_MARKER.len()..].trim().to_string());
        }
    }
    p
}

fn nonce() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", t, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_parsing() {
        let console = "ICMP_GUARD_VM_LSM=lockdown,capability,bpf\n\
                       ICMP_GUARD_VM_KERNEL=6.1.0-56-amd64\n\
                       ICMP_GUARD_VM_EXIT=0 run=other\n\
                       ICMP_GUARD_VM_EXIT=3 run=abc\n";
        assert_eq!(
            parse_console(console, "abc"),
            Parsed {
                exit_code: Some(3),
                kernel_release: Some("6.1.0-56-amd64".into()),
                lsm: Some("lockdown,capability,bpf".into()),
            }
        );
        // A forged marker without this boot's nonce is not a verdict.
        assert_eq!(parse_console(console, "zzz").exit_code, None);
        // Kernel noise before the marker on the same line.
        assert_eq!(
            parse_console("[ 1.0] x: yICMP_GUARD_VM_EXIT=1 run=n\n", "n").exit_code,
            Some(1)
        );
        assert_eq!(parse_console("", "n"), Parsed::default());
    }

    #[test]
    fn escapes_are_dropped_across_chunks() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        f.push(b"Booting\r\n\x1bc\x1b[?7", &mut out);
        f.push(b"l\x1b[2JICMP_GUARD_VM_LSM=bpf\r\n", &mut out);
        assert_eq!(out, b"Booting\r\nICMP_GUARD_VM_LSM=bpf\r\n");
    }
}
