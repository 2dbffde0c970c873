//! `cargo xtask bench-upgrade`: what a package upgrade of an allowed binary costs its users.
//!
//! Two agents run side by side, each on a cgroup of its own with the same policy (only
//! /usr/bin/ping may open ICMP and raw sockets): one with the inotify watch of the `fromSource`
//! directories (the default), one with it turned off (`--no-source-watch`, the periodic round
//! only). In each cgroup `ping -c1 -W1 127.0.0.1` runs every 10 ms while
//! `apt-get install --reinstall iputils-ping` runs N times: dpkg writes /usr/bin/ping.dpkg-new
//! and renames it over /usr/bin/ping, a new inode each time. A ping that starts before its
//! agent knows the new inode is refused.
//!
//! So that nothing else on the machine sees ping change, everything runs in a private mount
//! namespace where /usr/bin is an overlay whose upper layer is a tmpfs: dpkg's renames land
//! there, and the host's /usr/bin/ping is never touched. (dpkg's own database under
//! /var/lib/dpkg is rewritten with the same package.) The .deb comes from apt's cache, fetched
//! from the Debian mirror if missing.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::bench_agent::{Agent, cgroup2_mount, host_allow_policy, release_agent, require_root};

#[derive(Debug, Args)]
pub struct BenchUpgradeArgs {
    /// How many times to reinstall iputils-ping
    #[arg(long, default_value_t = 50)]
    pub runs: u32,
    /// Use this agent binary instead of building `-p icmp-guard --release`
    #[arg(long)]
    pub agent: Option<PathBuf>,
}

const PING: &str = "/usr/bin/ping";

/// One agent and the pings in its cgroup.
struct Side {
    name: &'static str,
    cgroup: PathBuf,
    alerts: PathBuf,
    agent: Option<Agent>,
    pings: Option<Child>,
    stop: PathBuf,
}

#[derive(Default, Debug)]
struct Outcome {
    pings: u64,
    failed: u64,
    refused: u64,
    alerts: u64,
    refreshes: usize,
    missed: usize,
    sample: Vec<String>,
}

pub fn run(args: BenchUpgradeArgs) -> Result<()> {
    require_root("bench-upgrade")?;
    if !Path::new(PING).exists() {
        bail!("{PING} is missing: apt-get install iputils-ping");
    }
    let agent_bin = release_agent(args.agent)?;
    let tag = format!("restarts-{}", std::process::id());
    let scratch = std::env::temp_dir().join(format!("icmp-guard-bench-upgrade-{tag}"));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;

    let result = bench(&agent_bin, &scratch, &tag, args.runs);
    let _ = fs::remove_dir_all(&scratch);
    result
}

fn bench(agent_bin: &Path, scratch: &Path, tag: &str, runs: u32) -> Result<()> {
    // The .deb of the installed version, from the Debian mirror; apt installs it from this
    // file each time (apt's own cache may be cleaned after every install).
    let st = Command::new("apt-get")
        .args(["download", "iputils-ping"])
        .current_dir(scratch)
        .stdout(Stdio::null())
        .status()
        .context("running apt-get (install apt)")?;
    if !st.success() {
        bail!("apt-get could not download iputils-ping: check the Debian mirror in sources.list");
    }
    let deb = fs::read_dir(scratch)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download wrote no .deb")?;

    private_usr_bin(scratch)?;
    let result = bench_in_namespace(agent_bin, scratch, tag, runs, &deb);
    // The overlay and its tmpfs exist in this process's namespace only; unmounted so that the
    // scratch directory can go.
    for m in [c"/usr/bin".to_owned(), path_c(&scratch.join("layer"))] {
        // SAFETY: a valid C string.
        unsafe { libc::umount2(m.as_ptr(), libc::MNT_DETACH) };
    }
    result
}

fn path_c(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL")
}

