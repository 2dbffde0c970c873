//! Replays the committed fuzz corpus (`fuzz/corpus/<target>`) through the fuzz targets' own
//! bodies on the stable toolchain, so every input a fuzzer once found interesting, and every
//! input that once crashed a parser, is checked by `cargo test` on every run. `cargo xtask fuzz`
//! is what searches for new ones.

#[path = "../../fuzz/src/targets.rs"]
#[allow(dead_code)]
mod targets;

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

/// As libFuzzer's `-timeout` in `cargo xtask fuzz`: one input taking longer is a hang.
const PER_INPUT: Duration = Duration::from_secs(10);

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, body) = targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap();
    let files = corpus(target);
    assert!(
        !files.is_empty(),
        "fuzz/corpus/{target} is empty: run `cargo xtask fuzz --target {target} --merge`"
    );
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let (tx, rx) = mpsc::channel();
        let body = *body;
        let name = file.display().to_string();
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(|| body(&data));
            let _ = tx.send(result.is_ok());
        });
        match rx.recv_timeout(PER_INPUT) {
            Ok(true) => {}
            Ok(false) => panic!("{target} panicked on {name} (message above)"),
            Err(_) => panic!("{target} took more than {PER_INPUT:?} on {name}: a hang"),
        }
    }
    println!("{target}: {} inputs replayed", files.len());
}

#[test]
fn kubearmor_policy_corpus() {
    replay("kubearmor_policy");
}

#[test]
fn agent_config_corpus() {
    replay("agent_config");
}

#[test]
fn audit_detect_corpus() {
    replay("audit_detect");
}

#[test]
fn audit_aws_corpus() {
    replay("audit_aws");
}

#[test]
fn audit_cloudformation_corpus() {
    replay("audit_cloudformation");
}

#[test]
fn audit_terraform_corpus() {
    replay("audit_terraform");
}

#[test]
fn audit_terraform_plan_corpus() {
    replay("audit_terraform_plan");
}

#[test]
fn every_target_has_a_replay_test() {
    let me = include_str!("fuzz_corpus.rs");
    for (name, _) in targets::TARGETS {
        assert!(
            me.contains(&format!("fn {name}_corpus()")),
            "add a replay test for the fuzz target {name}"
        );
    }
}
