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
    assert!(unit.contains("RestrictAddressFamilies=AF_UNIX\n"));
    // Point ExecStart at the binary just built, so verify checks everything else.
    let bin = env!("CARGO_BIN_EXE_icmp-guard");
    let dir = std::env::temp_dir().join(format!("icmp-guard-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("icmp-guard.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/icmp-guard", bin)).unwrap();
    let verify = || {
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
    };
    verify();
    // The gRPC stream of the unit is a unix socket, which AF_UNIX allows; TCP listeners come
    // with the drop-in that adds inet sockets. systemd-analyze reads drop-ins next to the unit.
    assert!(unit.contains("--grpc unix:/run/icmp-guard/grpc.sock"));
    assert!(unit.contains("RuntimeDirectory=icmp-guard"));
    let drop_in =
        std::fs::read_to_string(repo().join("deploy/systemd/icmp-guard.service.d/network.conf"))
            .unwrap();
    assert!(drop_in.contains("RestrictAddressFamilies=AF_INET AF_INET6"));
    assert!(drop_in.contains("--grpc 127.0.0.1:32767") && drop_in.contains("--metrics"));
    std::fs::create_dir_all(dir.join("icmp-guard.service.d")).unwrap();
    std::fs::write(
        dir.join("icmp-guard.service.d/network.conf"),
        drop_in.replace("/usr/local/bin/icmp-guard", bin),
    )
    .unwrap();
    verify();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The flags the unit, its drop-in and the DaemonSet give `icmp-guard run` are flags it takes.
#[test]
fn deployed_run_flags_parse() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: icmp_guard::agent::RunArgs,
    }
    let manifest =
        std::fs::read_to_string(repo().join("deploy/kubernetes/04-daemonset.yaml")).unwrap();
    let args: Vec<String> = manifest
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "- run")
        .skip(1)
        .take_while(|l| l.starts_with("- --") || l.starts_with('#'))
        .filter(|l| l.starts_with("- --"))
        .map(|l| l[2..].to_string())
        .collect();
    assert!(args.iter().any(|a| a == "--grpc=0.0.0.0:32767"), "{args:?}");
    let run = Run::try_parse_from(std::iter::once("run".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(run.args.serve.grpc.grpc_insecure);
    assert!(run.args.kubernetes.in_cluster);
    // The kubelet expands `$(ICMP_GUARD_CGROUP)` from the ConfigMap's `cgroup` key.
    assert_eq!(
        run.args.cgroup.as_deref(),
        Some(std::path::Path::new("$(ICMP_GUARD_CGROUP)"))
    );
    assert!(manifest.contains("configMapKeyRef: {name: icmp-guard-config, key: cgroup}"));
    assert_eq!(run.args.serve.grpc.grpc_health.unwrap().port(), 32766);
    for port in [
        "containerPort: 32767",
        "containerPort: 32766",
        "containerPort: 9464",
    ] {
        assert!(manifest.contains(port), "{port}");
    }
    assert!(manifest.contains("kubearmor-app: kubearmor"));
    for file in [
        "deploy/icmp-guard.service",
        "deploy/systemd/icmp-guard.service.d/network.conf",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        let exec = text
            .lines()
            .filter_map(|l| l.strip_prefix("ExecStart="))
            .rfind(|l| !l.is_empty())
            .unwrap();
        let argv: Vec<&str> = exec.split_whitespace().skip(1).collect();
        assert_eq!(argv[0], "run", "{file}");
        Run::try_parse_from(argv).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

/// The ConfigMap's block (`  KEY: |`) as the file it becomes in the pod.
fn config_map_file(manifest: &str, key: &str) -> String {
    let header = format!("  {key}: |\n");
    let start = manifest
        .find(&header)
        .unwrap_or_else(|| panic!("{key} in the ConfigMap"))
        + header.len();
    manifest[start..]
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect()
}

#[test]
fn daemonset_policy_and_config_parse() {
    let manifest =
        std::fs::read_to_string(repo().join("deploy/kubernetes/03-config.yaml")).unwrap();
    let body = config_map_file(&manifest, "host-allow-ping.yaml");
    let loaded =
        icmp_guard::sources::policy::kubearmor::parse_str(&body, "03-config.yaml".as_ref())
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.set.policies.len(), 1);
    assert_eq!(loaded.set.policies[0].name, "host-allow-ping");
    let dir = std::env::temp_dir().join(format!("icmp-guard-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(&config, config_map_file(&manifest, "config.yaml")).unwrap();
    let parsed = icmp_guard::sources::config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.cluster_name, "default");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(manifest.contains("  cgroup: /sys/fs/cgroup/unified/kubepods\n"));
    let ds = std::fs::read_to_string(repo().join("deploy/kubernetes/04-daemonset.yaml")).unwrap();
    assert!(ds.contains("--policy=/etc/icmp-guard/policies"));
    assert!(ds.contains("--config=/etc/icmp-guard/config/config.yaml"));
}
