//! `icmp-guard audit`: Conformity rule EC2-044 "Unrestricted ICMP access" for AWS security-group
//! definitions.
//!
//! Reads `aws ec2 describe-security-groups` / `describe-security-group-rules` JSON,
//! CloudFormation templates (JSON/YAML), Terraform `.tf` files and `terraform show -json` plans,
//! turns every permission/source pair into a [`model::SecurityGroupRule`] and judges each on its
//! own ([`model::evaluate`]). Findings are printed as text, JSON or SARIF.
//!
//! Exit codes: 0 no findings; 1 findings (unknowns too with `--fail-on-unknown`); 2 an input or
//! usage error. 2 wins over 1: when some file could not be audited the run must not read as a
//! plain pass or fail, but findings from the readable files are still printed.

pub mod aws_api;
pub mod cloudformation;
pub mod detect;
pub mod document;
pub mod model;
pub mod report;
pub mod terraform;
pub mod terraform_hcl;
pub mod terraform_plan;
pub mod value;

use std::{
    collections::{BTreeMap, HashSet},
    io::{Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

pub use detect::{Input, InputFormat};
pub use model::{Cidr, Exemption, Finding, IpFamily, RuleOptions, Status};
pub use report::AuditReport;

use detect::Detected;
use model::{ReadOutcome, Verdict};
use terraform_hcl::ModuleScope;

/// How to print the report.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// A table for people, then each finding's reason and remedy.
    #[default]
    Text,
    /// One JSON document (summary, findings, errors).
    Json,
    /// SARIF 2.1.0, for code-scanning UIs.
    Sarif,
}

/// `icmp-guard audit`: check security-group definitions for ICMP open to anywhere (EC2-044).
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Exit status: 0 no findings, 1 findings (and unknowns with \
    --fail-on-unknown), 2 input or usage error (takes precedence; the readable files are still \
    audited and reported)."
)]
pub struct AuditArgs {
    /// Files or directories (searched recursively for .json, .yaml, .yml, .template, .tf and
    /// .tfvars); `-` reads stdin.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,

    /// Input form; `auto` detects it from each file's content.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    pub input_format: InputFormat,

    /// ICMP messages allowed from anywhere, as icmp:TYPE[:CODE] or icmpv6:TYPE[:CODE]
    /// (repeatable). Added to the Path MTU Discovery defaults icmp:3:4 and icmpv6:2.
    #[arg(long, value_name = "FAMILY:TYPE[:CODE]")]
    pub exempt: Vec<Exemption>,

    /// Do not exempt Path MTU Discovery (icmp:3:4, icmpv6:2).
    #[arg(long)]
    pub no_default_exemptions: bool,

    /// Count unknown findings (values only known at deploy time) as findings for the exit code.
    /// Without it they are reported but the exit code is 0 when there is no definite finding.
    #[arg(long)]
    pub fail_on_unknown: bool,

    /// Trusted range to write into remedies instead of the placeholders 203.0.113.0/24 and
    /// 2001:db8::/32 (give one IPv4 and/or one IPv6 range).
    #[arg(long, value_name = "CIDR")]
    pub trusted_cidr: Vec<Cidr>,

    /// Region for the remediation commands (`--region` of the aws CLI).
    #[arg(long)]
    pub region: Option<String>,
}

impl AuditArgs {
    /// The judging options these arguments ask for.
    pub fn rule_options(&self) -> RuleOptions {
        let mut options = RuleOptions::default();
        if self.no_default_exemptions {
            options.exemptions.clear();
        }
        for e in &self.exempt {
            if !options.exemptions.contains(e) {
                options.exemptions.push(*e);
            }
        }
        for c in &self.trusted_cidr {
            options.trusted_given = true;
            match c.family {
                IpFamily::V4 => options.trusted_v4 = c.text.clone(),
                IpFamily::V6 => options.trusted_v6 = c.text.clone(),
            }
        }
        options.region = self.region.clone();
        options
    }
}

