//! `cargo xtask vm-test`: runs icmp-guard's end-to-end integration tests (`enforcement`,
//! `kubearmor_scenario` and `restarts`) inside a VM booted with the BPF LSM on, once per requested kernel.
//!
//! Contract with `icmp-guard/tests/*.rs` (paths inside the VM):
//! - the test executables are `/opt/icmp-guard/<suite>-tests`, run one after the other as root
//!   with `--test-threads=1` from /root;
//! - `ICMP_GUARD_ENFORCER=lsm`, `ICMP_GUARD_BIN=/usr/local/bin/icmp-guard` (the
//!   agent), `ICMP_GUARD_POLICIES=/opt/icmp-guard/policies` (the repo's policies/),
//!   `ICMP_GUARD_TEST_DATA=/opt/icmp-guard/tests-data` (icmp-guard/tests/data, or
//!   an empty directory);
//! - /usr/bin/ping, /usr/sbin/hping3, /usr/bin/nmap (if installed on the host),
//!   /usr/bin/python3 with its stdlib, /bin/true and busybox applets are there;
//! - proc, sysfs, securityfs, bpffs, tracefs, cgroup2 (/sys/fs/cgroup), tmpfs on
//!   /tmp and /run are mounted; lo is up; no other network.
//!
//! A kernel passes only if the VM reports exit code 0 AND the console shows one libtest
//! `test result: ok.` line per suite, with tests passed and none failed, ignored or filtered
//! out.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

use super::initramfs::{self, Include};
use super::qemu::{self, DEFAULT_TIMEOUT_SECS, VmSpec};
use super::{GuestExit, Kernel, KernelChoice, cargo_bin, workspace_root};

/// (test target, path inside the VM) of every suite that runs there.
const SUITES: [(&str, &str); 3] = [
    ("enforcement", "/opt/icmp-guard/enforcement-tests"),
    (
        "kubearmor_scenario",
        "/opt/icmp-guard/kubearmor_scenario-tests",
    ),
    ("restarts", "/opt/icmp-guard/restarts-tests"),
];
const GUEST_AGENT: &str = "/usr/local/bin/icmp-guard";
const GUEST_POLICIES: &str = "/opt/icmp-guard/policies";
const GUEST_TEST_DATA: &str = "/opt/icmp-guard/tests-data";