fn bench_in_namespace(
    agent_bin: &Path,
    scratch: &Path,
    tag: &str,
    runs: u32,
    deb: &Path,
) -> Result<()> {
    let policy = scratch.join("policy.yaml");
    fs::write(&policy, host_allow_policy("icmp,raw", Path::new(PING)))?;
    let root = cgroup2_mount()?;
    let mut sides = Vec::new();
    for (name, extra) in [
        ("inotify watch", &[][..]),
        ("periodic round only", &["--no-source-watch"][..]),
    ] {
        let key = name.split(' ').next().expect("a word");
        let cgroup = root.join(format!("icmp-guard-bench-upgrade-{tag}-{key}"));
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating the cgroup {}", cgroup.display()))?;
        let alerts = scratch.join(format!("alerts-{key}.jsonl"));
        let mut a = vec![
            "--policy",
            policy.to_str().expect("utf-8"),
            "--output",
            alerts.to_str().expect("utf-8"),
            "--no-pin",
        ];
        a.extend_from_slice(extra);
        let agent = Agent::start(agent_bin, &cgroup, &a)?;
        sides.push(Side {
            name,
            stop: scratch.join(format!("stop-{key}")),
            cgroup,
            alerts,
            agent: Some(agent),
            pings: None,
        });
    }
    let result = measure(&mut sides, runs, deb);
    for side in &mut sides {
        let _ = fs::write(&side.stop, "");
    }
    let mut outcomes = Vec::new();
    for side in &mut sides {
        outcomes.push(finish(side));
    }
    for side in &sides {
        for _ in 0..50 {
            if fs::remove_dir(&side.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let elapsed = result?;
    let outcomes: Vec<Outcome> = outcomes.into_iter().collect::<Result<_>>()?;
    println!(
        "bench-upgrade: {} reinstalls of iputils-ping in {:.0} s, ping every 10 ms in each \
         agent's cgroup",
        runs,
        elapsed.as_secs_f64()
    );
    println!(
        "{:<22} {:>7} {:>8} {:>8} {:>8} {:>10} {:>8}",
        "agent", "pings", "failed", "refused", "alerts", "refreshes", "missed"
    );
    for (side, o) in sides.iter().zip(&outcomes) {
        println!(
            "{:<22} {:>7} {:>8} {:>8} {:>8} {:>10} {:>8}",
            side.name, o.pings, o.failed, o.refused, o.alerts, o.refreshes, o.missed
        );
    }
    println!(
        "(refused: pings whose sockets were refused; alerts: Block alerts for {PING}; \
         refreshes: rounds that applied a replaced fromSource binary; missed: WARNs that the \
         periodic round found one inotify had not reported)"
    );
    for (side, o) in sides.iter().zip(&outcomes) {
        for s in o.sample.iter().take(3) {
            println!("  {} failure: {s}", side.name);
        }
    }
    Ok(())
}

/// Moves this process into a private mount namespace where /usr/bin is an overlay on a tmpfs.
fn private_usr_bin(scratch: &Path) -> Result<()> {
    // SAFETY: plain syscalls; this process is single-threaded so far, as unshare needs.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            bail!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            bail!("making / private: {}", std::io::Error::last_os_error());
        }
    }
    let layer = scratch.join("layer");
    fs::create_dir_all(&layer)?;
    mount("tmpfs", &layer, "tmpfs", "")?;
    fs::create_dir_all(layer.join("upper"))?;
    fs::create_dir_all(layer.join("work"))?;
    mount(
        "overlay",
        Path::new("/usr/bin"),
        "overlay",
        &format!(
            "lowerdir=/usr/bin,upperdir={},workdir={}",
            layer.join("upper").display(),
            layer.join("work").display()
        ),
    )
}

fn mount(src: &str, target: &Path, fs: &str, data: &str) -> Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src_c, target_c, fs_c, data_c) =
        (c(src), c(target.to_str().expect("utf-8")), c(fs), c(data));
    // SAFETY: valid C strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            fs_c.as_ptr(),
            0,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting {fs} on {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Starts the pings, runs the reinstalls, returns how long they took.
fn measure(sides: &mut [Side], runs: u32, deb: &Path) -> Result<Duration> {
    for side in sides.iter_mut() {
        // The shell moves itself into the cgroup before the first ping; each ping reports one
        // line.
        let script = format!(
            "echo $$ > {}/cgroup.procs || exit 1\n\
             while [ ! -e {stop} ]; do\n\
               if out=$({PING} -c1 -W1 127.0.0.1 2>&1); then echo ok; \
               else echo \"fail $(echo \"$out\" | tail -n1)\"; fi\n\
               sleep 0.01\n\
             done\n",
            side.cgroup.display(),
            stop = side.stop.display(),
        );
        side.pings = Some(
            Command::new("/bin/sh")
                .args(["-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting the ping loop")?,
        );
    }
    let start = Instant::now();
    for i in 0..runs {
        let out = Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=300",
                "install",
                "-y",
                "--reinstall",
            ])
            .arg(deb)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("running apt-get")?;
        if !out.status.success() {
            bail!(
                "reinstall {} of iputils-ping failed: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The last upgrade's pings.
    std::thread::sleep(Duration::from_millis(500));
    Ok(start.elapsed())
}

fn finish(side: &mut Side) -> Result<Outcome> {
    let mut o = Outcome::default();
    if let Some(mut child) = side.pings.take() {
        let stdout = child.stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            o.pings += 1;
            if let Some(why) = line.strip_prefix("fail ") {
                o.failed += 1;
                // What ping says when both its ICMP and raw sockets are refused.
                if [
                    "Operation not permitted",
                    "Permission denied",
                    "Address family",
                ]
                .iter()
                .any(|m| why.contains(m))
                {
                    o.refused += 1;
                }
                if o.sample.len() < 3 {
                    o.sample.push(why.to_string());
                }
            }
        }
        child.wait()?;
    }
    if let Some(mut agent) = side.agent.take() {
        agent.stop()?;
        o.refreshes = agent.log_count("refresh after a fromSource binary changed");
        o.missed = agent.log_count("that inotify did not report");
    }
    let text = fs::read_to_string(&side.alerts).unwrap_or_default();
    for l in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).with_context(|| format!("an alert that is not JSON: {l}"))?;
        if v["ProcessName"] == PING && v["Action"] == "Block" {
            o.alerts += 1;
        }
    }
    Ok(o)
}
