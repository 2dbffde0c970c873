//! `icmp-guard probe --json` keeps its documented schema: the real binary, on this kernel, as
//! root (the probe loads the LSM program to find out whether the kernel takes it).

mod common;

use std::{collections::BTreeSet, process::Command};

use common::*;
use serde_json::Value;

fn probe(args: &[&str]) -> std::process::Output {
    require_root();
    let out = Command::new(agent_bin())
        .arg("probe")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "icmp-guard probe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
}

/// Every key path of `v` (`a.b.c`), and fails on shapes the schema excludes.
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                assert!(
                    k != "Ok" && k != "Err",
                    "a Rust Result shape at `{prefix}`: {v}"
                );
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(path.clone());
                key_paths(child, &path, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                assert!(!item.is_array(), "`{prefix}` holds arrays of arrays");
                // The keys of objects in an array are documented as `array[].key`.
                let inner = if item.is_object() {
                    format!("{prefix}[]")
                } else {
                    prefix.to_string()
                };
                key_paths(item, &inner, out);
            }
        }
        Value::Null => panic!("`{prefix}` is null; the schema has no nulls"),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
}

#[test]
fn probe_json_follows_the_documented_schema() {
    let out = probe(&["--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let mut paths = BTreeSet::new();
    key_paths(&report, "", &mut paths);

    assert_eq!(report["schema_version"], 1);
    let release = report["kernel_release"].as_str().unwrap();
    assert_eq!(
        release,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );

    let checks = report["checks"].as_object().expect("checks is an object");
    assert!(!checks.is_empty());
    for (name, check) in checks {
        let keys: BTreeSet<&str> = check
            .as_object()
            .unwrap_or_else(|| panic!("checks.{name} is not an object: {check}"))
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["detail", "supported"]),
            "checks.{name}"
        );
        assert!(check["supported"].is_boolean(), "checks.{name}: {check}");
        let detail = check["detail"].as_str().unwrap();
        assert!(!detail.is_empty(), "checks.{name} has an empty detail");
    }

    // What this machine is: the checks agree with it.
    let cgroup2 = &report["checks"]["cgroup2"];
    assert_eq!(cgroup2["supported"], true);
    assert_eq!(
        cgroup2["detail"],
        cgroup2_mount().to_str().unwrap(),
        "cgroup2 detail is the mount point"
    );
    let lsm = report["checks"]["lsm_programs"]["supported"]
        .as_bool()
        .unwrap();
    let picks = report["enforcer"]["auto_picks"].as_str().unwrap();
    assert_eq!(picks, if lsm { "lsm" } else { "cgroup" });
    let blind = report["enforcer"]["blind_spots"].as_array().unwrap();
    assert_eq!(blind.is_empty(), lsm, "blind spots: {blind:?}");
    assert!(blind.iter().all(Value::is_string));

    // Docs match behaviour: every key printed is in the README's table, and every check the
    // table names is printed.
    let readme = readme();
    for path in &paths {
        let documented = match path.strip_prefix("checks.") {
            Some(rest) => match rest.split_once('.') {
                Some((_, field)) => format!("`checks.*.{field}`"),
                None => format!("`{path}`"),
            },
            None => format!("`{path}`"),
        };
        assert!(
            readme.contains(&format!("| {documented} |")),
            "probe --json prints `{path}`, which the README's key table does not document"
        );
    }
    for line in readme.lines() {
        if let Some(rest) = line.strip_prefix("| `checks.")
            && let Some((name, _)) = rest.split_once('`')
            && !name.starts_with('*')
        {
            assert!(
                checks.contains_key(name),
                "the README documents checks.{name}, which probe --json does not print"
            );
        }
    }
}

#[test]
fn probe_text_names_the_enforcer_auto_picks() {
    let out = probe(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--enforcer auto picks"), "{text}");
    assert!(text.contains(cgroup2_mount().to_str().unwrap()), "{text}");
    assert!(!text.contains("Ok(") && !text.contains("Err("), "{text}");
}
