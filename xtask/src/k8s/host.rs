//! What the cluster changes on the host outside its state dir, saved by `start`
//! before it touches anything and put back by `stop`.
//!
//! Saved in `<state>/host/` (once: a second `start` after a crash keeps the first,
//! true original; `stop` deletes it after restoring):
//! - `iptables.v4`, `iptables.v6`: `iptables-save` / `ip6tables-save`. kubelet,
//!   kube-proxy and the CNI portmap plugin add KUBE-* / CNI-* chains and rules; the
//!   harness adds its guard chains (below). `stop` runs `iptables-restore` of the
//!   saved text, which replaces every table it names, and deletes (`nft delete
//!   table`) the tables that did not exist before, so `iptables-save` is exactly
//!   what it was, counters aside.
//! - `sysctl`: the values of the sysctls the kubelet, kube-proxy and the CNI bridge
//!   plugin set (`vm.overcommit_memory`, `kernel.panic*`, `net.ipv4.ip_forward`, ...).
//! - `absent-paths`: host paths the components create if missing (/run/containerd,
//!   /var/log/pods, ...), to remove again.
//!
//! The harness's own network, created here and deleted by `stop`:
//! - the interface `icmpg-api0` (a dummy interface, or an empty bridge where the
//!   kernel has no dummy driver) holding 10.250.0.1/32, the node's address: the
//!   apiserver advertises it (so it is the `kubernetes` Service's endpoint) and the
//!   kubelet serves on it. A route sends the whole Service range 10.96.0.0/16 to it,
//!   so a Service IP that kube-proxy has not (or no longer) translated is dropped on
//!   the machine instead of going to the default gateway.
//! - guard chains: ICMPG-K8S-INPUT lets the apiserver (which listens on 0.0.0.0) and
//!   the kubelet be reached only from the machine itself and the apiserver also from
//!   pods; ICMPG-K8S-FORWARD keeps pod traffic on the cni0 bridge, so nothing a pod
//!   sends is ever forwarded out of the machine.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::{
    API_IFACE, APISERVER_PORT, CNI_BRIDGE, KUBELET_PORT, Layout, NODE_IP, SERVICE_CIDR, exists,
    run_checked,
};

/// Sysctls something in the cluster may set. Missing ones (no conntrack yet, no
/// bridge netfilter) are skipped at save time.
const SYSCTLS: &[&str] = &[
    // kubelet (setupKernelTunables, with --protect-kernel-defaults=false)
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    // the CNI bridge plugin (isGateway) and kube-proxy
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    // the kernel clears it when forwarding is switched on and sets it when off;
    // saved anyway, and written after ip_forward
    "net.ipv4.conf.all.accept_redirects",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
];

/// Host paths the components create when missing (containerd's runc root and shim
/// sockets, the kubelet's pod log dirs, CRI's netns dir, containerd's opt dir).
const CREATED_PATHS: &[&str] = &[
    "/run/containerd",
    "/var/log/pods",
    "/var/log/containers",
    "/run/netns",
    "/opt/containerd",
    // libcni's result cache (containerd 1.6 has no setting for it)
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/etc/kubernetes",
];

const GUARD_INPUT: &str = "ICMPG-K8S-INPUT";
const GUARD_FORWARD: &str = "ICMPG-K8S-FORWARD";
const COMPLETE: &str = "complete";

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

pub fn read_sysctl(key: &str) -> Option<String> {
    fs::read_to_string(sysctl_path(key))
        .ok()
        .map(|v| v.trim().to_string())
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
    fs::write(sysctl_path(key), value).with_context(|| format!("setting {key}={value}"))
}

/// Saves the host state unless a complete snapshot is already there.
pub fn save(layout: &Layout) -> Result<()> {
    let dir = layout.host_saved();
    if dir.join(COMPLETE).exists() {
        eprintln!(
            "k8s start: keeping the host state saved by an earlier start in {} (it was never restored)",
            dir.display()
        );
        return Ok(());
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (save_bin, file) in [
        ("iptables-save", "iptables.v4"),
        ("ip6tables-save", "iptables.v6"),
    ] {
        let out = run_checked(&mut Command::new(save_bin))
            .with_context(|| format!("{save_bin} (apt-get install -y iptables)"))?;
        fs::write(dir.join(file), &out.stdout)?;
    }
    let mut sysctls = String::new();
    for key in SYSCTLS {
        if let Some(v) = read_sysctl(key) {
            sysctls.push_str(&format!("{key}={v}\n"));
        }
    }
    fs::write(dir.join("sysctl"), sysctls)?;
    let absent: Vec<&str> = CREATED_PATHS
        .iter()
        .copied()
        .filter(|p| !exists(Path::new(p)))
        .collect();
    fs::write(dir.join("absent-paths"), absent.join("\n") + "\n")?;
    fs::write(dir.join(COMPLETE), "")?;
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args)).map(|_| ())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn iptables(args: &[&str]) -> Result<()> {
    // -w: kubelet and kube-proxy hold the xtables lock at times.
    run_checked(Command::new("iptables").arg("-w").args(args)).map(|_| ())
}