#[derive(Debug, Args)]
pub struct VmTestArgs {
    /// Kernel(s) to test on; `all` runs 5.10, 6.1 and 6.12 one after the other
    #[arg(long, value_enum, default_value = "6.1")]
    pub kernel: KernelChoice,
    /// Seconds before a VM is killed and its run counts as failed
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Use this test executable (run in place of every suite) instead of building the suites
    /// (for iterating on the VM side without a rebuild)
    #[arg(long, value_name = "PATH")]
    pub test_exe: Option<PathBuf>,
    /// Use this agent binary instead of building `-p icmp-guard --release`
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Run only these suites (repeatable: enforcement, kubearmor_scenario, restarts; default:
    /// all three)
    #[arg(long = "suite", value_name = "SUITE")]
    pub suites: Vec<String>,
    /// Extra arguments for the test executable (e.g. a test name filter)
    #[arg(last = true, value_name = "TEST_ARGS")]
    pub test_args: Vec<String>,
}

pub fn run(args: VmTestArgs) -> Result<()> {
    let agent = match &args.agent {
        Some(p) => p.clone(),
        None => build_agent()?,
    };
    for name in &args.suites {
        if !SUITES.iter().any(|(s, _)| s == name) {
            bail!(
                "no VM suite `{name}`; the suites are {}",
                SUITES.map(|s| s.0).join(", ")
            );
        }
    }
    let tests: Vec<(PathBuf, &str)> = match &args.test_exe {
        Some(p) => vec![(p.clone(), SUITES[0].1)],
        None => build_tests(&args.suites)?,
    };
    for p in std::iter::once(&agent).chain(tests.iter().map(|(p, _)| p)) {
        if !p.is_file() {
            bail!("{} does not exist", p.display());
        }
    }
    let spec_base = test_spec(&agent, &tests, &args)?;

    let kernels = args.kernel.kernels();
    let mut rows = Vec::new();
    for kernel in &kernels {
        let spec = VmSpec {
            kernel: *kernel,
            ..spec_base.clone_spec()
        };
        let row = run_one(&spec, !args.test_args.is_empty(), tests.len() as u32);
        if let Err(e) = &row.verdict {
            eprintln!("vm-test: kernel {kernel}: FAILED: {e:#}");
        }
        rows.push(row);
    }

    if kernels.len() > 1 {
        print_table(&rows);
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.verdict.is_err()).collect();
    if failed.is_empty() {
        let r = &rows[rows.len() - 1];
        if kernels.len() == 1 {
            println!(
                "vm-test: kernel {} ({}): ok, {} passed in {:.0} s",
                r.kernel,
                r.release.as_deref().unwrap_or("?"),
                r.passed,
                r.seconds
            );
        }
        return Ok(());
    }
    // One kernel: pass the test executable's own exit code through when there is
    // one; several: 1.
    let code = match (&failed[..], kernels.len()) {
        ([only], 1) => only.exit_code.filter(|c| *c != 0).unwrap_or(1),
        _ => 1,
    };
    let names: Vec<&str> = failed.iter().map(|r| r.kernel.label()).collect();
    Err(GuestExit {
        code,
        message: format!("vm-test failed on kernel(s) {}", names.join(", ")),
    }
    .into())
}

/// `VmSpec` without the kernel; cloned for each kernel.
struct SpecBase {
    includes: Vec<Include>,
    empty_dirs: Vec<PathBuf>,
    env: Vec<(String, String)>,
    command: Vec<String>,
    timeout: Duration,
}

impl SpecBase {
    fn clone_spec(&self) -> VmSpec {
        VmSpec {
            kernel: Kernel::V6_1,
            includes: self.includes.clone(),
            empty_dirs: self.empty_dirs.clone(),
            env: self.env.clone(),
            command: self.command.clone(),
            timeout: self.timeout,
        }
    }
}

fn test_spec(agent: &Path, tests: &[(PathBuf, &str)], args: &VmTestArgs) -> Result<SpecBase> {
    let root = workspace_root();
    let mut includes = vec![Include::at(agent, GUEST_AGENT), Include::same("/bin/true")];
    for (host, guest) in tests {
        includes.push(Include::at(host, guest));
    }
    for (path, package) in [
        ("/usr/bin/ping", "iputils-ping"),
        ("/usr/sbin/hping3", "hping3"),
        // The seed scenario runs hping3 from bash, as the seed did.
        ("/usr/bin/bash", "bash"),
    ] {
        if !Path::new(path).exists() {
            bail!("{path} not found: apt-get install -y {package}");
        }
        includes.push(Include::same(path));
    }
    if Path::new("/usr/bin/nmap").exists() {
        includes.push(Include::same("/usr/bin/nmap"));
        if Path::new("/usr/share/nmap").is_dir() {
            includes.push(Include {
                host: "/usr/share/nmap".into(),
                guest: None,
                exclude: Some(nmap_exclude),
            });
        }
    } else {
        eprintln!("vm-test: /usr/bin/nmap not installed; the VM will not have it");
    }
    includes.extend(initramfs::python_includes()?);

    let policies = root.join("policies");
    if !policies.is_dir() {
        bail!("{} is missing", policies.display());
    }
    includes.push(Include::at(&policies, GUEST_POLICIES));
    let mut empty_dirs = Vec::new();
    let data = root.join("icmp-guard").join("tests").join("data");
    if data.is_dir() {
        includes.push(Include::at(&data, GUEST_TEST_DATA));
    } else {
        // The variable is always set; keep the path valid.
        empty_dirs.push(PathBuf::from(GUEST_TEST_DATA));
    }

    let env = [
        ("ICMP_GUARD_ENFORCER", "lsm"),
        ("ICMP_GUARD_BIN", GUEST_AGENT),
        ("ICMP_GUARD_POLICIES", GUEST_POLICIES),
        ("ICMP_GUARD_TEST_DATA", GUEST_TEST_DATA),
        ("RUST_BACKTRACE", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // Every suite runs even when an earlier one fails; the exit code is 0 only if all passed.
    let extra: String = args
        .test_args
        .iter()
        .map(|a| format!(" '{}'", a.replace('\'', "'\\''")))
        .collect();
    let mut script = String::from("status=0");
    for (_, guest) in tests {
        script.push_str(&format!("; {guest} --test-threads=1{extra} || status=1"));
    }
    script.push_str("; exit $status");
    let command = vec!["/bin/sh".to_string(), "-c".to_string(), script];
    Ok(SpecBase {
        includes,
        empty_dirs,
        env,
        command,
        timeout: Duration::from_secs(args.timeout),
    })
}

/// The NSE scripts are most of /usr/share/nmap and only matter for --script.
fn nmap_exclude(p: &Path) -> bool {
    p.parent() == Some(Path::new("/usr/share/nmap"))
        && matches!(
            p.file_name().and_then(|n| n.to_str()),
            Some("scripts" | "nselib")
        )
}

struct Row {
    kernel: Kernel,
    release: Option<String>,
    passed: u64,
    seconds: f64,
    exit_code: Option<i32>,
    verdict: Result<()>,
}

fn run_one(spec: &VmSpec, user_filter: bool, suites: u32) -> Row {
    let mut row = Row {
        kernel: spec.kernel,
        release: None,
        passed: 0,
        seconds: 0.0,
        exit_code: None,
        verdict: Ok(()),
    };
    let outcome = match qemu::run(spec) {
        Ok(o) => o,
        Err(e) => {
            row.verdict = Err(e);
            return row;
        }
    };
    row.release = outcome.kernel_release.clone();
    row.seconds = outcome.elapsed.as_secs_f64();
    row.exit_code = Some(outcome.exit_code);
    let summary = parse_libtest(&outcome.console);
    row.passed = summary.passed;
    row.verdict = judge(
        &summary,
        outcome.exit_code,
        outcome.lsm.as_deref(),
        user_filter,
        suites,
    )
    .map_err(|e| anyhow!("{e:#} (console log: {})", outcome.log.display()));
    row
}

fn judge(
    s: &Summary,
    exit_code: i32,
    lsm: Option<&str>,
    user_filter: bool,
    suites: u32,
) -> Result<()> {
    // ICMP_GUARD_ENFORCER=lsm is meaningless if the kernel did not enable the BPF LSM.
    if !lsm.is_some_and(|l| l.split(',').any(|m| m == "bpf")) {
        bail!(
            "the BPF LSM is not active in the VM (/sys/kernel/security/lsm: {:?})",
            lsm.unwrap_or("<unreadable>")
        );
    }
    if exit_code != 0 {
        bail!("the test executable exited with code {exit_code}");
    }
    if s.results == 0 {
        bail!("no libtest summary line (`test result: ...`) on the console");
    }
    if s.results < suites {
        bail!(
            "{} libtest summary line(s) for {suites} suites: a suite did not run to the end",
            s.results
        );
    }
    if !s.all_ok || s.failed > 0 {
        bail!("libtest reported failures ({} failed)", s.failed);
    }
    if s.passed == 0 {
        bail!("libtest ran no test (0 passed)");
    }
    if s.ignored > 0 {
        bail!(
            "{} test(s) were ignored; every enforcement test must run in the VM",
            s.ignored
        );
    }
    if s.filtered_out > 0 && !user_filter {
        bail!("{} test(s) were filtered out", s.filtered_out);
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq)]
struct Summary {
    /// Number of `test result:` lines seen.
    results: u32,
    all_ok: bool,
    passed: u64,
    failed: u64,
    ignored: u64,
    filtered_out: u64,
}

/// Sums libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured;
/// 0 filtered out; finished in 1.2s` lines.
fn parse_libtest(console: &str) -> Summary {
    let mut s = Summary {
        all_ok: true,
        ..Summary::default()
    };
    for line in console.lines() {
        let Some(rest) = line.find("test result: ").map(|i| &line[i + 13..]) else {
            continue;
        };
        let Some((status, counts)) = rest.split_once(". ") else {
            continue;
        };
        s.results += 1;
        s.all_ok &= status == "ok";
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => s.passed += n,
                "failed" => s.failed += n,
                "ignored" => s.ignored += n,
                "filtered" => s.filtered_out += n,
                _ => {}
            }
        }
    }
    if s.results == 0 {
        s.all_ok = false;
    }
    s
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<7} {:<28} {:<7} {:>7} {:>8}",
        "kernel", "release", "result", "passed", "seconds"
    );
    for r in rows {
        println!(
            "{:<7} {:<28} {:<7} {:>7} {:>8.0}",
            r.kernel.label(),
            r.release.as_deref().unwrap_or("-"),
            if r.verdict.is_ok() { "ok" } else { "FAILED" },
            r.passed,
            r.seconds
        );
    }
}

