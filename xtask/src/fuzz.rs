//! `cargo xtask fuzz`: every libFuzzer target of `fuzz/` for a bounded time, failing on the first
//! crash, panic, timeout or out-of-memory, with the input that reproduces it.
//!
//! The targets are built by cargo-fuzz on the stable toolchain with `--sanitizer none` (a fresh
//! machine has only stable; the parsers are safe Rust, so libFuzzer's coverage guidance and its
//! crash, timeout and memory checks are what matter). Each target starts from the committed
//! corpus (`fuzz/corpus/<target>`) and the repository's own fixtures, and writes what it finds
//! to `target/fuzz/corpus/<target>`, so repeated runs build on each other without touching the
//! work tree. `--merge` adds the inputs that reach new code to the committed corpus.
//!
//! The instrumented build goes to `<cache>/fuzz-target` (`$ICMP_GUARD_CACHE`, default
//! `/var/cache/icmp-guard`), outside the clone: every dependency of icmp-guard compiled with
//! coverage instrumentation takes about ten minutes on two cores, and a fresh clone then
//! rebuilds only icmp-guard and the targets.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Every target, with the repository's fixtures it starts from besides its own corpus.
const TARGETS: &[(&str, &[&str])] = &[
    (
        "kubearmor_policy",
        &["policies", "icmp-guard/tests/data/policies", "deploy"],
    ),
    (
        "agent_config",
        &[
            "policies/agent-config.example.yaml",
            "policies/seed-workload.yaml",
            "icmp-guard/tests/data/config",
        ],
    ),
    ("audit_detect", &["examples/audit"]),
    (
        "audit_aws",
        &["examples/audit/aws", "examples/audit/malformed"],
    ),
    ("audit_cloudformation", &["examples/audit/cloudformation"]),
    ("audit_terraform", &["examples/audit/terraform"]),
    ("audit_terraform_plan", &["examples/audit/terraform-plan"]),
];

/// One input taking longer than this is a hang (libFuzzer's `-timeout`). The inputs are at most
/// `MAX_LEN` bytes, which every parser reads in milliseconds; the margin is for a busy machine.
const TIMEOUT_SECS: u64 = 10;
/// Largest input tried: big enough for deep nesting and repetition blow-ups.
const MAX_LEN: usize = 64 * 1024;
/// Memory per target process; a parser of a 64 KiB input never needs this much.
const RSS_LIMIT_MB: u64 = 2048;

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 25)]
    seconds: u64,
    /// Only these targets (default: all).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// Afterwards, add the inputs that reach new code to the committed corpus (fuzz/corpus).
    #[arg(long)]
    merge: bool,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let root = crate::vm::workspace_root();
    let selected: Vec<&(&str, &[&str])> = if args.targets.is_empty() {
        TARGETS.iter().collect()
    } else {
        let mut v = Vec::new();
        for name in &args.targets {
            match TARGETS.iter().find(|(t, _)| t == name) {
                Some(t) => v.push(t),
                None => bail!(
                    "no fuzz target `{name}`; the targets are {}",
                    TARGETS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        v
    };
    check_cargo_fuzz()?;
    let target_dir = crate::cache::cache_dir().join("fuzz-target");
    build(&root, &target_dir)?;
    let bin_dir = target_dir.join("x86_64-unknown-linux-gnu/release");
    let mut summary = Vec::new();
    for (name, fixtures) in selected {
        let outcome = fuzz_one(&root, &bin_dir, name, fixtures, args.seconds)?;
        println!("fuzz: {name}: {outcome}");
        summary.push(format!("{name:<22} {outcome}"));
        if args.merge {
            merge(&root, &bin_dir, name)?;
        }
    }
    println!("\ntarget                 result");
    for line in &summary {
        println!("{line}");
    }
    Ok(())
}

fn check_cargo_fuzz() -> Result<()> {
    let ok = Command::new(crate::vm::cargo_bin())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "cargo-fuzz is not installed; run `bash scripts/setup.sh` (it runs \
             `cargo install cargo-fuzz --locked`)"
        );
    }
    Ok(())
}

