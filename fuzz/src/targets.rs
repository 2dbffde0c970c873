//! The bodies of the fuzz targets: each takes arbitrary bytes, runs one parser of untrusted input
//! the way icmp-guard runs it, and panics on anything that is a bug. libFuzzer turns such a
//! panic, a stack overflow, a timeout or an out-of-memory into a crash with the input saved.
//!
//! Shared by the libFuzzer binaries (`fuzz/fuzz_targets/`) and by
//! `icmp-guard/tests/fuzz_corpus.rs`, which replays the committed corpus in `cargo test`, so
//! every input that once crashed stays a regression test on the stable toolchain.
//!
//! What every target asserts besides "no panic, no hang":
//! - an error names the input and a line (1-based) in it, so an operator can find it;
//! - what is accepted is usable: a policy set compiles, a report renders to valid JSON.
//!
//! Parsers run on a thread with a 2 MiB stack, the size of the agent's tokio worker threads
//! where hot reload parses policies, so unbounded recursion shows up here as it would there.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use icmp_guard::{
    audit::{self, Input, InputFormat, RuleOptions},
    compile::{self, Postures, identity::Resolver},
    sources::{config, policy::kubearmor, workload::Workload},
};

/// Stack of the agent's tokio worker threads (tokio's default).
pub const PARSER_STACK: usize = 2 << 20;

/// A target's body: takes the input, panics on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name of its libFuzzer binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("kubearmor_policy", kubearmor_policy),
    ("agent_config", agent_config),
    ("audit_detect", audit_detect),
    ("audit_aws", audit_aws),
    ("audit_cloudformation", audit_cloudformation),
    ("audit_terraform", audit_terraform),
    ("audit_terraform_plan", audit_terraform_plan),
];

/// Runs `f` on a thread with the agent's stack size and passes its panic on.
fn on_agent_stack(f: impl FnOnce() + Send) {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .stack_size(PARSER_STACK)
            .spawn_scoped(s, f)
            .expect("spawning the parser thread");
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// Files are read as UTF-8 by every reader (anything else is refused before parsing), so the
/// parsers only ever see text; invalid bytes become U+FFFD to still exercise them.
fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

const POLICY_FILE: &str = "fuzz/policy.yaml";

/// `KubeArmorPolicy`/`KubeArmorHostPolicy` YAML, as `run --policy` and hot reload read it, then
/// compiled for a workload and a node as the agent does.
pub fn kubearmor_policy(data: &[u8]) {
    let text = text(data);
    on_agent_stack(|| {
        let file = Path::new(POLICY_FILE);
        match kubearmor::parse_str(&text, file) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    assert_eq!(w.origin.file, file, "warning about another file: {w}");
                    assert!(w.origin.line >= 1, "warning without a line: {w}");
                }
                for p in &loaded.set.policies {
                    assert!(p.origin.line >= 1, "policy {} without a line", p.name);
                    for r in &p.rules {
                        assert!(r.origin.line >= 1, "rule of {} without a line", p.name);
                        assert!(!r.classes.is_empty(), "rule of {} covers nothing", p.name);
                    }
                }
                compile_for_fuzzing(&loaded.set);
            }
            Err(errors) => {
                assert!(!errors.is_empty(), "Err without an error");
                for e in &errors {
                    assert_eq!(e.origin.file, file, "error about another file: {e}");
                    // Line 0 is the file as a whole, which only "holds no policy" is about.
                    assert!(
                        e.origin.line >= 1 || e.reason == kubearmor::NO_POLICY,
                        "error without a line: {e}"
                    );
                    assert!(
                        !e.reason.is_empty(),
                        "error without a reason at {}",
                        e.origin
                    );
                }
            }
        }
    });
}

