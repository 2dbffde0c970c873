//! `cargo xtask k8s test -- CMD...`: the wrapper Kubernetes tests run under.
//!
//! build (cached) -> start with an empty etcd -> CMD with the cluster's environment
//! -> stop, always: also when CMD fails, when start fails half-way, and on Ctrl-C or
//! SIGTERM (which are passed on to CMD, which decides how to end). Exits with CMD's
//! status (128+N if a signal killed it).
//!
//! CMD's environment: KUBECONFIG (admin, system:masters), ICMP_GUARD_K8S_STATE,
//! ICMP_GUARD_KUBECTL, ICMP_GUARD_CONTAINERD_SOCK, ICMP_GUARD_K8S_NODE,
//! ICMP_GUARD_TESTBOX_IMAGE, ICMP_GUARD_XTASK (this xtask binary).

use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::cluster::{self, StateLock};
use super::{CommandExit, Layout, build, require_root, stop};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The command and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    pub cmd: Vec<String>,
}

/// The last SIGINT/SIGTERM/SIGHUP received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// A signal to pass on to CMD: one sent to us with kill(2). A Ctrl-C from the
/// terminal already reached CMD (same process group) and is not sent twice.
static FORWARD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL.store(sig, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO. si_code <= 0 means
    // sent by a process (SI_USER, SI_QUEUE, ...), > 0 by the kernel (the terminal).
    let from_process = info.is_null() || unsafe { (*info).si_code } <= 0;
    if from_process || sig != libc::SIGINT {
        FORWARD.store(sig, Ordering::SeqCst);
    }
}

fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only stores atomics.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// True once SIGINT/SIGTERM/SIGHUP arrived during `test` (start's waits give up).
pub fn interrupted() -> bool {
    SIGNAL.load(Ordering::SeqCst) != 0
}

/// The command as one could paste it into a shell.
fn shell_words(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| crate::vm::initramfs::sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

pub fn run(args: TestArgs) -> Result<()> {
    require_root("test")?;
    install_handlers();
    let layout = Layout::new()?;
    let _lock = StateLock::acquire(&layout)?;

    let t = Instant::now();
    build::ensure(&layout)?;
    let t_build = t.elapsed();
    if interrupted() {
        bail!("interrupted during build; the cluster was not started");
    }

    let t = Instant::now();
    let started = cluster::start(&layout, true);
    let t_start = t.elapsed();
    // start stops whatever it started when it fails.
    let started = started?;

    let t = Instant::now();
    let outcome = if interrupted() {
        Err(anyhow::anyhow!("interrupted during start; CMD was not run"))
    } else {
        run_command(&layout, &started.node, &args.cmd)
    };
    let t_cmd = t.elapsed();

    let t = Instant::now();
    let stopped = stop::stop(&layout, false);
    let t_stop = t.elapsed();

    let code = match &outcome {
        Ok(c) => *c,
        Err(_) => 1,
    };
    println!(
        "k8s test: build {:.1} s, start {:.1} s (node Ready {:.1} s), command {:.1} s (exit {code}), stop {:.1} s",
        t_build.as_secs_f64(),
        t_start.as_secs_f64(),
        started.ready_after.as_secs_f64(),
        t_cmd.as_secs_f64(),
        t_stop.as_secs_f64()
    );
    let code = outcome?;
    if let Err(e) = stopped {
        if code == 0 {
            return Err(e.context("the command passed, but stopping the cluster failed"));
        }
        eprintln!("k8s test: stopping the cluster also failed: {e:#}");
    }
    if code != 0 {
        return Err(CommandExit {
            code,
            message: format!("`{}` exited with {code}", shell_words(&args.cmd)),
        }
        .into());
    }
    Ok(())
}

/// Runs CMD with the cluster's environment; its exit code. Signals sent to us are
/// passed on; we keep waiting until CMD is gone, whatever it does with them.
fn run_command(layout: &Layout, node: &str, cmd: &[String]) -> Result<i32> {
    let env = cluster::test_env(layout, node);
    eprintln!("k8s test: running `{}`", shell_words(cmd));
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .spawn()
        .with_context(|| format!("starting `{}`", cmd[0]))?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(exit_code(status));
        }
        let sig = FORWARD.swap(0, Ordering::SeqCst);
        if sig != 0 {
            // SAFETY: kill(2) on our own child, which try_wait says is not reaped.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