fn build(root: &Path, target_dir: &Path) -> Result<()> {
    println!(
        "fuzz: building the targets (cargo fuzz build, stable, no sanitizer, debug assertions) \
         in {}",
        target_dir.display()
    );
    let status = Command::new(crate::vm::cargo_bin())
        .args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(root)
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed (see above)");
    }
    Ok(())
}

/// Runs one target; `Ok` with a line of statistics, `Err` naming the reproducing input.
fn fuzz_one(
    root: &Path,
    bin_dir: &Path,
    name: &str,
    fixtures: &[&str],
    seconds: u64,
) -> Result<String> {
    let work = root.join("target/fuzz/corpus").join(name);
    let committed = root.join("fuzz/corpus").join(name);
    let artifacts = root.join("target/fuzz/artifacts").join(name);
    for d in [&work, &committed, &artifacts] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // A crash of an earlier run must not be mistaken for one of this run.
    for e in fs::read_dir(&artifacts)? {
        let _ = fs::remove_file(e?.path());
    }
    let log_path = root.join("target/fuzz").join(format!("{name}.log"));
    let log = fs::File::create(&log_path)?;
    // libFuzzer reads directories only: fixtures named as files are copied into one.
    let seeds = root.join("target/fuzz/seeds").join(name);
    let _ = fs::remove_dir_all(&seeds);
    fs::create_dir_all(&seeds)?;
    let mut cmd = Command::new(bin_dir.join(name));
    cmd.arg(&work).arg(&committed).arg(&seeds);
    for f in fixtures {
        let path = root.join(f);
        if path.is_dir() {
            cmd.arg(path);
        } else {
            let copy = seeds.join(f.replace('/', "_"));
            fs::copy(&path, &copy)
                .with_context(|| format!("copying the seed {}", path.display()))?;
        }
    }
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!(
            "-dict={}",
            root.join("fuzz/dict/icmp-guard.dict").display()
        ))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log);
    println!("fuzz: {name} for {seconds} s (log: {})", log_path.display());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin_dir.join(name).display()))?;
    // libFuzzer stops itself; this only guards against it never doing so.
    let deadline = Duration::from_secs(seconds + 120 + TIMEOUT_SECS);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "fuzz target {name} did not stop within {deadline:?}; its log is {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log_text = fs::read_to_string(&log_path).unwrap_or_default();
    let found: Vec<PathBuf> = fs::read_dir(&artifacts)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if !status.success() || !found.is_empty() {
        let tail: Vec<&str> = log_text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!("{}", tail.join("\n"));
        let inputs = found
            .iter()
            .map(|p| {
                format!(
                    "  {}\n  reproduce: {} {}\n         or: cargo fuzz run --sanitizer none {name} {}",
                    p.display(),
                    bin_dir.join(name).display(),
                    p.display(),
                    p.display()
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "fuzz target {name} failed ({status}); the reproducing input:\n{}\nfull log: {}",
            if inputs.is_empty() {
                "  (none written; see the log)".to_string()
            } else {
                inputs
            },
            log_path.display()
        );
    }
    let stat = |key: &str| {
        log_text
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| "?".into())
    };
    Ok(format!(
        "ok: {} runs, {} coverage edges, corpus {} inputs, {:.0} s",
        stat("stat::number_of_executed_units:"),
        log_text
            .lines()
            .rev()
            .find_map(|l| l.split(" cov: ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?"),
        fs::read_dir(&work).map(|d| d.count()).unwrap_or(0),
        started.elapsed().as_secs_f64()
    ))
}

/// The inputs of this run that reach code edges the committed corpus does not. Edges only
/// (`-use_counters=0`) and a set cover keep the committed corpus small: a few hundred inputs.
fn merge(root: &Path, bin_dir: &Path, name: &str) -> Result<()> {
    let committed = root.join("fuzz/corpus").join(name);
    let work = root.join("target/fuzz/corpus").join(name);
    let status = Command::new(bin_dir.join(name))
        .arg("-set_cover_merge=1")
        .arg("-use_counters=0")
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-timeout={TIMEOUT_SECS}"))
        .arg(&committed)
        .arg(&work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("merging the {name} corpus failed");
    }
    println!(
        "fuzz: {name}: committed corpus now {} inputs",
        fs::read_dir(&committed)?.count()
    );
    Ok(())
}