fn compile_for_fuzzing(set: &icmp_guard::sources::policy::PolicySet) {
    static RESOLVER: OnceLock<Resolver> = OnceLock::new();
    let resolver = RESOLVER.get_or_init(|| Resolver::host().expect("reading this mount table"));
    let workloads = [Workload {
        id: 1,
        name: "nginx".into(),
        namespace: "default".into(),
        labels: BTreeMap::from([("app".into(), "nginx".into())]),
        pod: None,
        container: None,
        cgroup: PathBuf::from("/sys/fs/cgroup/fuzz"),
        cgroup_id: 4242,
        owner: None,
        root: icmp_guard::sources::workload::Root::Host,
    }];
    let node_labels = BTreeMap::from([("kubernetes.io/os".into(), "linux".into())]);
    let compiled = compile::compile(
        &compile::Input {
            policies: set,
            workloads: &workloads,
            node_labels: &node_labels,
            postures: &Postures::default(),
            audit_only: false,
            alerts_per_sec: 10,
        },
        resolver,
    );
    // A parsed set may still be refused by the compiler, with a message; it must not panic.
    if let Err(e) = compiled {
        assert!(!format!("{e:#}").is_empty());
    }
}

/// The agent configuration file (`run --config`).
pub fn agent_config(data: &[u8]) {
    let text = text(data);
    on_agent_stack(|| {
        let file = Path::new("fuzz/config.yaml");
        match config::parse_str(&text, file) {
            Ok(c) => {
                for w in &c.workloads {
                    assert!(
                        !w.cgroup
                            .components()
                            .any(|c| c == std::path::Component::ParentDir),
                        "workload {} escapes the cgroup mount: {}",
                        w.name,
                        w.cgroup.display()
                    );
                    assert!(w.origin.line >= 1, "workload {} without a line", w.name);
                }
            }
            Err(errors) => {
                assert!(!errors.is_empty(), "Err without an error");
                for e in &errors {
                    assert_eq!(e.origin.file, file, "error about another file: {e}");
                    assert!(e.origin.line >= 1, "error without a line: {e}");
                }
            }
        }
    });
}

const AUDIT_INPUT: &str = "fuzz-input";

/// `icmp-guard audit` on one input read as `format`, rendered in every output format.
fn audit_as(data: &[u8], format: InputFormat) {
    let text = text(data);
    on_agent_stack(|| {
        let inputs = [Input::from_text(AUDIT_INPUT, &text)];
        let report = audit::audit(&inputs, format, &RuleOptions::default());
        for e in &report.errors {
            assert_eq!(e.file, AUDIT_INPUT, "error about another input: {e}");
            assert!(e.line >= 1, "error without a line: {e}");
            assert!(!e.message.is_empty(), "error without a message: {e:?}");
        }
        for f in &report.findings {
            assert_eq!(f.location.file, AUDIT_INPUT, "finding elsewhere: {f:?}");
            assert!(f.location.line >= 1, "finding without a line: {f:?}");
        }
        let _ = audit::report::text(&report);
        for rendered in [
            audit::report::json(&report, false),
            audit::report::sarif(&report, true),
        ] {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&rendered) {
                panic!("the report is not JSON ({e}):\n{rendered}");
            }
        }
    });
}

/// Format detection (`--input-format auto`), then whichever reader it picks.
pub fn audit_detect(data: &[u8]) {
    audit_as(data, InputFormat::Auto);
}

/// `aws ec2 describe-security-groups` / `describe-security-group-rules` JSON.
pub fn audit_aws(data: &[u8]) {
    audit_as(data, InputFormat::Aws);
}

/// CloudFormation templates, JSON or YAML.
pub fn audit_cloudformation(data: &[u8]) {
    audit_as(data, InputFormat::Cloudformation);
}

/// Terraform configuration (HCL).
pub fn audit_terraform(data: &[u8]) {
    audit_as(data, InputFormat::Terraform);
}

/// `terraform show -json` plans.
pub fn audit_terraform_plan(data: &[u8]) {
    audit_as(data, InputFormat::TerraformPlan);
}
