//! `cargo xtask bench-audit`: `icmp-guard audit` against checkov on the same generated security
//! groups, as CloudFormation and as Terraform.
//!
//! The groups are generated with a known mix of ICMP cases (the nuances of EC2-044), so what each
//! tool finds and misses is compared with the ground truth, not only how fast it is. Every group
//! also has an HTTPS-from-anywhere rule, as real web groups do; it is never an EC2-044 finding.
//!
//! checkov is installed from PyPI into `target/bench-audit/venv` on first use. Only its
//! open-to-the-world security-group checks are run (CKV_AWS_24/25/260/277: ports 22, 3389, 80
//! and -1), which are the only ones that can react to ICMP; a group counts as "flagged" by
//! checkov when any of them fails on it, which is generous to checkov.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct BenchAuditArgs {
    /// Number of security groups to generate (per form).
    #[arg(long, default_value_t = 10_000)]
    groups: usize,
    /// Groups per file (CloudFormation allows 500 resources per template).
    #[arg(long, default_value_t = 500)]
    per_file: usize,
    /// icmp-guard binary to run; default: build `--release -p icmp-guard` and use it.
    #[arg(long)]
    icmp_guard: Option<PathBuf>,
    /// Skip checkov (icmp-guard only).
    #[arg(long)]
    skip_checkov: bool,
    /// Stop a checkov run after this many seconds and report it as timed out.
    #[arg(long, default_value_t = 900)]
    checkov_timeout: u64,
}

/// One ICMP situation of the generated mix.
struct Case {
    /// snake_case, used in Terraform names.
    slug: &'static str,
    what: &'static str,
    /// Ground truth: an EC2-044 finding or not.
    finding: bool,
}

const CASES: &[Case] = &[
    Case {
        slug: "icmp_all_v4",
        what: "icmp all types from 0.0.0.0/0",
        finding: true,
    },
    Case {
        slug: "icmp_echo_v4",
        what: "icmp type 8 (FromPort 8, ToPort -1) from 0.0.0.0/0",
        finding: true,
    },
    Case {
        slug: "pmtud_v4",
        what: "icmp 3/4 (PMTUD) from 0.0.0.0/0",
        finding: false,
    },
    Case {
        slug: "icmpv6_all",
        what: "icmpv6 -1/-1 from ::/0",
        finding: true,
    },
    Case {
        slug: "icmpv6_no_ports",
        what: "icmpv6 without ports from ::/0",
        finding: true,
    },
    Case {
        slug: "pmtud_v6",
        what: "icmpv6 type 2 (PMTUD) from ::/0",
        finding: false,
    },
    Case {
        slug: "all_traffic_v4",
        what: "protocol -1 from 0.0.0.0/0",
        finding: true,
    },
    Case {
        slug: "all_traffic_v6",
        what: "protocol -1 from ::/0",
        finding: true,
    },
    Case {
        slug: "odd_anywhere_v4",
        what: "icmp from 10.1.2.3/0",
        finding: true,
    },
    Case {
        slug: "odd_anywhere_v6",
        what: "icmpv6 from 0:0:0:0:0:0:0:0/0",
        finding: true,
    },
    Case {
        slug: "sg_source",
        what: "icmp from a security group",
        finding: false,
    },
    Case {
        slug: "prefix_list_source",
        what: "icmp from a prefix list",
        finding: false,
    },
    Case {
        slug: "trusted_range",
        what: "icmp from 10.0.0.0/8",
        finding: false,
    },
    Case {
        slug: "numeric_protocol",
        what: "protocol 1 (number), type 0, from 0.0.0.0/0",
        finding: true,
    },
    Case {
        slug: "egress_only",
        what: "egress icmp to 0.0.0.0/0",
        finding: false,
    },
    Case {
        slug: "echo_after_group_rule",
        what: "icmp from self/SG, then type 8 from 0.0.0.0/0",
        finding: true,
    },
    Case {
        slug: "standalone_sg_source",
        what: "standalone ingress rule, icmp from a security group",
        finding: false,
    },
];

