//! The audit's result and its three renderings: a text table for people, JSON for scripts, and
//! SARIF 2.1.0 for code-scanning UIs.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;

use super::model::{
    Exemption, Finding, InputError, RULE_ID, RULE_NAME, Resource, SEVERITY, SourceLocation, Status,
};

/// One input that was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditedFile {
    pub name: String,
    /// `aws`, `cloudformation`, `terraform`, `terraform-plan`, `tfvars`.
    pub format: String,
}

/// A rule that opens ICMP from anywhere but only messages that are exempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExemptRule {
    pub resource: String,
    #[serde(flatten)]
    pub location: SourceLocation,
    pub rule_path: String,
    pub exemption: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    pub files: Vec<AuditedFile>,
    /// Files found in directories that are not security-group definitions.
    pub skipped: Vec<String>,
    /// Ingress rules judged (one per source).
    pub ingress_rules: usize,
    pub findings: Vec<Finding>,
    pub exempt: Vec<ExemptRule>,
    pub exemptions: Vec<Exemption>,
    pub errors: Vec<InputError>,
}

impl AuditReport {
    pub fn failed(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .count()
    }

    pub fn unknown(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.status == Status::Unknown)
            .count()
    }

    /// 2 when any input could not be audited (so a broken file never looks like a pass, even
    /// next to findings), else 1 for findings (and for unknowns with `fail_on_unknown`), else 0.
    pub fn exit_code(&self, fail_on_unknown: bool) -> u8 {
        if !self.errors.is_empty() {
            2
        } else if self.failed() > 0 || (fail_on_unknown && self.unknown() > 0) {
            1
        } else {
            0
        }
    }
}

