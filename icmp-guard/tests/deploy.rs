//! The deployment files are kept honest: the systemd unit passes `systemd-analyze verify`, and
//! the policy the DaemonSet ships parses with icmp-guard's own parser.

use std::{path::PathBuf, process::Command};

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("deploy/icmp-guard.service")).unwrap();
    assert!(unit.contains("CapabilityBoundingSet=CAP_BPF"));
    assert!(unit.contains("RestrictAddressFamilies=AF_UNIX"));
    // Point ExecStart at the binary just built, so verify checks everything else.
    let bin = env!("CARGO_BIN_EXE_icmp-guard");
    let dir = std::env::temp_dir().join(format!("icmp-guard-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("icmp-guard.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/icmp-guard", bin)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is missing: apt-get install -y systemd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn daemonset_policy_parses() {
    let manifest =
        std::fs::read_to_string(repo().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let start = manifest
        .find("  host-allow-ping.yaml: |\n")
        .expect("policy in the ConfigMap")
        + "  host-allow-ping.yaml: |\n".len();
    let body: String = manifest[start..]
        .lines()
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    let loaded =
        icmp_guard::sources::policy::kubearmor::parse_str(&body, "daemonset.yaml".as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.set.policies.len(), 1);
    assert_eq!(loaded.set.policies[0].name, "host-allow-ping");
    assert!(manifest.contains("--policy=/etc/icmp-guard/policies"));
}