/// Runs the audit as the CLI does, on the process's stdin/stdout/stderr.
pub fn run(args: &AuditArgs) -> ExitCode {
    let code = execute(
        args,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    ExitCode::from(code)
}

/// [`run`] with explicit streams; returns the exit code.
pub fn execute(
    args: &AuditArgs,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    let options = args.rule_options();
    let (inputs, mut path_errors) = detect::collect(&args.paths, stdin);
    let mut report = audit(&inputs, args.input_format, &options);
    path_errors.append(&mut report.errors);
    report.errors = path_errors;
    let rendered = match args.format {
        OutputFormat::Text => report::text(&report),
        OutputFormat::Json => report::json(&report, args.fail_on_unknown),
        OutputFormat::Sarif => report::sarif(&report, args.fail_on_unknown),
    };
    for e in &report.errors {
        let _ = writeln!(stderr, "error: {e}");
    }
    if stdout.write_all(rendered.as_bytes()).is_err() {
        return 2;
    }
    let _ = stdout.flush();
    report.exit_code(args.fail_on_unknown)
}

/// Audits inputs already read into memory.
pub fn audit(inputs: &[Input], forced: InputFormat, options: &RuleOptions) -> AuditReport {
    let mut report = AuditReport {
        exemptions: options.exemptions.clone(),
        ..AuditReport::default()
    };
    let mut detected = Vec::with_capacity(inputs.len());
    for input in inputs {
        match detect::detect(input, forced) {
            Ok(Detected::Skipped(why)) => report.skipped.push(format!("{}: {why}", input.name)),
            Ok(d) => {
                report.files.push(report::AuditedFile {
                    name: input.name.clone(),
                    format: d.format_name().into(),
                });
                detected.push((input, d));
            }
            Err(e) => report.errors.push(e),
        }
    }
    let scopes = terraform_scopes(&detected);
    for (input, d) in &detected {
        let outcome = match d {
            Detected::Aws(doc) => aws_api::read(&input.name, doc),
            Detected::CloudFormation(doc) => cloudformation::read(&input.name, doc),
            Detected::TerraformPlan(doc) => terraform_plan::read(&input.name, doc),
            Detected::Terraform(body) => {
                let scope = scopes.get(&module_dir(input)).cloned().unwrap_or_default();
                terraform_hcl::read(&input.name, &input.text, body, &scope)
            }
            Detected::TfVars(_) | Detected::Skipped(_) => ReadOutcome::default(),
        };
        judge(outcome, options, &mut report);
    }
    report
}

fn judge(outcome: ReadOutcome, options: &RuleOptions, report: &mut AuditReport) {
    report.errors.extend(outcome.errors);
    for rule in &outcome.rules {
        if rule.direction == model::Direction::Ingress {
            report.ingress_rules += 1;
        }
        match model::evaluate(rule, options) {
            Verdict::Pass => {}
            Verdict::Exempt(e) => report.exempt.push(report::ExemptRule {
                resource: rule.resource.to_string(),
                location: rule.location.clone(),
                rule_path: rule.rule_path.clone(),
                exemption: e.to_string(),
            }),
            Verdict::Finding(f) => report.findings.push(*f),
        }
    }
}

/// The Terraform module (directory) an input belongs to; stdin is a module of its own.
fn module_dir(input: &Input) -> Option<PathBuf> {
    input
        .path
        .as_ref()
        .map(|p| p.parent().unwrap_or(Path::new("")).to_path_buf())
}

/// Variables and locals per module. A module is a directory, so declarations come from every
/// `.tf` beside the audited ones (a `variables.tf` need not be named on the command line), and
/// values from `terraform.tfvars` / `*.auto.tfvars` there and from `.tfvars` files given.
fn terraform_scopes(detected: &[(&Input, Detected)]) -> BTreeMap<Option<PathBuf>, ModuleScope> {
    let mut scopes: BTreeMap<Option<PathBuf>, ModuleScope> = BTreeMap::new();
    let seen: HashSet<&Path> = detected
        .iter()
        .filter_map(|(i, _)| i.path.as_deref())
        .collect();
    for (input, d) in detected {
        if let Detected::Terraform(body) = d {
            scopes
                .entry(module_dir(input))
                .or_default()
                .add_declarations(body);
        }
    }
    let dirs: Vec<PathBuf> = scopes.keys().flatten().cloned().collect();
    for dir in dirs {
        let scope = scopes.entry(Some(dir.clone())).or_default();
        let listing = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &dir
        });
        let mut siblings: Vec<PathBuf> = listing
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        siblings.sort();
        for path in siblings {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let auto_vars = name == "terraform.tfvars" || name.ends_with(".auto.tfvars");
            let declarations = name.ends_with(".tf") && !seen.contains(path.as_path());
            if !auto_vars && !declarations {
                continue;
            }
            // Siblings are read only for their declarations; their own errors are reported
            // when they are audited themselves.
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(body) = terraform_hcl::parse(&path.display().to_string(), &text) else {
                continue;
            };
            if auto_vars {
                scope.add_tfvars(&body);
            } else {
                scope.add_declarations(&body);
            }
        }
    }
    // `.tfvars` named on the command line win over the automatic ones.
    for (input, d) in detected {
        if let Detected::TfVars(body) = d {
            // A walked `prod.tfvars` is not loaded by Terraform either unless named.
            let automatic =
                input.name.ends_with("terraform.tfvars") || input.name.ends_with(".auto.tfvars");
            if input.explicit && !automatic {
                scopes
                    .entry(module_dir(input))
                    .or_default()
                    .add_tfvars(body);
            }
        }
    }
    scopes
}