/// Creates the API interface, the Service route and the guard chains. Idempotent.
pub fn setup_network() -> Result<()> {
    if !link_exists(API_IFACE) {
        // This sandbox's kernel has no dummy driver; a bridge without ports is the
        // same thing for our purpose (a local address, and a sink for the route).
        if ip(&["link", "add", API_IFACE, "type", "dummy"]).is_err() {
            ip(&["link", "add", API_IFACE, "type", "bridge"])
                .with_context(|| format!("creating the interface {API_IFACE}"))?;
        }
    }
    // No IPv6 link-local address, so nothing ever autoconfigures on it.
    let _ = write_sysctl(&format!("net.ipv6.conf.{API_IFACE}.disable_ipv6"), "1");
    let addrs =
        run_checked(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", API_IFACE]))?;
    if !String::from_utf8_lossy(&addrs.stdout).contains(&format!(" {NODE_IP}/")) {
        ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", API_IFACE])?;
    }
    ip(&["link", "set", API_IFACE, "up"])?;
    ip(&[
        "route",
        "replace",
        SERVICE_CIDR,
        "dev",
        API_IFACE,
        "src",
        NODE_IP,
    ])?;

    let existing = run_checked(Command::new("iptables-save").args(["-t", "filter"]))?;
    let existing = String::from_utf8_lossy(&existing.stdout).into_owned();
    if !existing.contains(&format!(":{GUARD_INPUT} ")) {
        let ports = format!("{APISERVER_PORT},{KUBELET_PORT}");
        let api = APISERVER_PORT.to_string();
        iptables(&["-N", GUARD_INPUT])?;
        iptables(&["-A", GUARD_INPUT, "-i", "lo", "-j", "RETURN"])?;
        iptables(&[
            "-A",
            GUARD_INPUT,
            "-i",
            CNI_BRIDGE,
            "-p",
            "tcp",
            "--dport",
            &api,
            "-j",
            "RETURN",
        ])?;
        iptables(&[
            "-A",
            GUARD_INPUT,
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            &ports,
            "-j",
            "DROP",
        ])?;
        iptables(&["-I", "INPUT", "1", "-j", GUARD_INPUT])?;
    }
    if !existing.contains(&format!(":{GUARD_FORWARD} ")) {
        iptables(&["-N", GUARD_FORWARD])?;
        iptables(&[
            "-A",
            GUARD_FORWARD,
            "-i",
            CNI_BRIDGE,
            "-o",
            CNI_BRIDGE,
            "-j",
            "RETURN",
        ])?;
        iptables(&["-A", GUARD_FORWARD, "-i", CNI_BRIDGE, "-j", "DROP"])?;
        iptables(&["-A", GUARD_FORWARD, "-o", CNI_BRIDGE, "-j", "DROP"])?;
        iptables(&["-I", "FORWARD", "1", "-j", GUARD_FORWARD])?;
    }
    Ok(())
}

/// Deletes the harness's interfaces (cni0 too: the bridge plugin creates it, and it
/// is refused at start if it was there before). The Service route goes with the
/// interface.
pub fn remove_links(report: &mut Vec<String>) {
    for name in [CNI_BRIDGE, API_IFACE] {
        if link_exists(name) {
            match ip(&["link", "delete", name]) {
                Ok(()) => report.push(format!("deleted interface {name}")),
                Err(e) => report.push(format!("WARNING: could not delete {name}: {e:#}")),
            }
        }
    }
}

/// The table names (`*filter`) in iptables-save output.
fn tables(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix('*'))
        .map(|t| t.trim().to_string())
        .collect()
}

/// iptables-save output without comments and counters, for comparison.
pub fn normalize_save(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            if l.starts_with(':') {
                // ":INPUT ACCEPT [12:345]" -> ":INPUT ACCEPT"
                match l.rfind(" [") {
                    Some(i) => l[..i].to_string(),
                    None => l.to_string(),
                }
            } else {
                l.to_string()
            }
        })
        .collect()
}

fn is_nf_tables() -> bool {
    Command::new("iptables")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("nf_tables"))
        .unwrap_or(false)
}