pub fn build_agent() -> Result<PathBuf> {
    let artifacts = cargo_json(&["build", "--release", "-p", "icmp-guard"])?;
    find_artifact(&artifacts, |a| {
        a["target"]["name"] == "icmp-guard"
            && a["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
    })
    .context("`cargo build --release -p icmp-guard` produced no icmp-guard binary")
}

/// The suites named in `only` (all when empty), built.
fn build_tests(only: &[String]) -> Result<Vec<(PathBuf, &'static str)>> {
    let selected: Vec<&(&str, &str)> = SUITES
        .iter()
        .filter(|(t, _)| only.is_empty() || only.iter().any(|o| o == t))
        .collect();
    let mut args = vec!["test", "--release", "-p", "icmp-guard", "--no-run"];
    for (target, _) in &selected {
        args.extend(["--test", target]);
    }
    let artifacts = cargo_json(&args)?;
    selected
        .into_iter()
        .map(|(target, guest)| {
            let exe = find_artifact(&artifacts, |a| {
                a["target"]["name"] == *target && a["profile"]["test"] == true
            })
            .with_context(|| {
                format!("`cargo test --test {target} --no-run` produced no test executable")
            })?;
            Ok((exe, *guest))
        })
        .collect()
}

/// Runs cargo with `--message-format=json-render-diagnostics` (diagnostics still
/// rendered on stderr for the human) and returns the compiler-artifact messages.
fn cargo_json(args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("vm-test: cargo {}", args.join(" "));
    let out = cmd.output().context("running cargo")?;
    if !out.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact")
        .collect())
}

