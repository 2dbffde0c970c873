//! `cargo xtask k8s stop [--purge]`: stops what `start` started and puts the host
//! back. Safe to run when nothing runs (every step tolerates its object missing),
//! and after a crash (pid files, the saved host state and the leftovers on the host
//! are all it needs).
//!
//! Order matters: the kubelet first (it would restart containers), then every
//! container through containerd (graceful, then SIGKILL), the control plane, the
//! shims and containerd; then mounts, network namespaces, interfaces, the kubepods
//! cgroups, and last iptables and sysctls (so nothing re-adds rules after the
//! restore).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;

use super::cluster::{StateLock, component_pid};
use super::{Layout, ctr, host, require_root};

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Also delete etcd data, containerd's root (imported images, snapshots) and the
    /// kubelet dir; the cached binaries and image archives stay
    #[arg(long)]
    pub purge: bool,
}

pub fn run(args: StopArgs) -> Result<()> {
    let layout = Layout::new()?;
    require_root("stop")?;
    let _lock = StateLock::acquire(&layout)?;
    stop(&layout, args.purge)
}

/// The stop itself, for `start` (after a failure) and `test` (always at the end).
pub fn stop(layout: &Layout, purge: bool) -> Result<()> {
    let t0 = Instant::now();
    let mut report: Vec<String> = Vec::new();

    // The kubelet (and kube-proxy) first, so that nothing restarts containers.
    for c in ["kube-proxy", "kubelet"] {
        kill_component(layout, c, &mut report);
    }
    // Which network namespaces are our pods', asked before the containers that
    // name them are deleted: other tools on the machine may have cni-* ones too.
    let netns = our_netns(layout);
    remove_containers(layout, &mut report);
    for c in [
        "kube-scheduler",
        "kube-controller-manager",
        "kube-apiserver",
        "etcd",
    ] {
        kill_component(layout, c, &mut report);
    }
    kill_shims(layout, &mut report);
    kill_component(layout, "containerd", &mut report);
    if component_pid(layout, "containerd").is_none() {
        let sock = layout.containerd_sock();
        let _ = fs::remove_file(&sock);
        let _ = fs::remove_file(sock.with_extension("sock.ttrpc"));
    }
    // Anything still in a pod's cgroup (a shim was killed before its container,
    // say) would keep the cgroups and mounts busy.
    kill_kubepods_processes(&mut report);

    // Our containerd mounts nothing outside the state dir (its runc root is in there
    // too; only the shim sockets are in /run/containerd/s).
    unmount_under(std::slice::from_ref(&layout.state), &mut report);
    delete_netns(&netns, &mut report);
    host::remove_links(&mut report);
    remove_kubepods_cgroups(&mut report);
    // IPs handed out by host-local; the pods they belonged to are gone.
    let ipam = layout.cni_dir().join("ipam");
    if ipam.exists() {
        let _ = fs::remove_dir_all(&ipam);
    }
    if let Err(e) = host::restore(layout, &mut report) {
        report.push(format!("WARNING: restoring the host state: {e:#}"));
    }
    let _ = fs::remove_file(layout.state.join("env"));

    if purge {
        for d in [
            layout.etcd_data(),
            layout.containerd_root(),
            layout.containerd_state(),
            layout.containerd_dir().join("runc"),
            layout.kubelet_dir(),
        ] {
            if d.exists() {
                match fs::remove_dir_all(&d) {
                    Ok(()) => report.push(format!("purged {}", d.display())),
                    Err(e) => report.push(format!("WARNING: purging {}: {e}", d.display())),
                }
            }
        }
    }

    for line in &report {
        eprintln!("k8s stop: {line}");
    }
    let warnings = report.iter().filter(|l| l.starts_with("WARNING")).count();
    println!(
        "k8s stop: done in {:.1} s{}",
        t0.elapsed().as_secs_f64(),
        if warnings > 0 {
            format!(" with {warnings} warning(s) above")
        } else {
            String::new()
        }
    );
    if warnings > 0 {
        anyhow::bail!("the host was not fully restored ({warnings} warning(s))");
    }
    Ok(())
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    // A zombie (our own unreaped child) counts as gone.
    exists
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

/// SIGTERM, up to 10 s, then SIGKILL; by pid file, verified against the executable.
fn kill_component(layout: &Layout, name: &str, report: &mut Vec<String>) {
    let pid_file = layout.pids().join(format!("{name}.pid"));
    if let Some(pid) = component_pid(layout, name) {
        let how = terminate(pid, Duration::from_secs(10));
        report.push(format!("stopped {name} (pid {pid}{how})"));
    }
    let _ = fs::remove_file(pid_file);
}

/// Returns "" or ", SIGKILL" for the report.
fn terminate(pid: i32, grace: Duration) -> &'static str {
    // SAFETY: plain kill(2) on a pid we verified.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < grace {
        if !pid_alive(pid) {
            return "";
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ", SIGKILL"
}

fn ctr_lines(layout: &Layout, args: &[&str]) -> Vec<String> {
    ctr(layout)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Stops every task (SIGTERM, 5 s, SIGKILL) and deletes every container (app and
/// sandbox) with its snapshot, so that containerd's CRI comes back empty next time.
fn remove_containers(layout: &Layout, report: &mut Vec<String>) {
    if component_pid(layout, "containerd").is_none() {
        return;
    }
    let running = |layout: &Layout| -> Vec<String> {
        ctr_lines(layout, &["tasks", "ls"])
            .iter()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(2) == Some("RUNNING"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    let tasks = running(layout);
    for id in &tasks {
        let _ = ctr(layout)
            .args(["tasks", "kill", id])
            .stderr(Stdio::null())
            .status();
    }
    let t = Instant::now();
    while !running(layout).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in running(layout) {
        let _ = ctr(layout)
            .args(["tasks", "kill", "--signal", "SIGKILL", &id])
            .stderr(Stdio::null())
            .status();
    }
    let t = Instant::now();
    while !running(layout).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in ctr_lines(layout, &["tasks", "ls", "-q"]) {
        let _ = ctr(layout)
            .args(["tasks", "delete", "--force", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let containers = ctr_lines(layout, &["containers", "ls", "-q"]);
    for id in &containers {
        let _ = ctr(layout)
            .args(["containers", "delete", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if !containers.is_empty() {
        report.push(format!(
            "removed {} container(s) ({} task(s) were running)",
            containers.len(),
            tasks.len()
        ));
    }
}

fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// containerd-shim-runc-v2 processes of our containerd (their `-address` is our
/// socket) outlive containerd; they are found by that argument, not by name.
fn kill_shims(layout: &Layout, report: &mut Vec<String>) {
    let sock = layout.containerd_sock().display().to_string();
    for pid in all_pids() {
        let argv = cmdline(pid);
        let is_ours = argv.first().is_some_and(|a| a.contains("containerd-shim"))
            && argv.windows(2).any(|w| w[0] == "-address" && w[1] == sock);
        if is_ours {
            // SAFETY: kill(2) on a shim identified by its arguments.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            report.push(format!("killed leftover shim {pid}"));
        }
    }
}

/// Every cgroup hierarchy's `kubepods` directory (v1 controllers, the named
/// systemd hierarchy, and cgroup2 at /sys/fs/cgroup/unified or /sys/fs/cgroup).
fn kubepods_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    if root.join("kubepods").is_dir() {
        dirs.push(root.join("kubepods"));
    }
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let d = e.path().join("kubepods");
            if d.is_dir() {
                dirs.push(d);
            }
        }
    }
    dirs
}

fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&e.path(), out);
            }
        }
    }
}

fn kill_kubepods_processes(report: &mut Vec<String>) {
    // The same process is listed in every hierarchy: collect, then kill once.
    let mut pids = std::collections::BTreeSet::new();
    for top in kubepods_dirs() {
        let mut dirs = Vec::new();
        walk_dirs(&top, &mut dirs);
        for d in dirs {
            let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    let killed = pids
        .iter()
        // SAFETY: kill(2) on a process inside the cluster's pod cgroups.
        .filter(|pid| unsafe { libc::kill(**pid, libc::SIGKILL) } == 0)
        .count();
    if killed > 0 {
        report.push(format!(
            "killed {killed} process(es) left in kubepods cgroups"
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// rmdir bottom-up in every hierarchy; retried briefly while killed processes exit.
fn remove_kubepods_cgroups(report: &mut Vec<String>) {
    let tops = kubepods_dirs();
    if tops.is_empty() {
        return;
    }
    let t = Instant::now();
    loop {
        let mut left = Vec::new();
        for top in kubepods_dirs() {
            let mut dirs = Vec::new();
            walk_dirs(&top, &mut dirs);
            for d in dirs.iter().rev() {
                if fs::remove_dir(d).is_err() {
                    left.push(d.clone());
                }
            }
        }
        if left.is_empty() {
            report.push(format!(
                "removed the kubepods cgroups in {} hierarchies",
                tops.len()
            ));
            return;
        }
        if t.elapsed() > Duration::from_secs(10) {
            report.push(format!(
                "WARNING: cgroups left: {}",
                left.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Mount points (from /proc/self/mountinfo, octal escapes decoded) under `roots`.
fn mounts_under(roots: &[PathBuf]) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .map(PathBuf::from)
        .filter(|m| roots.iter().any(|r| m.starts_with(r)))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts (lazily, deepest first, repeated for stacked mounts) everything under
/// `roots`: pods' volumes, sandboxes' /dev/shm, overlay root filesystems.
fn unmount_under(roots: &[PathBuf], report: &mut Vec<String>) {
    let mut count = 0;
    for _ in 0..10 {
        let mut mounts = mounts_under(roots);
        if mounts.is_empty() {
            break;
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2 with a valid C string.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                count += 1;
            }
        }
    }
    let left = mounts_under(roots);
    if count > 0 {
        report.push(format!("unmounted {count} mount(s)"));
    }
    if !left.is_empty() {
        report.push(format!(
            "WARNING: still mounted: {}",
            left.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
}

/// The names (in /run/netns) of our pods' network namespaces: those of the veths
/// on our cni0 (works without containerd, after a crash) and those our sandboxes'
/// specs name (also catches a pod whose CNI setup failed half-way).
fn our_netns(layout: &Layout) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", super::CNI_BRIDGE])
        .stderr(Stdio::null())
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if w.any(|x| x == "link-netns")
                && let Some(n) = w.next()
            {
                names.push(n.to_string());
            }
        }
    }
    if component_pid(layout, "containerd").is_some() {
        for id in ctr_lines(layout, &["containers", "ls", "-q"]) {
            let Ok(out) = ctr(layout).args(["containers", "info", &id]).output() else {
                continue;
            };
            let Ok(info) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                continue;
            };
            let nss = info["Spec"]["linux"]["namespaces"].as_array().cloned();
            for ns in nss.unwrap_or_default() {
                if ns["type"] == "network"
                    && let Some(path) = ns["path"].as_str()
                    && let Some(name) = path
                        .strip_prefix("/var/run/netns/")
                        .or_else(|| path.strip_prefix("/run/netns/"))
                {
                    names.push(name.to_string());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Unmounts and removes the namespaces' files in /run/netns; with the last
/// reference gone the namespace goes, and its veth pair with it.
fn delete_netns(names: &[String], report: &mut Vec<String>) {
    let mut n = 0;
    for name in names {
        if name.contains('/') {
            continue;
        }
        let path = Path::new("/run/netns").join(name);
        if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid C string; failure (not mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if fs::remove_file(&path).is_ok() {
            n += 1;
        }
    }
    if n > 0 {
        report.push(format!("deleted {n} pod network namespace(s)"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }
}