/// Puts one family's tables back as saved; returns whether iptables-save now equals
/// the saved text (comments and counters aside).
fn restore_iptables(
    family: &str,
    save_bin: &str,
    restore_bin: &str,
    saved: &str,
    report: &mut Vec<String>,
) -> Result<bool> {
    let now =
        String::from_utf8_lossy(&run_checked(&mut Command::new(save_bin))?.stdout).into_owned();
    if normalize_save(&now) == normalize_save(saved) {
        return Ok(true);
    }
    if !saved.trim().is_empty() {
        let mut child = Command::new(restore_bin)
            .arg("-w")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {restore_bin}"))?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(saved.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{restore_bin} of the saved state failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let iptables_bin = save_bin.trim_end_matches("-save");
    for table in tables(&now).difference(&tables(saved)) {
        // A table that did not exist before: empty it, then delete it outright where
        // the backend allows (nf_tables); legacy tables cannot be deleted, only
        // emptied.
        let _ = Command::new(iptables_bin)
            .args(["-w", "-t", table, "-F"])
            .status();
        let _ = Command::new(iptables_bin)
            .args(["-w", "-t", table, "-X"])
            .status();
        if is_nf_tables() {
            let st = Command::new("nft")
                .args(["delete", "table", family, table])
                .stderr(Stdio::null())
                .status();
            if !st.is_ok_and(|s| s.success()) {
                report.push(format!(
                    "WARNING: could not delete the {family} table {table} (apt-get install -y nftables)"
                ));
            }
        }
    }
    let after =
        String::from_utf8_lossy(&run_checked(&mut Command::new(save_bin))?.stdout).into_owned();
    Ok(normalize_save(&after) == normalize_save(saved))
}

/// Restores what `save` saved and deletes the snapshot. Without a snapshot (nothing
/// was started since the last stop) it only says so.
pub fn restore(layout: &Layout, report: &mut Vec<String>) -> Result<()> {
    let dir = layout.host_saved();
    if !dir.join(COMPLETE).exists() {
        report.push("no saved host state (the cluster was not started since the last stop)".into());
        return Ok(());
    }
    let mut all_ok = true;
    for (family, save_bin, restore_bin, file) in [
        ("ip", "iptables-save", "iptables-restore", "iptables.v4"),
        ("ip6", "ip6tables-save", "ip6tables-restore", "iptables.v6"),
    ] {
        let saved = fs::read_to_string(dir.join(file)).unwrap_or_default();
        match restore_iptables(family, save_bin, restore_bin, &saved, report) {
            Ok(true) => report.push(format!("{save_bin}: identical to before start")),
            Ok(false) => {
                all_ok = false;
                report.push(format!(
                    "WARNING: {save_bin} differs from the state saved in {}",
                    dir.join(file).display()
                ));
            }
            Err(e) => {
                all_ok = false;
                report.push(format!("WARNING: restoring {file}: {e:#}"));
            }
        }
    }

    let saved = fs::read_to_string(dir.join("sysctl")).unwrap_or_default();
    let mut changed = Vec::new();
    for line in saved.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if read_sysctl(key).as_deref() != Some(value) {
            match write_sysctl(key, value) {
                Ok(()) => changed.push(format!("{key}={value}")),
                Err(e) => {
                    all_ok = false;
                    report.push(format!("WARNING: {e:#}"));
                }
            }
        }
    }
    if changed.is_empty() {
        report.push("sysctls: unchanged".into());
    } else {
        report.push(format!("sysctls restored: {}", changed.join(" ")));
    }

    let absent = fs::read_to_string(dir.join("absent-paths")).unwrap_or_default();
    for p in absent.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let p = Path::new(p);
        if !exists(p) {
            continue;
        }
        let res = if p == Path::new("/run/netns") {
            // may hold other tools' namespaces by now: only if empty
            fs::remove_dir(p)
        } else if p.is_dir() {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
        match res {
            Ok(()) => report.push(format!("removed {}", p.display())),
            Err(e) => {
                all_ok = false;
                report.push(format!("WARNING: could not remove {}: {e}", p.display()));
            }
        }
    }
    if all_ok {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    } else {
        report.push(format!(
            "the saved host state stays in {} for the next stop",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_normalization() {
        let a = "# Generated by iptables-nft-save v1.8.9 on Sat\n*filter\n:INPUT ACCEPT [12:345]\n:KUBE-X - [0:0]\n-A INPUT -j KUBE-X\nCOMMIT\n# Completed on Sat\n";
        let b = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-X - [9:9]\n-A INPUT -j KUBE-X\nCOMMIT\n";
        assert_eq!(normalize_save(a), normalize_save(b));
        assert_eq!(tables(a), BTreeSet::from(["filter".to_string()]));
        assert!(normalize_save("").is_empty());
    }
}
