//! `icmp-guard audit` (EC2-044) on the fixtures in `examples/audit/`.
//!
//! `library` runs the audit in-process through `icmp_guard::audit::execute`; `binary` runs the
//! real executable. The binary tests need `main.rs` to dispatch the `audit` subcommand; set
//! `ICMP_GUARD_BIN` to run them against another build of the binary.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use clap::Parser;
use icmp_guard::audit::{AuditArgs, execute};
use serde_json::Value;

/// The workspace root: fixture paths in reports are relative to it.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: AuditArgs,
}

struct Outcome {
    code: u8,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs the audit in-process. Paths are made absolute against the workspace root, and the root
/// is stripped from the output again so assertions read like the CLI run from the root.
fn lib_run(args: &[&str], stdin: &str) -> Outcome {
    let root = root();
    let argv = std::iter::once("audit".to_string()).chain(args.iter().map(|a| {
        if a.starts_with("examples/") {
            root.join(a).display().to_string()
        } else {
            a.to_string()
        }
    }));
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = execute(&cli.args, &mut stdin.as_bytes(), &mut out, &mut err);
    let prefix = format!("{}/", root.display());
    Outcome {
        code,
        stdout: String::from_utf8(out).unwrap().replace(&prefix, ""),
        stderr: String::from_utf8(err).unwrap().replace(&prefix, ""),
    }
}

fn lib_json(args: &[&str]) -> (u8, Value) {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    let o = lib_run(&all, "");
    (o.code, o.json())
}

fn findings(report: &Value) -> &Vec<Value> {
    report["findings"].as_array().expect("findings array")
}

/// `(status, resource, line, source)` per finding, in report order.
fn summary(report: &Value) -> Vec<(String, String, u64, String)> {
    findings(report)
        .iter()
        .map(|f| {
            (
                f["status"].as_str().unwrap().to_string(),
                f["resource_name"].as_str().unwrap().to_string(),
                f["line"].as_u64().unwrap(),
                f["source"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn row(status: &str, resource: &str, line: u64, source: &str) -> (String, String, u64, String) {
    (status.into(), resource.into(), line, source.into())
}

mod library {
    use super::*;

    #[test]
    fn describe_security_groups_each_source_judged_alone() {
        let (code, r) = lib_json(&["examples/audit/aws/describe-security-groups.json"]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![
                row("fail", "sg-0a1b2c3d4e5f60001 (web-public)", 25, "0.0.0.0/0"),
                row(
                    "fail",
                    "sg-0a1b2c3d4e5f60004 (legacy-dual-stack)",
                    141,
                    "::/0"
                ),
                row(
                    "fail",
                    "sg-0a1b2c3d4e5f60004 (legacy-dual-stack)",
                    154,
                    "0:0:0:0:0:0:0:0/0"
                ),
            ]
        );
        let ping = &findings(&r)[0];
        assert_eq!(
            ping["file"],
            "examples/audit/aws/describe-security-groups.json"
        );
        assert_eq!(ping["rule_path"], "IpPermissions[1].IpRanges[0]");
        assert_eq!(ping["protocol"], "icmp");
        assert_eq!(ping["opens"], "type 8 (echo request), all codes");
        assert_eq!(ping["source_description"], "ping from anywhere");
        assert_eq!(ping["severity"], "Medium");
        assert_eq!(ping["rule_id"], "EC2-044");
        let commands = ping["remedy"]["commands"].as_array().unwrap();
        assert_eq!(
            commands[0],
            "aws ec2 revoke-security-group-ingress --group-id sg-0a1b2c3d4e5f60001 \
             --ip-permissions 'IpProtocol=icmp,FromPort=8,ToPort=-1,IpRanges=[{CidrIp=0.0.0.0/0}]'"
        );
        assert_eq!(
            commands[1],
            "aws ec2 authorize-security-group-ingress --group-id sg-0a1b2c3d4e5f60001 \
             --ip-permissions 'IpProtocol=icmp,FromPort=8,ToPort=-1,\
             IpRanges=[{CidrIp=203.0.113.0/24,Description=\"trusted range\"}]'"
        );
        assert!(
            ping["remedy"]["placeholder"]
                .as_str()
                .unwrap()
                .contains("203.0.113.0/24 is a placeholder")
        );
        // -1 over IPv6 opens ICMPv6; the remedy keeps Path MTU Discovery (ICMPv6 2) open.
        let all = &findings(&r)[1];
        assert_eq!(all["protocol"], "-1 (all traffic)");
        assert!(all["reason"].as_str().unwrap().contains("includes icmpv6"));
        let commands = all["remedy"]["commands"].as_array().unwrap();
        assert_eq!(
            commands[0],
            "aws ec2 revoke-security-group-ingress --group-id sg-0a1b2c3d4e5f60004 \
             --ip-permissions 'IpProtocol=-1,Ipv6Ranges=[{CidrIpv6=::/0}]'"
        );
        assert!(commands[2].as_str().unwrap().contains(
            "IpProtocol=icmpv6,FromPort=2,ToPort=-1,Ipv6Ranges=[{CidrIpv6=::/0,Description=\"Path MTU Discovery\"}]"
        ));
        // The k8s group's Path MTU Discovery rules are exempt, not findings.
        let exempt: Vec<_> = r["exempt"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["resource"].as_str().unwrap(),
                    e["exemption"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            exempt,
            vec![
                ("sg-0a1b2c3d4e5f60002 (k8s-elb-a1b2c3)", "icmp:3:4"),
                ("sg-0a1b2c3d4e5f60002 (k8s-elb-a1b2c3)", "icmpv6:2"),
            ]
        );
        // 9 ingress sources; egress (-1 and icmp from 0.0.0.0/0) is never counted or flagged.
        assert_eq!(r["summary"]["ingress_rules"], 9);
    }

    #[test]
    fn describe_security_group_rules_revokes_by_rule_id() {
        let (code, r) = lib_json(&["examples/audit/aws/describe-security-group-rules.json"]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![
                row(
                    "fail",
                    "sg-0b1b2c3d4e5f60010 sgr-0aaa0000000000001",
                    3,
                    "::/0"
                ),
                row(
                    "fail",
                    "sg-0b1b2c3d4e5f60011 sgr-0aaa0000000000005",
                    48,
                    "0.0.0.0/0"
                ),
            ]
        );
        let f = &findings(&r)[0];
        assert_eq!(f["opens"], "type 128 code 0 (echo request)");
        assert_eq!(
            f["remedy"]["commands"][0],
            "aws ec2 revoke-security-group-ingress --group-id sg-0b1b2c3d4e5f60010 \
             --security-group-rule-ids sgr-0aaa0000000000001"
        );
        // Protocol "1" is icmp.
        assert_eq!(findings(&r)[1]["protocol"], "icmp");
        assert_eq!(r["summary"]["exempt"], 1);
    }

    #[test]
    fn cli_filters_false_positive_is_not_a_finding() {
        // ICMP from 10/8 in one permission and TCP from 0/0 in another: the CLI's --filters
        // match this group, EC2-044 does not.
        let (code, r) = lib_json(&["examples/audit/aws/filters-false-positive.json"]);
        assert_eq!(code, 0);
        assert!(findings(&r).is_empty());
        assert_eq!(r["summary"]["ingress_rules"], 2);
    }

    #[test]
    fn seed_remediated_template_passes_and_egress_is_ignored() {
        let (code, r) = lib_json(&["examples/audit/cloudformation/seed-remediated.json"]);
        assert_eq!(code, 0);
        assert!(findings(&r).is_empty());
        assert_eq!(r["files"][0]["format"], "cloudformation");
        assert_eq!(r["summary"]["ingress_rules"], 1);
    }

    #[test]
    fn path_mtu_discovery_exempt_by_default_and_configurable() {
        let file = "examples/audit/cloudformation/pmtud-exempt.json";
        let (code, r) = lib_json(&[file]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![row("fail", "UnreachableFromAnywhere", 30, "0.0.0.0/0")]
        );
        assert_eq!(
            findings(&r)[0]["opens"],
            "type 3 (destination unreachable), all codes"
        );
        assert_eq!(r["summary"]["exempt"], 2);

        let (code, r) = lib_json(&[file, "--no-default-exemptions"]);
        assert_eq!(code, 1);
        let lines: Vec<u64> = summary(&r).iter().map(|s| s.2).collect();
        assert_eq!(lines, vec![11, 18, 30]);

        // Exempting all of type 3 covers the standalone rule too.
        let (code, r) = lib_json(&[file, "--exempt", "icmp:3"]);
        assert_eq!(code, 0, "{r}");
        assert_eq!(r["summary"]["exempt"], 3);
    }

    #[test]
    fn anywhere_written_oddly_is_still_anywhere() {
        let (code, r) = lib_json(&["examples/audit/cloudformation/odd-anywhere.yaml"]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![
                row("fail", "OddlyWrittenAnywhere", 10, "10.1.2.3/0"),
                row("fail", "OddlyWrittenAnywhere", 14, "::0/0"),
                row("fail", "OddlyWrittenAnywhere", 16, "0:0:0:0:0:0:0:0/0"),
            ]
        );
        // icmpv6 without FromPort/ToPort opens every type.
        assert_eq!(findings(&r)[1]["opens"], "all types");
        // 0.0.0.0/1 is half the internet but not "anywhere".
        assert_eq!(r["summary"]["ingress_rules"], 4);
    }

    #[test]
    fn protocols_and_ports_as_numbers_or_strings() {
        let (code, r) =
            lib_json(&["examples/audit/cloudformation/protocol-numbers-and-strings.yaml"]);
        assert_eq!(code, 1);
        let got: Vec<(String, String, u64)> = findings(&r)
            .iter()
            .map(|f| {
                (
                    f["protocol"].as_str().unwrap().into(),
                    f["opens"].as_str().unwrap().into(),
                    f["line"].as_u64().unwrap(),
                )
            })
            .collect();
        let want = [
            ("icmp", "type 8 (echo request), all codes", 9),
            ("icmp", "type 0 (echo reply), all codes", 13),
            ("icmpv6", "type 128 (echo request), all codes", 17),
            ("-1 (all traffic)", "all types", 25),
            ("-1 (all traffic)", "all types", 27),
            ("icmp", "type 13 code 0 (timestamp)", 31),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(p, o, l)| (p.to_string(), o.to_string(), *l))
                .collect::<Vec<_>>()
        );
        // "58" with FromPort "2" ToPort "0" is ICMPv6 packet-too-big: exempt.
        assert_eq!(r["exempt"][0]["line"], 21);
        assert_eq!(r["exempt"][0]["exemption"], "icmpv6:2");
    }

    #[test]
    fn security_group_and_prefix_list_sources_and_egress_are_not_findings() {
        let (code, r) = lib_json(&["examples/audit/cloudformation/sources-and-egress.yaml"]);
        assert_eq!(code, 0, "{r}");
        assert!(findings(&r).is_empty());
        assert_eq!(r["summary"]["ingress_rules"], 3);
    }

    #[test]
    fn cloudformation_intrinsics_resolved_or_unknown() {
        let (code, r) = lib_json(&["examples/audit/cloudformation/short-form-intrinsics.yaml"]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![
                // !Ref to a parameter Default, !Sub with a Number default, !Join.
                row("fail", "Resolved", 37, "0.0.0.0/0"),
                row("fail", "Resolved", 41, "0.0.0.0/0"),
                row("fail", "Resolved", 57, "0.0.0.0/0"),
                row("unknown", "Unresolvable", 73, "unknown"),
                row("unknown", "Unresolvable", 77, "unknown"),
                row("unknown", "Unresolvable", 81, "unknown"),
                row("unknown", "Unresolvable", 85, "unknown"),
            ]
        );
        let reasons: Vec<&str> = findings(&r)[3..]
            .iter()
            .map(|f| f["reason"].as_str().unwrap())
            .collect();
        assert!(reasons[0].contains("parameter `AdminCidr`, which has no Default"));
        assert!(reasons[1].contains("Fn::GetAtt Vpc.Ipv6CidrBlock"));
        assert!(reasons[2].contains("Fn::ImportValue shared-network-AdminCidr"));
        assert!(reasons[3].contains("AWS::Region"));
        // !FindInMap, !If on a condition decided by defaults, !Select over a list default
        // resolve to narrow ranges; the `!If [IsDev, …, !Ref AWS::NoValue]` rule disappears.
        assert_eq!(r["summary"]["ingress_rules"], 11);
    }

    #[test]
    fn unknowns_exit_zero_unless_fail_on_unknown() {
        let file = "examples/audit/cloudformation/parameter-without-default.yaml";
        let (code, r) = lib_json(&[file]);
        assert_eq!(code, 0);
        assert_eq!(r["summary"]["unknown"], 1);
        assert_eq!(
            findings(&r)[0]["source_description"],
            "ping from the monitoring network"
        );
        let (code, r) = lib_json(&[file, "--fail-on-unknown"]);
        assert_eq!(code, 1);
        assert_eq!(r["summary"]["exit_code"], 1);
    }

    #[test]
    fn terraform_inline_rule_resources_and_vpc_rules() {
        let (code, r) = lib_json(&["examples/audit/terraform/inline-and-standalone"]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![
                row("fail", "aws_security_group.web", 21, "0.0.0.0/0"),
                row("fail", "aws_security_group.web", 22, "::/0"),
                row(
                    "fail",
                    "aws_security_group_rule.echo_from_anywhere",
                    70,
                    "0.0.0.0/0"
                ),
                row(
                    "fail",
                    "aws_vpc_security_group_ingress_rule.icmpv6_all",
                    86,
                    "::/0"
                ),
                row(
                    "fail",
                    "aws_vpc_security_group_ingress_rule.everything_v4",
                    93,
                    "0.0.0.0/0"
                ),
            ]
        );
        assert_eq!(findings(&r)[0]["rule_path"], "ingress[1].cidr_blocks[1]");
        assert!(
            findings(&r)[0]["remedy"]["snippet"]
                .as_str()
                .unwrap()
                .contains("cidr_blocks = [\"203.0.113.0/24\"]")
        );
        assert!(
            findings(&r)[3]["remedy"]["snippet"]
                .as_str()
                .unwrap()
                .contains("cidr_ipv6   = \"2001:db8::/32\"")
        );
        assert_eq!(findings(&r)[3]["opens"], "all types");
        assert_eq!(r["summary"]["exempt"], 2);
    }

    #[test]
    fn terraform_variables_defaults_locals_dynamic_and_unknowns() {
        let (code, r) = lib_json(&["examples/audit/terraform/variables/main.tf"]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![
                row("fail", "aws_security_group.app", 18, "0.0.0.0/0"),
                row("unknown", "aws_security_group.app", 26, "unknown"),
                row("fail", "aws_security_group.app", 42, "::/0"),
                row("unknown", "aws_security_group.app", 58, "unknown"),
                row("fail", "aws_security_group.app", 67, "0.0.0.0/0"),
            ]
        );
        assert!(
            findings(&r)[1]["reason"]
                .as_str()
                .unwrap()
                .contains("var.admin_cidr has no default")
        );
        assert!(
            findings(&r)[3]["reason"]
                .as_str()
                .unwrap()
                .contains("aws_vpc.main.cidr_block is known only after apply")
        );
        // The dynamic block's Path MTU Discovery entry is exempt.
        assert_eq!(r["exempt"][0]["rule_path"], "ingress[6].cidr_blocks[0]");

        // A -var-file given on the command line resolves var.admin_cidr.
        let (_, r) = lib_json(&[
            "examples/audit/terraform/variables/main.tf",
            "examples/audit/terraform/variables/admin.tfvars",
        ]);
        assert_eq!(r["summary"]["findings"], 4);
        assert_eq!(r["summary"]["unknown"], 1);
    }

    #[test]
    fn terraform_plan_after_unknown_is_unknown_and_deletes_are_ignored() {
        let (code, r) = lib_json(&["examples/audit/terraform-plan/plan.json"]);
        assert_eq!(code, 1);
        assert_eq!(
            summary(&r),
            vec![
                row("fail", "aws_security_group.edge", 22, "0.0.0.0/0"),
                row(
                    "unknown",
                    "aws_security_group_rule.from_vpc",
                    104,
                    "unknown"
                ),
                row(
                    "fail",
                    "module.network.aws_vpc_security_group_ingress_rule.icmpv6[\"public\"]",
                    134,
                    "::/0"
                ),
            ]
        );
        assert_eq!(findings(&r)[0]["opens"], "type 11 code 0 (time exceeded)");
        assert!(
            findings(&r)[1]["reason"]
                .as_str()
                .unwrap()
                .contains("after_unknown")
        );
        assert_eq!(r["files"][0]["format"], "terraform-plan");
    }

    #[test]
    fn malformed_files_are_errors_with_lines_and_the_rest_is_audited() {
        let o = lib_run(&["examples/audit/malformed", "--format", "json"], "");
        assert_eq!(o.code, 2);
        let r = o.json();
        assert_eq!(
            summary(&r),
            vec![row(
                "fail",
                "sg-0d1b2c3d4e5f60031 (next-to-broken-files)",
                11,
                "0.0.0.0/0"
            )]
        );
        let errors: Vec<(String, u64)> = r["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["file"].as_str().unwrap().to_string(),
                    e["line"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            errors,
            vec![
                ("examples/audit/malformed/bad-hcl.tf".into(), 5),
                ("examples/audit/malformed/bad-json.json".into(), 6),
                ("examples/audit/malformed/bad-yaml.yaml".into(), 9),
                ("examples/audit/malformed/wrong-shape.json".into(), 2),
            ]
        );
        assert!(o.stderr.contains(
            "error: examples/audit/malformed/bad-json.json:6:48: invalid JSON: expected `,` or `}`"
        ));
        assert!(
            o.stderr
                .contains("error: examples/audit/malformed/bad-hcl.tf:5:3: invalid HCL")
        );
        assert!(o.stderr.contains(
            "examples/audit/malformed/wrong-shape.json:2: `SecurityGroups` is a mapping, expected a list"
        ));
    }

    #[test]
    fn stdin_is_detected_from_content() {
        let hcl = std::fs::read_to_string(
            root().join("examples/audit/terraform/inline-and-standalone/main.tf"),
        )
        .unwrap();
        let o = lib_run(&["-", "--format", "json"], &hcl);
        assert_eq!(o.code, 1);
        let r = o.json();
        assert_eq!(r["files"][0]["name"], "<stdin>");
        assert_eq!(r["files"][0]["format"], "terraform");
        assert_eq!(r["summary"]["findings"], 5);
        assert_eq!(findings(&r)[0]["file"], "<stdin>");
        assert_eq!(findings(&r)[0]["line"], 21);

        let o = lib_run(&["-"], "{\"name\": \"package.json\"}");
        assert_eq!(o.code, 2);
        assert!(
            o.stderr.contains("<stdin>:1: not a supported input"),
            "{}",
            o.stderr
        );
    }

    #[test]
    fn forced_input_format_that_does_not_fit_is_an_error() {
        let o = lib_run(
            &[
                "examples/audit/cloudformation/odd-anywhere.yaml",
                "--input-format",
                "aws",
            ],
            "",
        );
        assert_eq!(o.code, 2);
        assert!(
            o.stderr
                .contains("odd-anywhere.yaml:1: this is not `aws ec2 describe-security-groups`")
        );
    }

    #[test]
    fn sarif_has_rule_level_and_regions() {
        let file = "examples/audit/cloudformation/short-form-intrinsics.yaml";
        let o = lib_run(&[file, "--format", "sarif"], "");
        assert_eq!(o.code, 1);
        let s = o.json();
        assert_eq!(s["version"], "2.1.0");
        let run = &s["runs"][0];
        assert_eq!(run["tool"]["driver"]["rules"][0]["id"], "EC2-044");
        assert_eq!(
            run["tool"]["driver"]["rules"][0]["defaultConfiguration"]["level"],
            "warning"
        );
        let results = run["results"].as_array().unwrap();
        assert_eq!(results.len(), 7);
        let first = &results[0];
        assert_eq!(first["ruleId"], "EC2-044");
        assert_eq!(first["level"], "warning");
        assert_eq!(first["kind"], "fail");
        let physical = &first["locations"][0]["physicalLocation"];
        // In-process the path was absolute, so the URI is a file:// URI (the root prefix is
        // stripped from the output); the binary test checks the relative form.
        let uri = physical["artifactLocation"]["uri"].as_str().unwrap();
        assert!(uri.starts_with("file://") && uri.ends_with(file), "{uri}");
        assert_eq!(physical["region"]["startLine"], 37);
        assert_eq!(
            first["locations"][0]["logicalLocations"][0]["fullyQualifiedName"],
            "Resolved/SecurityGroupIngress[0]"
        );
        // Unknowns are for review unless --fail-on-unknown.
        assert_eq!(results[3]["kind"], "review");
        assert_eq!(results[3]["level"], "none");
        let o = lib_run(&[file, "--format", "sarif", "--fail-on-unknown"], "");
        assert_eq!(o.json()["runs"][0]["results"][3]["level"], "warning");
        assert_eq!(run["invocations"][0]["executionSuccessful"], true);
    }

    #[test]
    fn trusted_cidr_and_region_go_into_the_commands() {
        let (_, r) = lib_json(&[
            "examples/audit/aws/describe-security-groups.json",
            "--trusted-cidr",
            "198.51.100.0/24",
            "--region",
            "eu-west-1",
        ]);
        let f = &findings(&r)[0];
        assert_eq!(
            f["remedy"]["commands"][1],
            "aws ec2 authorize-security-group-ingress --region eu-west-1 --group-id \
             sg-0a1b2c3d4e5f60001 --ip-permissions 'IpProtocol=icmp,FromPort=8,ToPort=-1,\
             IpRanges=[{CidrIp=198.51.100.0/24,Description=\"trusted range\"}]'"
        );
        assert!(f["remedy"].get("placeholder").is_none());
    }

    #[test]
    fn text_report_has_table_and_remedy() {
        let o = lib_run(&["examples/audit/aws/describe-security-groups.json"], "");
        assert_eq!(o.code, 1);
        assert!(o.stdout.contains(
            "Audited 1 file, 9 ingress rules: 3 findings, 0 unknown, 2 exempt (exemptions: icmp:3:4, icmpv6:2)"
        ));
        let header = o.stdout.lines().find(|l| l.starts_with("STATUS")).unwrap();
        for col in ["RESOURCE", "LOCATION", "PROTOCOL", "OPENS", "SOURCE"] {
            assert!(header.contains(col), "{header}");
        }
        assert!(o.stdout.contains(
            "FAIL    sg-0a1b2c3d4e5f60001 (web-public)         examples/audit/aws/describe-security-groups.json:25"
        ), "{}", o.stdout);
        assert!(
            o.stdout
                .contains("   source: 0.0.0.0/0 (description: \"ping from anywhere\")")
        );
        assert!(o.stdout.contains(
            "           $ aws ec2 revoke-security-group-ingress --group-id sg-0a1b2c3d4e5f60001"
        ));
        assert!(o.stderr.is_empty());
    }
}

mod binary {
    use super::*;

    fn bin() -> PathBuf {
        std::env::var_os("ICMP_GUARD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_icmp-guard")))
    }

    fn run(args: &[&str], stdin: &str) -> Outcome {
        let mut child = Command::new(bin())
            .arg("audit")
            .args(args)
            .current_dir(root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run icmp-guard");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Outcome {
            code: out.status.code().expect("exit code") as u8,
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    #[test]
    fn exit_codes() {
        let clean = run(&["examples/audit/aws/filters-false-positive.json"], "");
        assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);
        assert!(clean.stdout.contains("No ICMP open from anywhere."));
        let findings = run(&["examples/audit/aws/describe-security-groups.json"], "");
        assert_eq!(findings.code, 1);
        let broken = run(&["examples/audit/malformed"], "");
        assert_eq!(broken.code, 2);
        assert!(
            broken
                .stderr
                .contains("examples/audit/malformed/bad-yaml.yaml:9:21: invalid YAML")
        );
        assert!(
            broken
                .stdout
                .contains("sg-0d1b2c3d4e5f60031 (next-to-broken-files)")
        );
        let unknown = run(
            &["examples/audit/cloudformation/parameter-without-default.yaml"],
            "",
        );
        assert_eq!(unknown.code, 0);
        assert!(unknown.stdout.contains("UNKNOWN  Monitored"));
        let unknown = run(
            &[
                "examples/audit/cloudformation/parameter-without-default.yaml",
                "--fail-on-unknown",
            ],
            "",
        );
        assert_eq!(unknown.code, 1);
    }

    #[test]
    fn usage_errors_exit_2() {
        let o = run(&["--exempt", "tcp:22", "examples/audit/aws"], "");
        assert_eq!(o.code, 2);
        assert!(o.stderr.contains("unknown ICMP family"), "{}", o.stderr);
        let o = run(&["examples/audit/does-not-exist.json"], "");
        assert_eq!(o.code, 2);
        assert!(
            o.stderr.contains("does-not-exist.json: cannot read"),
            "{}",
            o.stderr
        );
    }

    #[test]
    fn whole_examples_tree_as_json() {
        let o = run(&["examples/audit", "--format", "json"], "");
        // The malformed fixtures make it 2; findings of every other form are still there.
        assert_eq!(o.code, 2);
        let r = o.json();
        let formats: std::collections::BTreeSet<&str> = r["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["format"].as_str().unwrap())
            .collect();
        assert_eq!(
            formats.into_iter().collect::<Vec<_>>(),
            vec![
                "aws",
                "cloudformation",
                "terraform",
                "terraform-plan",
                "tfvars"
            ]
        );
        assert_eq!(r["errors"].as_array().unwrap().len(), 4);
        // 3 + 2 (AWS) + 13 fail/4 unknown (CloudFormation incl. pmtud) + 1 unknown
        // + 5 + 3/2 (Terraform, admin.tfvars is not loaded from a walk) + 2/1 (plan) + 1.
        assert_eq!(r["summary"]["findings"], 29);
        assert_eq!(r["summary"]["unknown"], 8);
    }

    #[test]
    fn stdin_and_sarif() {
        let yaml =
            std::fs::read_to_string(root().join("examples/audit/cloudformation/odd-anywhere.yaml"))
                .unwrap();
        let o = run(&["-", "--format", "sarif"], &yaml);
        assert_eq!(o.code, 1);
        let s = o.json();
        let results = s["runs"][0]["results"].as_array().unwrap();
        assert_eq!(results.len(), 3);
        // No file to point at: only the logical location.
        assert!(results[0]["locations"][0].get("physicalLocation").is_none());
        assert_eq!(
            results[0]["locations"][0]["logicalLocations"][0]["fullyQualifiedName"],
            "OddlyWrittenAnywhere/SecurityGroupIngress[0]"
        );

        let file = "examples/audit/terraform-plan/plan.json";
        let o = run(&[file, "--format", "sarif"], "");
        assert_eq!(o.code, 1);
        let s = o.json();
        let physical = &s["runs"][0]["results"][0]["locations"][0]["physicalLocation"];
        assert_eq!(physical["artifactLocation"]["uri"], file);
        assert_eq!(physical["artifactLocation"]["uriBaseId"], "%SRCROOT%");
        assert_eq!(physical["region"]["startLine"], 22);
    }
}

/// Runs the audit of `text` (stdin, `--input-format FORMAT`) on a thread and fails if it takes
/// longer than `limit`: the inputs below took minutes to hours, or all memory, before their fix.
fn lib_json_within(format: &str, text: String, limit: std::time::Duration) -> Value {
    let format = format.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = lib_run(&["--format", "json", "--input-format", &format, "-"], &text);
        let _ = tx.send(out.json());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the audit did not finish within {limit:?}"))
}

fn only_finding_why(report: &Value) -> String {
    let f = findings(report);
    assert_eq!(f.len(), 1, "{report:#}");
    assert_eq!(f[0]["status"], "unknown", "{report:#}");
    f[0].to_string()
}

/// Ten conditions that each name the next one eight times were 8^9 evaluations (a hang); the
/// evaluation budget makes the rule UNKNOWN, with the reason, instead.
#[test]
fn cloudformation_conditions_that_multiply_are_unknown_not_a_hang() {
    let conditions: Vec<String> = (0..9)
        .map(|i| {
            format!(
                "\"C{i}\": {{\"Fn::And\": [{}]}}",
                vec![format!("{{\"Condition\": \"C{}\"}}", i + 1); 8].join(", ")
            )
        })
        .chain(std::iter::once(
            "\"C9\": {\"Fn::Equals\": [\"a\", \"a\"]}".to_string(),
        ))
        .collect();
    let template = format!(
        "{{\"AWSTemplateFormatVersion\": \"2010-09-09\", \"Conditions\": {{{}}}, \"Resources\": \
         {{\"Sg\": {{\"Type\": \"AWS::EC2::SecurityGroupIngress\", \"Properties\": {{\"GroupId\": \
         \"sg-1\", \"IpProtocol\": {{\"Fn::If\": [\"C0\", \"icmp\", \"tcp\"]}}, \"CidrIp\": \
         \"0.0.0.0/0\", \"FromPort\": -1, \"ToPort\": -1}}}}}}}}",
        conditions.join(", ")
    );
    let report = lib_json_within(
        "cloudformation",
        template,
        std::time::Duration::from_secs(20),
    );
    let why = only_finding_why(&report);
    assert!(why.contains("too many times"), "{why}");
}

/// A parameter whose default substitutes the next one eight times, nine deep, built a string
/// of 8^9 bytes; now a string past 64 KiB is unknown.
#[test]
fn cloudformation_substitutions_that_multiply_are_unknown_not_a_hang() {
    let mut parameters: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "\"P{i}\": {{\"Type\": \"String\", \"Default\": {{\"Fn::Sub\": \"{}\"}}}}",
                format!("${{P{}}}", i + 1).repeat(8)
            )
        })
        .collect();
    parameters.push("\"P12\": {\"Type\": \"String\", \"Default\": \"0.0.0.0/0\"}".into());
    let template = format!(
        "{{\"AWSTemplateFormatVersion\": \"2010-09-09\", \"Parameters\": {{{}}}, \"Resources\": \
         {{\"Sg\": {{\"Type\": \"AWS::EC2::SecurityGroupIngress\", \"Properties\": {{\"GroupId\": \
         \"sg-1\", \"IpProtocol\": \"icmp\", \"CidrIp\": {{\"Ref\": \"P0\"}}, \"FromPort\": -1, \
         \"ToPort\": -1}}}}}}}}",
        parameters.join(", ")
    );
    let report = lib_json_within(
        "cloudformation",
        template,
        std::time::Duration::from_secs(20),
    );
    let why = only_finding_why(&report);
    assert!(why.contains("longer than the 65536 bytes"), "{why}");
}

/// Locals that each list the next one eight times grew without bound (700 MB after 20 s); the
/// evaluation budget stops them and the rules are UNKNOWN.
#[test]
fn terraform_locals_that_multiply_are_unknown_not_a_hang() {
    let mut tf = String::from("locals {\n");
    for i in 0..12 {
        tf.push_str(&format!(
            "  l{i} = [{}]\n",
            vec![format!("local.l{}", i + 1); 8].join(", ")
        ));
    }
    tf.push_str("  l12 = \"0.0.0.0/0\"\n}\n");
    tf.push_str(
        "resource \"aws_security_group\" \"x\" {\n  ingress {\n    protocol = \"icmp\"\n    \
         from_port = -1\n    to_port = -1\n    cidr_blocks = local.l0\n  }\n}\n",
    );
    let report = lib_json_within("terraform", tf, std::time::Duration::from_secs(20));
    let f = findings(&report);
    assert!(!f.is_empty(), "{report:#}");
    assert!(f.iter().all(|f| f["status"] == "unknown"), "{report:#}");
    assert!(report.to_string().contains("too many times"), "{report:#}");
}