fn exemptions_text(exemptions: &[Exemption]) -> String {
    if exemptions.is_empty() {
        "none".into()
    } else {
        exemptions
            .iter()
            .map(Exemption::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The text report: a summary, a table with one line per finding, then each finding's reason and
/// remedy. Errors are not part of it (they go to stderr).
pub fn text(report: &AuditReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{RULE_ID} {RULE_NAME} (risk level {SEVERITY})");
    let _ = write!(
        s,
        "Audited {}, {}: {}, {}, {} (exemptions: {})",
        plural(report.files.len(), "file", "files"),
        plural(report.ingress_rules, "ingress rule", "ingress rules"),
        plural(report.failed(), "finding", "findings"),
        plural(report.unknown(), "unknown", "unknown"),
        plural(report.exempt.len(), "exempt", "exempt"),
        exemptions_text(&report.exemptions),
    );
    if !report.errors.is_empty() {
        let _ = write!(
            s,
            "; {} (see stderr)",
            plural(report.errors.len(), "input error", "input errors")
        );
    }
    s.push('\n');
    if report.findings.is_empty() {
        s.push_str("No ICMP open from anywhere.\n");
        return s;
    }
    s.push('\n');
    let header = [
        "STATUS", "RESOURCE", "LOCATION", "PROTOCOL", "OPENS", "SOURCE",
    ];
    let rows: Vec<[String; 6]> = report
        .findings
        .iter()
        .map(|f| {
            [
                f.status.to_string(),
                f.resource_name.clone(),
                f.location.to_string(),
                f.protocol.clone(),
                f.opens.clone(),
                f.source.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
            }
        }
        l.push('\n');
        l
    };
    s.push_str(&line(&header));
    for row in &rows {
        s.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    for (i, f) in report.findings.iter().enumerate() {
        let _ = writeln!(
            s,
            "\n{}. {} {} at {} ({})",
            i + 1,
            f.status,
            f.resource_name,
            f.location,
            f.rule_path
        );
        let mut source = f.source.clone();
        if let Some(d) = &f.source_description {
            let _ = write!(source, " (description: \"{d}\")");
        }
        let _ = writeln!(s, "   source: {source}");
        let _ = writeln!(s, "   why:    {}", f.reason);
        let _ = writeln!(s, "   fix:    {}", f.remedy.summary);
        for c in &f.remedy.commands {
            let _ = writeln!(s, "           $ {c}");
        }
        if let Some(snippet) = &f.remedy.snippet {
            for l in snippet.lines() {
                let _ = writeln!(s, "           | {l}");
            }
        }
        if let Some(p) = &f.remedy.placeholder {
            let _ = writeln!(s, "   note:   {p}");
        }
    }
    s
}

/// The JSON report.
pub fn json(report: &AuditReport, fail_on_unknown: bool) -> String {
    let value = json!({
        "rule": { "id": RULE_ID, "name": RULE_NAME, "severity": SEVERITY },
        "summary": {
            "files": report.files.len(),
            "ingress_rules": report.ingress_rules,
            "findings": report.failed(),
            "unknown": report.unknown(),
            "exempt": report.exempt.len(),
            "errors": report.errors.len(),
            "exit_code": report.exit_code(fail_on_unknown),
        },
        "exemptions": report.exemptions.iter().map(Exemption::to_string).collect::<Vec<_>>(),
        "findings": report.findings,
        "exempt": report.exempt,
        "errors": report.errors,
        "files": report.files,
        "skipped": report.skipped,
    });
    let mut s = serde_json::to_string_pretty(&value).expect("report serialises");
    s.push('\n');
    s
}

/// A file name as a SARIF artifact URI: relative paths stay relative (resolved against the
/// checkout root by code-scanning UIs), with `/` separators and spaces escaped.
fn artifact_uri(file: &str) -> String {
    let path = file.replace('\\', "/").replace(' ', "%20");
    let path = path.strip_prefix("./").unwrap_or(&path).to_string();
    if path.starts_with('/') {
        format!("file://{path}")
    } else {
        path
    }
}

/// The SARIF 2.1.0 log. Findings are `kind: fail`, `level: warning` (Medium); unknowns are
/// `kind: review` (the spec requires `level: none` then) unless `--fail-on-unknown` makes them
/// failures.
pub fn sarif(report: &AuditReport, fail_on_unknown: bool) -> String {
    let results: Vec<_> = report
        .findings
        .iter()
        .map(|f| {
            let failing = f.status == Status::Fail || fail_on_unknown;
            let mut message = format!(
                "{}: {} {} from {} ({}). {}",
                f.resource_name, f.protocol, f.opens, f.source, f.reason, f.remedy.summary
            );
            if f.status == Status::Unknown {
                message.insert_str(0, "Unknown: ");
            }
            let mut location = json!({
                "logicalLocations": [{
                    "fullyQualifiedName": format!("{}/{}", f.resource_name, f.rule_path),
                    "kind": "resource",
                }],
            });
            if f.location.file != "<stdin>" {
                let mut physical = json!({
                    "artifactLocation": { "uri": artifact_uri(&f.location.file) },
                });
                if !f.location.file.starts_with('/') {
                    physical["artifactLocation"]["uriBaseId"] = json!("%SRCROOT%");
                }
                if f.location.line > 0 {
                    physical["region"] = json!({ "startLine": f.location.line });
                }
                location["physicalLocation"] = physical;
            }
            let resource = match &f.resource {
                Resource::AwsSecurityGroup { group_id, .. } => json!({ "groupId": group_id }),
                Resource::CloudFormation { logical_id, .. } => json!({ "logicalId": logical_id }),
                Resource::Terraform { address, .. } => json!({ "address": address }),
            };
            json!({
                "ruleId": RULE_ID,
                "ruleIndex": 0,
                "kind": if failing { "fail" } else { "review" },
                "level": if failing { "warning" } else { "none" },
                "message": { "text": message },
                "locations": [location],
                "properties": {
                    "status": f.status,
                    "protocol": f.protocol,
                    "opens": f.opens,
                    "source": f.source,
                    "resource": resource,
                    "remediationCommands": f.remedy.commands,
                },
            })
        })
        .collect();
    let notifications: Vec<_> = report
        .errors
        .iter()
        .map(|e| {
            let mut n = json!({
                "level": "error",
                "message": { "text": format!("{}: {}", e.message, e.hint) },
                "locations": [{ "physicalLocation": {
                    "artifactLocation": { "uri": artifact_uri(&e.file) },
                }}],
            });
            if e.line > 0 {
                n["locations"][0]["physicalLocation"]["region"] = json!({ "startLine": e.line });
            }
            n
        })
        .collect();
    let log = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "icmp-guard",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": [{
                    "id": RULE_ID,
                    "name": "UnrestrictedIcmpAccess",
                    "shortDescription": { "text": RULE_NAME },
                    "fullDescription": { "text":
                        "An inbound security-group rule allows ICMP (or all traffic, which \
                         includes ICMP) from anywhere (0.0.0.0/0 or ::/0: any prefix length 0). \
                         Path MTU Discovery messages (ICMP 3/4, ICMPv6 2) are exempt by default." },
                    "help": { "text":
                        "Restrict ICMP to trusted IP ranges or security groups (Principle of \
                         Least Privilege). Unrestricted ICMP helps DoS, Smurf and Fraggle attacks. \
                         Keep ICMP type 3 code 4 and ICMPv6 type 2 open so Path MTU Discovery \
                         works." },
                    "defaultConfiguration": { "level": "warning" },
                    "properties": {
                        "security-severity": "5.0",
                        "problem.severity": "warning",
                        "tags": ["security", "aws", "ec2", "security-group", "icmp"],
                        "compliance": ["PCI", "APRA", "MAS", "NIST4"],
                    },
                }],
            }},
            "invocations": [{
                "executionSuccessful": report.errors.is_empty(),
                "toolExecutionNotifications": notifications,
            }],
            "results": results,
        }],
    });
    let mut s = serde_json::to_string_pretty(&log).expect("SARIF serialises");
    s.push('\n');
    s
}