fn camel(slug: &str) -> String {
    slug.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The group number in a CloudFormation logical id (`Sg00042IcmpEchoV4`) or a Terraform address
/// (`aws_security_group.sg_00042_icmp_echo_v4`).
fn group_index(resource: &str) -> Option<usize> {
    let name = resource.rsplit('.').next()?;
    let digits: String = name
        .trim_start_matches("Sg")
        .trim_start_matches("sg_")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// One CloudFormation ingress/egress rule as YAML lines (indented under the list).
fn cfn_rule(protocol: &str, ports: Option<(i32, i32)>, source: &str, description: &str) -> String {
    let mut s = format!("        - IpProtocol: {protocol}\n");
    if let Some((from, to)) = ports {
        let _ = writeln!(s, "          FromPort: {from}\n          ToPort: {to}");
    }
    let _ = writeln!(
        s,
        "          {source}\n          Description: {description}"
    );
    s
}

fn cfn_group(i: usize, case: &Case) -> String {
    let id = format!("Sg{i:05}{}", camel(case.slug));
    if case.slug == "standalone_sg_source" {
        return format!(
            "  {id}:\n    Type: AWS::EC2::SecurityGroupIngress\n    Properties:\n      GroupId: \
             sg-0123456789abcdef0\n      IpProtocol: icmp\n      FromPort: -1\n      ToPort: -1\n      \
             SourceSecurityGroupId: sg-0fedcba9876543210\n      Description: monitoring\n"
        );
    }
    let mut ingress = cfn_rule("tcp", Some((443, 443)), "CidrIp: 0.0.0.0/0", "https");
    let mut egress = String::new();
    let rule = match case.slug {
        "icmp_all_v4" => cfn_rule("icmp", Some((-1, -1)), "CidrIp: 0.0.0.0/0", "icmp"),
        "icmp_echo_v4" => cfn_rule("icmp", Some((8, -1)), "CidrIp: 0.0.0.0/0", "ping"),
        "pmtud_v4" => cfn_rule("icmp", Some((3, 4)), "CidrIp: 0.0.0.0/0", "pmtud"),
        "icmpv6_all" => cfn_rule("icmpv6", Some((-1, -1)), "CidrIpv6: ::/0", "icmpv6"),
        "icmpv6_no_ports" => cfn_rule("icmpv6", None, "CidrIpv6: ::/0", "icmpv6"),
        "pmtud_v6" => cfn_rule("icmpv6", Some((2, -1)), "CidrIpv6: ::/0", "pmtud"),
        "all_traffic_v4" => cfn_rule("\"-1\"", None, "CidrIp: 0.0.0.0/0", "all"),
        "all_traffic_v6" => cfn_rule("\"-1\"", None, "CidrIpv6: ::/0", "all"),
        "odd_anywhere_v4" => cfn_rule("icmp", Some((-1, -1)), "CidrIp: 10.1.2.3/0", "icmp"),
        "odd_anywhere_v6" => cfn_rule(
            "icmpv6",
            Some((-1, -1)),
            "CidrIpv6: 0:0:0:0:0:0:0:0/0",
            "icmpv6",
        ),
        "sg_source" => cfn_rule(
            "icmp",
            Some((-1, -1)),
            "SourceSecurityGroupId: sg-0123456789abcdef0",
            "monitoring",
        ),
        "prefix_list_source" => cfn_rule(
            "icmp",
            Some((-1, -1)),
            "SourcePrefixListId: pl-0123456789abcdef0",
            "corporate",
        ),
        "trusted_range" => cfn_rule("icmp", Some((-1, -1)), "CidrIp: 10.0.0.0/8", "internal"),
        "numeric_protocol" => cfn_rule("1", Some((0, -1)), "CidrIp: 0.0.0.0/0", "echo reply"),
        "egress_only" => {
            egress = cfn_rule("icmp", Some((-1, -1)), "CidrIp: 0.0.0.0/0", "out");
            String::new()
        }
        "echo_after_group_rule" => {
            cfn_rule(
                "icmp",
                Some((-1, -1)),
                "SourceSecurityGroupId: sg-0123456789abcdef0",
                "monitoring",
            ) + &cfn_rule("icmp", Some((8, -1)), "CidrIp: 0.0.0.0/0", "ping")
        }
        other => unreachable!("case {other}"),
    };
    ingress.push_str(&rule);
    let mut s = format!(
        "  {id}:\n    Type: AWS::EC2::SecurityGroup\n    Properties:\n      GroupDescription: \
         bench group {i} ({})\n      VpcId: vpc-0123456789abcdef0\n      SecurityGroupIngress:\n{ingress}",
        case.slug
    );
    if !egress.is_empty() {
        let _ = write!(s, "      SecurityGroupEgress:\n{egress}");
    }
    s
}

fn tf_block(
    kind: &str,
    protocol: &str,
    ports: (i32, i32),
    source: &str,
    description: &str,
) -> String {
    format!(
        "  {kind} {{\n    description = \"{description}\"\n    protocol    = \"{protocol}\"\n    \
         from_port   = {}\n    to_port     = {}\n    {source}\n  }}\n",
        ports.0, ports.1
    )
}

fn tf_group(i: usize, case: &Case) -> String {
    let name = format!("sg_{i:05}_{}", case.slug);
    if case.slug == "standalone_sg_source" {
        return format!(
            "resource \"aws_vpc_security_group_ingress_rule\" \"{name}\" {{\n  description       \
             = \"monitoring\"\n  security_group_id = \"sg-0123456789abcdef0\"\n  ip_protocol       \
             = \"icmp\"\n  from_port         = -1\n  to_port           = -1\n  \
             referenced_security_group_id = \"sg-0fedcba9876543210\"\n}}\n\n"
        );
    }
    if case.slug == "icmpv6_no_ports" {
        // Inline blocks need ports; the provider's standalone rule is where icmpv6 goes
        // without them.
        return format!(
            "resource \"aws_vpc_security_group_ingress_rule\" \"{name}\" {{\n  description       \
             = \"icmpv6\"\n  security_group_id = \"sg-0123456789abcdef0\"\n  ip_protocol       = \
             \"icmpv6\"\n  cidr_ipv6         = \"::/0\"\n}}\n\n"
        );
    }
    let anywhere = "cidr_blocks = [\"0.0.0.0/0\"]";
    let anywhere6 = "ipv6_cidr_blocks = [\"::/0\"]";
    let mut body = tf_block("ingress", "tcp", (443, 443), anywhere, "https");
    body.push_str(&match case.slug {
        "icmp_all_v4" => tf_block("ingress", "icmp", (-1, -1), anywhere, "icmp"),
        "icmp_echo_v4" => tf_block("ingress", "icmp", (8, -1), anywhere, "ping"),
        "pmtud_v4" => tf_block("ingress", "icmp", (3, 4), anywhere, "pmtud"),
        "icmpv6_all" => tf_block("ingress", "icmpv6", (-1, -1), anywhere6, "icmpv6"),
        "pmtud_v6" => tf_block("ingress", "icmpv6", (2, -1), anywhere6, "pmtud"),
        "all_traffic_v4" => tf_block("ingress", "-1", (0, 0), anywhere, "all"),
        "all_traffic_v6" => tf_block("ingress", "-1", (0, 0), anywhere6, "all"),
        "odd_anywhere_v4" => tf_block(
            "ingress",
            "icmp",
            (-1, -1),
            "cidr_blocks = [\"10.1.2.3/0\"]",
            "icmp",
        ),
        "odd_anywhere_v6" => tf_block(
            "ingress",
            "icmpv6",
            (-1, -1),
            "ipv6_cidr_blocks = [\"0:0:0:0:0:0:0:0/0\"]",
            "icmpv6",
        ),
        "sg_source" => tf_block(
            "ingress",
            "icmp",
            (-1, -1),
            "security_groups = [\"sg-0123456789abcdef0\"]",
            "monitoring",
        ),
        "prefix_list_source" => tf_block(
            "ingress",
            "icmp",
            (-1, -1),
            "prefix_list_ids = [\"pl-0123456789abcdef0\"]",
            "corporate",
        ),
        "trusted_range" => tf_block(
            "ingress",
            "icmp",
            (-1, -1),
            "cidr_blocks = [\"10.0.0.0/8\"]",
            "internal",
        ),
        "numeric_protocol" => tf_block("ingress", "1", (0, -1), anywhere, "echo reply"),
        "egress_only" => tf_block("egress", "icmp", (-1, -1), anywhere, "out"),
        "echo_after_group_rule" => {
            tf_block("ingress", "icmp", (-1, -1), "self = true", "cluster")
                + &tf_block("ingress", "icmp", (8, -1), anywhere, "ping")
        }
        other => unreachable!("case {other}"),
    });
    format!(
        "resource \"aws_security_group\" \"{name}\" {{\n  name        = \"{name}\"\n  \
         description = \"bench group {i}\"\n  vpc_id      = \"vpc-0123456789abcdef0\"\n\n{body}}}\n\n"
    )
}

/// Writes the CloudFormation and Terraform trees; returns their directories.
fn generate(dir: &Path, groups: usize, per_file: usize) -> Result<(PathBuf, PathBuf)> {
    let cfn = dir.join("cloudformation");
    let tf = dir.join("terraform");
    for d in [&cfn, &tf] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
        fs::create_dir_all(d)?;
    }
    let per_file = per_file.max(1);
    for (chunk, start) in (0..groups).step_by(per_file).enumerate() {
        let end = (start + per_file).min(groups);
        let mut yaml = String::from(
            "AWSTemplateFormatVersion: \"2010-09-09\"\nDescription: icmp-guard bench-audit\nResources:\n",
        );
        let mut hcl = String::new();
        for i in start..end {
            let case = &CASES[i % CASES.len()];
            yaml.push_str(&cfn_group(i, case));
            hcl.push_str(&tf_group(i, case));
        }
        fs::write(cfn.join(format!("groups-{chunk:03}.yaml")), yaml)?;
        fs::write(tf.join(format!("groups-{chunk:03}.tf")), hcl)?;
    }
    Ok((cfn, tf))
}

/// A run's wall time and output, or that it was stopped.
struct Timed {
    seconds: f64,
    exit: Option<i32>,
    timed_out: bool,
    stdout: String,
}

fn run_timed(cmd: &mut Command, out_file: &Path, timeout: Duration) -> Result<Timed> {
    let out = fs::File::create(out_file)?;
    let start = Instant::now();
    let mut child = cmd
        .stdout(out)
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            child.kill()?;
            child.wait()?;
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    Ok(Timed {
        seconds: start.elapsed().as_secs_f64(),
        exit: status.and_then(|s| s.code()),
        timed_out: status.is_none(),
        stdout: fs::read_to_string(out_file).unwrap_or_default(),
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds icmp-guard in release mode and checks that it has the `audit` subcommand.
fn icmp_guard_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let bin = crate::bench_agent::release_agent(given)?;
    let help = Command::new(&bin)
        .args(["audit", "--help"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !help.status.success() {
        bail!(
            "{} has no `audit` subcommand (main.rs must dispatch Command::Audit to \
             icmp_guard::audit::run); pass --icmp-guard PATH to use another build",
            bin.display()
        );
    }
    Ok(bin)
}

/// checkov in a venv under target/, installed once.
fn checkov_binary(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let checkov = venv.join("bin/checkov");
    if checkov.exists() {
        return Ok(checkov);
    }
    eprintln!("installing checkov into {} (once)…", venv.display());
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("python3 is needed for checkov (apt-get install python3-venv)")?;
    if !status.success() {
        bail!("python3 -m venv failed (apt-get install python3-venv)");
    }
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "checkov"])
        .status()?;
    if !status.success() || !checkov.exists() {
        bail!("pip install checkov failed");
    }
    Ok(checkov)
}

/// Groups each tool flagged, by group index.
type Flagged = BTreeMap<usize, Vec<String>>;

fn icmp_guard_flagged(json: &str) -> Result<(Flagged, usize)> {
    let report: serde_json::Value =
        serde_json::from_str(json).context("icmp-guard did not print JSON")?;
    let mut flagged = Flagged::new();
    for f in report["findings"].as_array().into_iter().flatten() {
        if f["status"] == "fail" {
            let name = f["resource_name"].as_str().unwrap_or_default();
            if let Some(i) = group_index(name) {
                flagged
                    .entry(i)
                    .or_default()
                    .push(f["opens"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    let errors = report["errors"].as_array().map_or(0, Vec::len);
    Ok((flagged, errors))
}

/// checkov's own summary lines (resources parsed, checks passed/failed, parsing errors), so the
/// report shows that it really read every group.
fn checkov_summary(json: &str) -> String {
    let parsed: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let reports = match parsed {
        serde_json::Value::Array(items) => items,
        other => vec![other],
    };
    reports
        .iter()
        .map(|r| {
            let s = &r["summary"];
            format!(
                "{} resources, {} checks passed, {} failed, {} parsing errors",
                s["resource_count"], s["passed"], s["failed"], s["parsing_errors"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn checkov_flagged(json: &str) -> Result<Flagged> {
    let parsed: serde_json::Value = if json.trim().is_empty() {
        serde_json::Value::Array(vec![])
    } else {
        serde_json::from_str(json).context("checkov did not print JSON")?
    };
    let reports = match parsed {
        serde_json::Value::Array(items) => items,
        other => vec![other],
    };
    let mut flagged = Flagged::new();
    for r in &reports {
        for c in r["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let resource = c["resource"].as_str().unwrap_or_default();
            if let Some(i) = group_index(resource) {
                flagged
                    .entry(i)
                    .or_default()
                    .push(c["check_id"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    Ok(flagged)
}

/// Per case: (groups, flagged by icmp-guard, flagged by checkov).
fn per_case(
    groups: usize,
    ours: &Flagged,
    theirs: Option<&Flagged>,
) -> Vec<(usize, usize, Option<usize>)> {
    let mut rows = vec![(0, 0, theirs.map(|_| 0)); CASES.len()];
    for i in 0..groups {
        let row = &mut rows[i % CASES.len()];
        row.0 += 1;
        if ours.contains_key(&i) {
            row.1 += 1;
        }
        if let (Some(c), true) = (row.2.as_mut(), theirs.is_some_and(|t| t.contains_key(&i))) {
            *c += 1;
        }
    }
    rows
}

fn verdict(case: &Case, groups: usize, flagged: usize) -> String {
    if case.finding {
        if flagged == groups {
            format!("{flagged} found")
        } else {
            format!("{flagged} found, {} missed", groups - flagged)
        }
    } else if flagged == 0 {
        "0 (correct)".into()
    } else {
        format!("{flagged} false positives")
    }
}

pub fn run(args: BenchAuditArgs) -> Result<()> {
    let root = workspace_root();
    let dir = root.join("target/bench-audit");
    fs::create_dir_all(&dir)?;
    let (cfn, tf) = generate(&dir, args.groups, args.per_file)?;
    eprintln!(
        "generated {} security groups as CloudFormation ({}) and Terraform ({})",
        args.groups,
        cfn.display(),
        tf.display()
    );
    let icmp_guard = icmp_guard_binary(args.icmp_guard)?;
    let checkov = if args.skip_checkov {
        None
    } else {
        Some(checkov_binary(&dir)?)
    };
    let timeout = Duration::from_secs(args.checkov_timeout);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| form | tool | command | wall time (s) | exit |\n|---|---|---|---|---|"
    );
    let mut summary = String::new();
    for (form, input, framework) in [
        ("CloudFormation", &cfn, "cloudformation"),
        ("Terraform", &tf, "terraform"),
    ] {
        let rel = input
            .strip_prefix(&root)
            .unwrap_or(input)
            .display()
            .to_string();
        let ours_cmd = format!("icmp-guard audit {rel} --format json");
        let ours = run_timed(
            Command::new(&icmp_guard)
                .args(["audit", "--format", "json"])
                .arg(input),
            &dir.join(format!("icmp-guard-{framework}.json")),
            Duration::from_secs(3600),
        )?;
        let (ours_flagged, ours_errors) = icmp_guard_flagged(&ours.stdout)?;
        if ours_errors > 0 {
            bail!("icmp-guard reported {ours_errors} input errors on the generated {form}");
        }
        let _ = writeln!(
            md,
            "| {form} | icmp-guard | `{ours_cmd}` | {:.2} | {} |",
            ours.seconds,
            ours.exit.map_or("-".into(), |c| c.to_string())
        );
        let theirs = match &checkov {
            None => None,
            Some(checkov) => {
                let theirs_cmd = format!(
                    "checkov -d {rel} --framework {framework} --check \
                     CKV_AWS_24,CKV_AWS_25,CKV_AWS_260,CKV_AWS_277 --quiet -o json \
                     --skip-download"
                );
                eprintln!("running {theirs_cmd} (timeout {}s)…", args.checkov_timeout);
                let t = run_timed(
                    Command::new(checkov)
                        .arg("-d")
                        .arg(input)
                        .args(["--framework", framework])
                        .args(["--check", "CKV_AWS_24,CKV_AWS_25,CKV_AWS_260,CKV_AWS_277"])
                        .args(["--quiet", "-o", "json", "--skip-download"])
                        .env("CHECKOV_RUN_SCA_PACKAGE_SCAN_V2", "false"),
                    &dir.join(format!("checkov-{framework}.json")),
                    timeout,
                )?;
                let _ = writeln!(
                    md,
                    "| {form} | checkov | `{theirs_cmd}` | {:.2}{} | {} |",
                    t.seconds,
                    if t.timed_out {
                        " (stopped: timeout)"
                    } else {
                        ""
                    },
                    t.exit.map_or("-".into(), |c| c.to_string())
                );
                Some(t)
            }
        };
        let theirs_flagged = match &theirs {
            Some(t) if !t.timed_out => Some(checkov_flagged(&t.stdout)?),
            _ => None,
        };
        println!("\n== {form}: {} groups ==", args.groups);
        println!("icmp-guard: {:.2} s", ours.seconds);
        if let Some(t) = &theirs {
            if t.timed_out {
                println!("checkov:    stopped after {:.0} s (timeout)", t.seconds);
            } else {
                println!(
                    "checkov:    {:.2} s  (checkov / icmp-guard = {:.1}x); checkov read {}",
                    t.seconds,
                    t.seconds / ours.seconds,
                    checkov_summary(&t.stdout)
                );
            }
        }
        let rows = per_case(args.groups, &ours_flagged, theirs_flagged.as_ref());
        let timing = match &theirs {
            Some(t) if t.timed_out => format!(
                "icmp-guard {:.2} s; checkov stopped after {:.0} s",
                ours.seconds, t.seconds
            ),
            Some(t) => format!(
                "icmp-guard {:.2} s, checkov {:.2} s: checkov / icmp-guard = {:.1}x; checkov \
                 read {}",
                ours.seconds,
                t.seconds,
                t.seconds / ours.seconds,
                checkov_summary(&t.stdout)
            ),
            None => format!("icmp-guard {:.2} s", ours.seconds),
        };
        let _ = writeln!(
            summary,
            "\n**{form}** ({} groups; {timing})\n\n| case | truth | groups | icmp-guard | checkov |\n|---|---|---|---|---|",
            args.groups
        );
        println!(
            "{:<48} {:<10} {:>6}  {:<24} checkov",
            "case", "truth", "groups", "icmp-guard"
        );
        for (case, (n, ours_n, theirs_n)) in CASES.iter().zip(rows) {
            let truth = if case.finding { "finding" } else { "none" };
            let ours_v = verdict(case, n, ours_n);
            let theirs_v = theirs_n.map_or("(not run)".into(), |t| verdict(case, n, t));
            println!(
                "{:<48} {:<10} {:>6}  {:<24} {}",
                case.what, truth, n, ours_v, theirs_v
            );
            let _ = writeln!(
                summary,
                "| {} | {truth} | {n} | {ours_v} | {theirs_v} |",
                case.what
            );
        }
    }
    let results = dir.join("results.md");
    fs::write(&results, format!("{md}{summary}"))?;
    println!("\nmarkdown tables: {}", results.display());
    Ok(())
}