fn find_artifact(
    artifacts: &[serde_json::Value],
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<PathBuf> {
    artifacts
        .iter()
        .filter(|a| pred(a))
        .filter_map(|a| a["executable"].as_str())
        .map(PathBuf::from)
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "running 2 tests\ntest a ... ok\ntest b ... ok\n\n\
        test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.1s\n";

    #[test]
    fn libtest_summary() {
        let s = parse_libtest(OK);
        assert_eq!(
            s,
            Summary {
                results: 1,
                all_ok: true,
                passed: 2,
                ..Summary::default()
            }
        );
        assert!(judge(&s, 0, Some("lockdown,capability,bpf"), false, 1).is_ok());
    }

    #[test]
    fn failing_verdicts() {
        let bpf = Some("lockdown,capability,bpf");
        let ok = parse_libtest(OK);
        // The LSM must be on, the exit code 0, and the summary present.
        assert!(judge(&ok, 0, Some("lockdown,capability"), false, 1).is_err());
        assert!(judge(&ok, 0, None, false, 1).is_err());
        assert!(judge(&ok, 101, bpf, false, 1).is_err());
        assert!(judge(&parse_libtest("running 0 tests\n"), 0, bpf, false, 1).is_err());
        let none = parse_libtest(
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.0s\n",
        );
        assert!(judge(&none, 0, bpf, false, 1).is_err());
        let ignored = parse_libtest(
            "test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.0s\n",
        );
        assert!(judge(&ignored, 0, bpf, false, 1).is_err());
        let failed = parse_libtest(
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.0s\n",
        );
        assert!(!failed.all_ok);
        assert!(judge(&failed, 0, bpf, false, 1).is_err());
        let filtered = parse_libtest(
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out; finished in 0.0s\n",
        );
        assert!(judge(&filtered, 0, bpf, false, 1).is_err());
        assert!(judge(&filtered, 0, bpf, true, 1).is_ok());
        // One summary for two suites: the second never finished.
        assert!(judge(&ok, 0, bpf, false, 2).is_err());
    }
}
