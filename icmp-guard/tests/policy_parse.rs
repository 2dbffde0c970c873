//! KubeArmor policy files and the agent configuration file → icmp-guard's model, and every way
//! those files can be wrong.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use icmp_guard::sources::{
    config::{self, AgentConfig, GuardAttach, GuardConfig, Posture, PostureScope, WorkloadSpec},
    policy::{
        Action, LabelExpression, LabelOperator, Origin, Policy, Rule, Selector, Target,
        kubearmor::{self, PolicyError, PolicyErrors},
    },
};
use icmp_guard_common::Class;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data(rel: &str) -> PathBuf {
    manifest().join("tests/data").join(rel)
}

fn repo(rel: &str) -> PathBuf {
    manifest().join("..").join(rel)
}

fn origin(file: &Path, line: usize) -> Origin {
    Origin {
        file: file.to_path_buf(),
        line,
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn load_one(path: &Path) -> Policy {
    let loaded = kubearmor::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.set.policies.len(), 1, "{:#?}", loaded.set);
    loaded.set.policies.into_iter().next().unwrap()
}

const BAD: &str = "bad.yaml";

/// Every error of an inline policy text, which must be invalid.
fn errors(text: &str) -> Vec<PolicyError> {
    match kubearmor::parse_str(text, Path::new(BAD)) {
        Ok(l) => panic!("expected errors, parsed {:#?}", l.set),
        Err(PolicyErrors(e)) => e,
    }
}

/// The one error of an inline policy text.
fn only_error(text: &str) -> PolicyError {
    let mut e = errors(text);
    assert_eq!(
        e.len(),
        1,
        "expected one error, got:\n{}",
        PolicyErrors(e.clone())
    );
    e.remove(0)
}

#[track_caller]
fn assert_error(e: &PolicyError, file: &Path, line: usize, field: &str, reason: &str) {
    assert_eq!(e.origin, origin(file, line), "origin of {e}");
    assert_eq!(e.field, field, "field of {e}");
    assert!(
        e.reason.contains(reason),
        "reason of {e}\n  does not contain: {reason}"
    );
}

#[track_caller]
fn assert_bad(text: &str, line: usize, field: &str, reason: &str) {
    assert_error(&only_error(text), Path::new(BAD), line, field, reason);
}

// ---------------------------------------------------------------------------------------------
// Valid policies
// ---------------------------------------------------------------------------------------------

#[test]
fn seed_policy_parses_to_exactly_the_expected_policy() {
    let file = repo("policies/kubearmor/restrict-scanning-tools.yaml");
    let loaded = kubearmor::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    let rule = |protocol: &str, class: Class, line: usize| Rule {
        classes: vec![class],
        protocol: protocol.into(),
        sources: vec![PathBuf::from("/usr/bin/ping")],
        action: Action::Allow,
        severity: Some(4),
        tags: vec![],
        message: Some("Scanning tool has been detected".into()),
        origin: origin(&file, line),
    };
    let expected = Policy {
        name: "restrict-scanning-tools".into(),
        namespace: Some("default".into()),
        target: Target::Workloads(Selector {
            match_labels: labels(&[("app", "nginx")]),
            match_expressions: vec![],
        }),
        rules: vec![rule("icmp", Class::Icmp, 13), rule("udp", Class::Udp, 16)],
        origin: origin(&file, 1),
    };
    assert_eq!(loaded.set.policies, vec![expected]);
}

#[test]
fn repository_policy_examples_all_load() {
    for (dir, expected) in [
        ("policies/kubearmor", "restrict-scanning-tools"),
        ("policies/examples/kubearmor", "block-packet-forging"),
        ("policies/examples/kubearmor", "host-allow-ping"),
    ] {
        let loaded = kubearmor::load(&repo(dir)).unwrap_or_else(|e| panic!("{e}"));
        assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
        let names: Vec<&str> = loaded
            .set
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert!(names.contains(&expected), "{expected} not in {names:?}");
        assert!(loaded.set.policies.iter().all(|p| !p.rules.is_empty()));
    }
}

#[test]
fn inheritance_rule_over_network_over_spec() {
    let file = data("policies/inheritance.yaml");
    let p = load_one(&file);
    assert_eq!(p.namespace.as_deref(), Some("web"));
    assert_eq!(
        p.target,
        Target::Workloads(Selector {
            match_labels: labels(&[("app", "shop"), ("tier", "frontend")]),
            match_expressions: vec![],
        })
    );
    let net_tags = strings(&["net-tag-1", "net-tag-2"]);
    assert_eq!(
        p.rules,
        vec![
            // Nothing on the rule: severity, tags, message from spec.network, action from spec.
            Rule {
                classes: vec![Class::Tcp],
                protocol: "tcp".into(),
                sources: vec![],
                action: Action::Audit,
                severity: Some(6),
                tags: net_tags.clone(),
                message: Some("from network".into()),
                origin: origin(&file, 20),
            },
            // Everything on the rule.
            Rule {
                classes: vec![Class::Udp],
                protocol: "udp".into(),
                sources: vec![],
                action: Action::Block,
                severity: Some(9),
                tags: strings(&["rule-tag"]),
                message: Some("from rule".into()),
                origin: origin(&file, 21),
            },
            Rule {
                classes: vec![Class::Icmp],
                protocol: "icmp".into(),
                sources: vec![PathBuf::from("/usr/bin/ping"), PathBuf::from("/bin/ping")],
                action: Action::Allow,
                severity: Some(6),
                tags: net_tags,
                message: Some("from network".into()),
                origin: origin(&file, 26),
            },
        ]
    );
}

#[test]
fn inheritance_straight_from_spec_when_network_sets_nothing() {
    let file = data("policies/spec-only-inheritance.yaml");
    let p = load_one(&file);
    assert_eq!(p.namespace.as_deref(), Some("default"), "kubectl's default");
    assert_eq!(p.target, Target::Workloads(Selector::default()));
    assert_eq!(
        p.rules,
        vec![Rule {
            classes: vec![Class::Raw],
            protocol: "raw".into(),
            sources: vec![],
            action: Action::Audit,
            severity: Some(3),
            tags: strings(&["a", "b"]),
            message: Some("spec message".into()),
            origin: origin(&file, 13),
        }]
    );
}

#[test]
fn empty_action_means_block() {
    let p = load_one(&data("policies/empty-action.yaml"));
    let actions: Vec<(&str, Action)> = p
        .rules
        .iter()
        .map(|r| (r.protocol.as_str(), r.action))
        .collect();
    assert_eq!(
        actions,
        vec![("icmp", Action::Block), ("udp", Action::Block)]
    );
    assert!(
        p.rules
            .iter()
            .all(|r| r.severity.is_none() && r.message.is_none() && r.tags.is_empty())
    );
}

#[test]
fn comma_separated_protocols_expand_and_names_are_case_insensitive() {
    let file = data("policies/comma-and-case.yaml");
    let loaded = kubearmor::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:#?}", loaded.warnings);
    let p = &loaded.set.policies[0];
    let got: Vec<(&str, Vec<Class>, Vec<PathBuf>, usize)> = p
        .rules
        .iter()
        .map(|r| {
            (
                r.protocol.as_str(),
                r.classes.clone(),
                r.sources.clone(),
                r.origin.line,
            )
        })
        .collect();
    let nginx = vec![PathBuf::from("/usr/sbin/nginx")];
    assert_eq!(
        got,
        vec![
            ("TCP", vec![Class::Tcp], nginx.clone(), 8),
            ("udp", vec![Class::Udp], nginx.clone(), 8),
            ("ICMPv6", vec![Class::Icmpv6], nginx, 8),
            ("Raw", vec![Class::Raw], vec![], 11),
            ("ALL", Class::ALL_MANAGED.to_vec(), vec![], 12),
        ]
    );
    assert!(p.rules.iter().all(|r| r.action == Action::Block));
}

#[test]
fn comma_in_a_later_item_only_is_expanded_with_a_warning() {
    // KubeArmor expands commas only when the first item has one.
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: later-comma
spec:
  network:
    matchProtocols:
    - protocol: icmp
    - protocol: tcp,udp
";
    let loaded = kubearmor::parse_str(text, Path::new("w.yaml")).unwrap();
    let protos: Vec<&str> = loaded.set.policies[0]
        .rules
        .iter()
        .map(|r| r.protocol.as_str())
        .collect();
    assert_eq!(protos, vec!["icmp", "tcp", "udp"]);
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    let w = &loaded.warnings[0];
    assert_eq!(w.origin, origin(Path::new("w.yaml"), 9));
    assert_eq!(w.field, "spec.network.matchProtocols[1].protocol");
    assert!(w.message.contains("only when the first"), "{}", w.message);
}

#[test]
fn host_policy_uses_node_selector_and_ignores_namespace_with_a_warning() {
    let file = data("policies/host.yaml");
    let loaded = kubearmor::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        loaded.set.policies,
        vec![Policy {
            name: "host-ping-only".into(),
            namespace: None,
            target: Target::Host {
                node_selector: labels(&[("kubernetes.io/hostname", "node-1"), ("role", "edge")]),
            },
            rules: vec![Rule {
                classes: vec![Class::Icmp],
                protocol: "icmp".into(),
                sources: vec![PathBuf::from("/usr/bin/ping")],
                action: Action::Allow,
                severity: Some(7),
                tags: vec![],
                message: None,
                origin: origin(&file, 14),
            }],
            origin: origin(&file, 1),
        }]
    );
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    assert_eq!(loaded.warnings[0].origin, origin(&file, 5));
    assert_eq!(loaded.warnings[0].field, "metadata.namespace");
    assert!(loaded.warnings[0].message.contains("cluster-scoped"));
}

#[test]
fn match_expressions_keep_operator_and_raw_values() {
    let p = load_one(&data("policies/match-expressions.yaml"));
    assert_eq!(p.namespace.as_deref(), Some("shop"));
    assert_eq!(
        p.target,
        Target::Workloads(Selector {
            match_labels: labels(&[("app", "shop")]),
            match_expressions: vec![
                LabelExpression {
                    operator: LabelOperator::In,
                    values: strings(&["tier=frontend", "tier=edge"]),
                },
                LabelExpression {
                    operator: LabelOperator::NotIn,
                    values: strings(&["debug=true"]),
                },
            ],
        })
    );
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].classes, vec![Class::Packet]);
}

#[test]
fn multi_document_file_skips_empty_documents() {
    let file = data("policies/multi-doc.yaml");
    let loaded = kubearmor::load(&file).unwrap_or_else(|e| panic!("{e}"));
    /// (name, namespace, policy line, first protocol, its action, its line)
    type Summary<'a> = (&'a str, Option<&'a str>, usize, &'a str, Action, usize);
    let got: Vec<Summary<'_>> = loaded
        .set
        .policies
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.namespace.as_deref(),
                p.origin.line,
                p.rules[0].protocol.as_str(),
                p.rules[0].action,
                p.rules[0].origin.line,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("first", Some("default"), 3, "icmp", Action::Block, 10),
            ("second", Some("other"), 13, "icmpv6", Action::Audit, 21),
        ]
    );
}

#[test]
fn kubectl_list_output_is_read_item_by_item() {
    let file = data("policies/list.yaml");
    let p = load_one(&file);
    assert_eq!(p.name, "from-list");
    assert_eq!(p.origin, origin(&file, 7));
    assert_eq!(p.rules[0].origin, origin(&file, 18));
    assert_eq!(p.rules[0].classes, vec![Class::Icmp]);
}

#[test]
fn unsupported_sections_load_with_one_warning_each() {
    let file = data("policies/unsupported.yaml");
    let loaded = kubearmor::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.set.policies.len(), 1);
    assert!(loaded.set.policies[0].rules.is_empty());
    let got: Vec<(usize, &str)> = loaded
        .warnings
        .iter()
        .map(|w| (w.origin.line, w.field.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (9, "spec.process"),
            (12, "spec.file"),
            (16, "spec.capabilities"),
            (6, "spec.network"),
        ]
    );
    assert!(
        loaded.warnings[0]
            .message
            .contains("does not enforce spec.process")
    );
    assert!(loaded.warnings[3].message.contains("no spec.network"));
}

#[test]
fn unknown_spec_section_is_a_warning_with_a_suggestion() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: typo
spec:
  netwrok:
    matchProtocols:
    - protocol: icmp
  network:
    matchProtocols:
    - protocol: udp
";
    let loaded = kubearmor::parse_str(text, Path::new("t.yaml")).unwrap();
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    assert_eq!(loaded.warnings[0].field, "spec.netwrok");
    assert_eq!(loaded.warnings[0].origin.line, 6);
    assert!(
        loaded.warnings[0]
            .message
            .contains("did you mean `network`")
    );
}

#[test]
fn directory_loads_recursively_in_path_order_skipping_hidden_and_other_files() {
    let dir = data("policies/dir");
    let loaded = kubearmor::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(&str, PathBuf)> = loaded
        .set
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p.origin.file.clone()))
        .collect();
    // .hidden/alpha.yaml would be a duplicate of a/alpha.yaml; readme.txt is not YAML.
    assert_eq!(
        got,
        vec![
            ("alpha", dir.join("a/alpha.yaml")),
            ("beta", dir.join("b/beta.yml")),
        ]
    );
}

#[test]
fn protocol_class_table() {
    let expected: [(&str, &[Class]); 13] = [
        ("tcp", &[Class::Tcp]),
        ("udp", &[Class::Udp]),
        ("sctp", &[Class::Sctp]),
        ("icmp", &[Class::Icmp]),
        ("icmpv6", &[Class::Icmpv6]),
        ("raw", &[Class::Raw]),
        ("packet", &[Class::Packet]),
        ("stream", &[Class::Tcp, Class::Sctp]),
        ("dgram", &[Class::Udp]),
        ("seqpacket", &[Class::Sctp]),
        ("dccp", &[Class::Other]),
        ("rdm", &[Class::Other]),
        ("all", &Class::ALL_MANAGED),
    ];
    for (name, classes) in expected {
        assert_eq!(
            kubearmor::protocol_classes(name).as_deref(),
            Some(classes),
            "{name}"
        );
        let upper = name.to_uppercase();
        assert_eq!(
            kubearmor::protocol_classes(&upper).as_deref(),
            Some(classes),
            "{upper}"
        );
    }
    assert_eq!(
        kubearmor::protocol_classes("IcMpV6"),
        Some(vec![Class::Icmpv6])
    );
    assert_eq!(kubearmor::protocol_classes("unix"), None);
    assert_eq!(kubearmor::protocol_classes("tcp,udp"), None);
}

// ---------------------------------------------------------------------------------------------
// Invalid policies: each names its file, line, field and reason
// ---------------------------------------------------------------------------------------------

/// A valid policy with `rule` as its only matchProtocols item, starting on line 8.
fn with_rule(rule: &str) -> String {
    format!(
        "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  network:
    matchProtocols:
{rule}"
    )
}

#[test]
fn bad_api_version() {
    let text = "\
apiVersion: security.kubearmor.com/v2
kind: KubeArmorPolicy
metadata:
  name: p
";
    assert_bad(
        text,
        1,
        "apiVersion",
        "`security.kubearmor.com/v2` is not supported; use security.kubearmor.com/v1",
    );
}

#[test]
fn unknown_kind() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: NetworkPolicy
metadata:
  name: p
";
    assert_bad(text, 2, "kind", "unknown kind `NetworkPolicy`");
}

#[test]
fn missing_kind() {
    let text = "\
apiVersion: security.kubearmor.com/v1
metadata:
  name: p
";
    assert_bad(
        text,
        1,
        "kind",
        "is required; set it to KubeArmorPolicy, KubeArmorHostPolicy or KubeArmorNetworkPolicy",
    );
}

#[test]
fn missing_name() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  namespace: default
spec:
  network:
    matchProtocols:
    - protocol: icmp
";
    assert_bad(text, 4, "metadata.name", "is required");
}

#[test]
fn bad_protocol_name() {
    let text = with_rule("    - protocol: icmp\n    - protocol: tcp,icmp4\n");
    assert_bad(
        &text,
        9,
        "spec.network.matchProtocols[1].protocol",
        "unknown protocol `icmp4`; use one of tcp, udp",
    );
}

#[test]
fn empty_name_between_commas() {
    let text = with_rule("    - protocol: tcp,,udp\n");
    assert_bad(
        &text,
        8,
        "spec.network.matchProtocols[0].protocol",
        "empty name between commas",
    );
}

#[test]
fn missing_protocol() {
    let text = with_rule("    - action: Block\n");
    assert_bad(
        &text,
        8,
        "spec.network.matchProtocols[0].protocol",
        "is required",
    );
}

#[test]
fn relative_source_path() {
    let text = with_rule("    - protocol: icmp\n      fromSource:\n      - path: usr/bin/ping\n");
    assert_bad(
        &text,
        10,
        "spec.network.matchProtocols[0].fromSource[0].path",
        "not an absolute path; use the executable's full path as seen inside the container, such as /usr/bin/ping",
    );
}

#[test]
fn source_path_with_trailing_slash() {
    let text = with_rule(
        "    - protocol: icmp\n      fromSource:\n      - path: /usr/bin/ping\n      - path: /usr/bin/\n",
    );
    assert_bad(
        &text,
        11,
        "spec.network.matchProtocols[0].fromSource[1].path",
        "ends with `/`",
    );
}

#[test]
fn source_path_longer_than_200_characters() {
    let ok = format!("/{}", "a".repeat(199));
    let long = format!("/{}", "a".repeat(200));
    let text = with_rule(&format!(
        "    - protocol: icmp\n      fromSource:\n      - path: {ok}\n"
    ));
    assert!(
        kubearmor::parse_str(&text, Path::new(BAD)).is_ok(),
        "200 characters is allowed"
    );
    let text = with_rule(&format!(
        "    - protocol: icmp\n      fromSource:\n      - path: {long}\n"
    ));
    assert_bad(
        &text,
        10,
        "spec.network.matchProtocols[0].fromSource[0].path",
        "is 201 characters long; KubeArmor allows at most 200",
    );
}

#[test]
fn dir_in_a_network_rule_from_source() {
    let text = with_rule(
        "    - protocol: icmp\n      fromSource:\n      - dir: /usr/bin/\n        path: /usr/bin/ping\n",
    );
    assert_bad(
        &text,
        10,
        "spec.network.matchProtocols[0].fromSource[0].dir",
        "`dir` is not allowed in a network rule's fromSource",
    );
}

#[test]
fn severity_zero() {
    let text = with_rule("    - protocol: icmp\n      severity: 0\n");
    assert_bad(
        &text,
        9,
        "spec.network.matchProtocols[0].severity",
        "must be between 1 and 10, found 0",
    );
}

#[test]
fn severity_eleven() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  severity: 11
  network:
    matchProtocols:
    - protocol: icmp
";
    assert_bad(
        text,
        6,
        "spec.severity",
        "must be between 1 and 10, found 11",
    );
}

#[test]
fn severity_as_a_string() {
    let text = with_rule("    - protocol: icmp\n      severity: \"4\"\n");
    assert_bad(
        &text,
        9,
        "spec.network.matchProtocols[0].severity",
        "must be a whole number",
    );
}

#[test]
fn bad_action() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  network:
    action: Deny
    matchProtocols:
    - protocol: icmp
";
    assert_bad(
        text,
        7,
        "spec.network.action",
        "`Deny` is not an action; use exactly Allow, Audit or Block",
    );
}

#[test]
fn lower_case_action_is_not_a_crd_value() {
    let text = with_rule("    - protocol: icmp\n      action: allow\n");
    assert_bad(
        &text,
        9,
        "spec.network.matchProtocols[0].action",
        "KubeArmor's CRD accepts only these spellings",
    );
}

#[test]
fn host_rule_without_from_source() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorHostPolicy
metadata:
  name: h
spec:
  nodeSelector:
    matchLabels:
      role: edge
  network:
    matchProtocols:
    - protocol: icmp
      fromSource:
      - path: /usr/bin/ping
    - protocol: raw
";
    assert_bad(
        text,
        14,
        "spec.network.matchProtocols[1].fromSource",
        "is required in a KubeArmorHostPolicy network rule",
    );
}

#[test]
fn host_policy_without_node_selector() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorHostPolicy
metadata:
  name: h
spec:
  network:
    matchProtocols:
    - protocol: icmp
      fromSource:
      - path: /usr/bin/ping
";
    assert_bad(
        text,
        6,
        "spec.nodeSelector",
        "is required; add spec.nodeSelector.matchLabels",
    );
}

#[test]
fn host_policy_with_empty_node_labels() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorHostPolicy
metadata:
  name: h
spec:
  nodeSelector:
    matchLabels: {}
  network:
    matchProtocols:
    - protocol: icmp
      fromSource:
      - path: /usr/bin/ping
";
    assert_bad(
        text,
        7,
        "spec.nodeSelector.matchLabels",
        "applies a host policy with no node labels to no node",
    );
}

#[test]
fn match_expression_key_not_label() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  selector:
    matchExpressions:
    - key: namespace
      operator: In
      values: [default]
";
    assert_bad(
        text,
        8,
        "spec.selector.matchExpressions[0].key",
        "`namespace` is only accepted by KubeArmorClusterPolicy",
    );
}

#[test]
fn match_expression_bad_operator() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  selector:
    matchExpressions:
    - key: label
      operator: in
      values: [app=nginx]
";
    assert_bad(
        text,
        9,
        "spec.selector.matchExpressions[0].operator",
        "must be In or NotIn (exactly, as in KubeArmor's CRD), found `in`",
    );
}

#[test]
fn unknown_key_in_a_rule() {
    let text = with_rule("    - protocol: icmp\n      fromSorce:\n      - path: /usr/bin/ping\n");
    assert_bad(
        &text,
        9,
        "spec.network.matchProtocols[0].fromSorce",
        "unknown key `fromSorce` (did you mean `fromSource`?)",
    );
}

#[test]
fn unknown_key_in_network() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  network:
    matchProtocol:
    - protocol: icmp
";
    let e = errors(text);
    assert_error(
        &e[0],
        Path::new(BAD),
        7,
        "spec.network.matchProtocol",
        "did you mean `matchProtocols`",
    );
    assert_eq!(e.len(), 1, "{}", PolicyErrors(e.clone()));
}

#[test]
fn unknown_key_in_selector() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  selector:
    matchLabel:
      app: nginx
";
    assert_bad(
        text,
        7,
        "spec.selector.matchLabel",
        "did you mean `matchLabels`",
    );
}

#[test]
fn label_value_that_is_not_a_string() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  selector:
    matchLabels:
      canary: true
";
    assert_bad(
        text,
        8,
        "spec.selector.matchLabels.canary",
        "must be a string, found the boolean true; put it in quotes",
    );
}

#[test]
fn invalid_namespace() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
  namespace: Web_Shop
";
    assert_bad(
        text,
        5,
        "metadata.namespace",
        "`Web_Shop` is not a valid namespace",
    );
}

#[test]
fn yaml_syntax_error_reports_its_line() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  network:
    matchProtocols:
    - protocol: icmp
     fromSource: [/usr/bin/ping
";
    let e = only_error(text);
    assert_eq!(e.origin.file, PathBuf::from(BAD));
    assert_eq!(e.origin.line, 9, "{e}");
    assert_eq!(e.field, "");
    assert!(e.reason.starts_with("invalid YAML"), "{e}");
}

#[test]
fn duplicate_key_in_a_mapping_is_a_yaml_error() {
    let text = with_rule("    - protocol: icmp\n      action: Allow\n      action: Block\n");
    let e = only_error(&text);
    assert_eq!(e.origin.line, 10, "{e}");
    assert!(e.reason.contains("duplicated key"), "{e}");
}

#[test]
fn every_error_of_every_document_is_reported() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: one
spec:
  severity: 0
  network:
    matchProtocols:
    - protocol: icmp
      fromSource:
      - path: ping
---
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: two
spec:
  network:
    matchProtocols:
    - protocol: smtp
";
    let e = errors(text);
    let got: Vec<(usize, &str)> = e
        .iter()
        .map(|e| (e.origin.line, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (6, "spec.severity"),
            (11, "spec.network.matchProtocols[0].fromSource[0].path"),
            (20, "spec.network.matchProtocols[0].protocol"),
        ]
    );
}

#[test]
fn errors_display_one_line_each_as_file_line_field_reason() {
    let text = "\
apiVersion: v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  action: deny
";
    let err = kubearmor::parse_str(text, Path::new("p.yaml")).unwrap_err();
    let shown = err.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "{shown}");
    assert!(
        lines[0].starts_with("p.yaml:1: apiVersion: `v1` is not supported"),
        "{shown}"
    );
    assert!(
        lines[1].starts_with("p.yaml:6: spec.action: `deny` is not an action"),
        "{shown}"
    );
    // Usable as a boxed error.
    let boxed: Box<dyn std::error::Error> = Box::new(err);
    assert_eq!(boxed.to_string(), shown);
}

#[test]
fn duplicate_policy_across_two_files_names_both() {
    let dir = data("policies/dup");
    let err = kubearmor::load(&dir).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    let first = dir.join("one.yaml");
    assert_error(
        &err.0[0],
        &dir.join("two.yaml"),
        2,
        "metadata.name",
        &format!(
            "duplicate KubeArmorPolicy default/same: already defined at {}:1",
            first.display()
        ),
    );
}

#[test]
fn one_bad_file_among_good_ones_applies_nothing() {
    let dir = data("policies/mixed");
    let err = kubearmor::load(&dir).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    assert_error(
        &err.0[0],
        &dir.join("bad.yaml"),
        10,
        "spec.action",
        "`allow` is not an action",
    );
    // The good file alone is fine: the failure is the bad file's, and it withholds everything.
    assert_eq!(load_one(&dir.join("good.yaml")).name, "good");
}

#[test]
fn missing_path_is_an_error() {
    let missing = data("policies/does-not-exist");
    let err = kubearmor::load(&missing).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err.0[0].origin, origin(&missing, 0));
    assert!(err.0[0].reason.contains("cannot read"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Agent configuration
// ---------------------------------------------------------------------------------------------

fn config_errors(text: &str) -> Vec<PolicyError> {
    match config::parse_str(text, Path::new("agent.yaml")) {
        Ok(c) => panic!("expected errors, parsed {c:#?}"),
        Err(PolicyErrors(e)) => e,
    }
}

#[track_caller]
fn assert_config_bad(text: &str, line: usize, field: &str, reason: &str) {
    let e = config_errors(text);
    assert_eq!(e.len(), 1, "{}", PolicyErrors(e.clone()));
    assert_error(&e[0], Path::new("agent.yaml"), line, field, reason);
}

#[test]
fn config_defaults() {
    let d = AgentConfig::default();
    assert_eq!(d.cluster_name, "default");
    assert_eq!(d.host_name, None);
    assert!(d.node_labels.is_empty());
    assert_eq!(d.default_posture, Posture::Block);
    assert_eq!(d.host_default_posture, Posture::Block);
    assert!(d.namespace_postures.is_empty());
    assert_eq!(d.posture_scope, PostureScope::Protocol);
    assert_eq!(d.alerts_per_second, 10);
    assert!(d.workloads.is_empty());

    // An empty file (or one with only comments) is the defaults too.
    let parsed = config::parse_str("# nothing\n", Path::new("empty.yaml")).unwrap();
    assert_eq!(
        parsed,
        AgentConfig {
            origin: origin(Path::new("empty.yaml"), 0),
            ..AgentConfig::default()
        }
    );
}

#[test]
fn config_example_parses() {
    let file = repo("policies/agent-config.example.yaml");
    let c = config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&file).unwrap();
    let nginx_line = text
        .lines()
        .position(|l| l.contains("- name: nginx"))
        .unwrap()
        + 1;
    assert_eq!(
        c,
        AgentConfig {
            cluster_name: "default".into(),
            host_name: None,
            node_labels: labels(&[("role", "edge")]),
            default_posture: Posture::Block,
            host_default_posture: Posture::Block,
            namespace_postures: BTreeMap::from([("payments".to_string(), Posture::Audit)]),
            posture_scope: PostureScope::Protocol,
            alerts_per_second: 10,
            workloads: vec![WorkloadSpec {
                name: "nginx".into(),
                cgroup: PathBuf::from("system.slice/nginx.service"),
                namespace: "default".into(),
                labels: labels(&[("app", "nginx")]),
                pod: Some("nginx-0".into()),
                container: Some("nginx".into()),
                origin: origin(&file, nginx_line),
            }],
            guard: GuardConfig::default(),
            origin: c.origin.clone(),
        }
    );
    assert_eq!(c.origin.file, file);
    assert!(c.origin.line > 0);
}

#[test]
fn config_with_every_key_set() {
    let file = data("config/full.yaml");
    let c = config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c,
        AgentConfig {
            cluster_name: "prod-eu".into(),
            host_name: Some("node-7".into()),
            node_labels: labels(&[("role", "edge"), ("zone", "1")]),
            default_posture: Posture::Audit,
            host_default_posture: Posture::Audit,
            namespace_postures: BTreeMap::from([
                ("dev".to_string(), Posture::Audit),
                ("payments".to_string(), Posture::Block),
            ]),
            posture_scope: PostureScope::Workload,
            alerts_per_second: 0,
            workloads: vec![
                WorkloadSpec {
                    name: "nginx".into(),
                    cgroup: PathBuf::from("system.slice/nginx.service"),
                    namespace: "default".into(),
                    labels: labels(&[("app", "nginx")]),
                    pod: Some("nginx-0".into()),
                    container: Some("nginx".into()),
                    origin: origin(&file, 17),
                },
                WorkloadSpec {
                    name: "shop".into(),
                    cgroup: PathBuf::from("/sys/fs/cgroup/kubepods.slice/shop"),
                    namespace: "shop".into(),
                    labels: BTreeMap::new(),
                    pod: None,
                    container: None,
                    origin: origin(&file, 23),
                },
            ],
            guard: GuardConfig {
                posture: Posture::Audit,
                rate_per_second: 50,
                burst: 5,
                alerts_per_second: 0,
                attach: GuardAttach::Tc,
            },
            origin: origin(&file, 2),
        }
    );
    assert_eq!(Posture::Audit.action(), Action::Audit);
    assert_eq!(Posture::Block.action(), Action::Block);
}

#[test]
fn config_minimal_file_keeps_defaults() {
    let file = data("config/minimal.yaml");
    let c = config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.default_posture, Posture::Block);
    assert_eq!(c.alerts_per_second, 10);
    assert_eq!(c.workloads.len(), 1);
    assert_eq!(c.workloads[0].name, "ping-box");
    assert_eq!(c.workloads[0].namespace, "default");
    assert_eq!(c.workloads[0].cgroup, PathBuf::from("icmp-guard/ping-box"));
    assert_eq!(c.workloads[0].origin, origin(&file, 3));
}

#[test]
fn config_unknown_key() {
    assert_config_bad(
        "clusterName: a\ndefaultNetworkPostur: audit\n",
        2,
        "defaultNetworkPostur",
        "unknown key `defaultNetworkPostur` (did you mean `defaultNetworkPosture`?)",
    );
}

#[test]
fn config_bad_posture() {
    assert_config_bad(
        "hostDefaultNetworkPosture: Block\n",
        1,
        "hostDefaultNetworkPosture",
        "must be block or audit (lower case, as in KubeArmor), found `Block`",
    );
}

#[test]
fn config_allow_posture_is_refused_with_the_reason() {
    assert_config_bad(
        "defaultNetworkPosture: allow\n",
        1,
        "defaultNetworkPosture",
        "an `allow` posture would make Allow rules mean nothing",
    );
}

#[test]
fn config_bad_posture_scope() {
    assert_config_bad(
        "postureScope: pod\n",
        1,
        "postureScope",
        "must be protocol or workload, found `pod`",
    );
}

#[test]
fn config_negative_alert_rate() {
    assert_config_bad(
        "alertsPerSecond: -1\n",
        1,
        "alertsPerSecond",
        "must be between 0 (unlimited)",
    );
}

#[test]
fn config_alert_rate_as_text() {
    assert_config_bad(
        "alertsPerSecond: ten\n",
        1,
        "alertsPerSecond",
        "must be a whole number",
    );
}

#[test]
fn config_namespace_posture_must_be_a_mapping() {
    assert_config_bad(
        "namespaces:\n  payments: audit\n",
        2,
        "namespaces.payments",
        "must be a mapping",
    );
}

#[test]
fn config_namespace_posture_unknown_key() {
    assert_config_bad(
        "namespaces:\n  payments:\n    posture: audit\n    networkPosture: audit\n",
        3,
        "namespaces.payments.posture",
        "unknown key `posture`",
    );
}

#[test]
fn config_label_must_be_a_string() {
    assert_config_bad(
        "workloads:\n  - name: a\n    cgroup: a\n    labels:\n      canary: true\n",
        5,
        "workloads[0].labels.canary",
        "must be a string, found the boolean true; put it in quotes",
    );
}

#[test]
fn config_node_label_must_be_a_string() {
    assert_config_bad(
        "nodeLabels:\n  rack: 12\n",
        2,
        "nodeLabels.rack",
        "must be a string, found the number 12",
    );
}

#[test]
fn config_duplicate_workload_names() {
    let text = "\
workloads:
  - name: web
    cgroup: a
  - name: web
    cgroup: b
";
    assert_config_bad(
        text,
        4,
        "workloads[1].name",
        "workload name `web` is already used at agent.yaml:2",
    );
}

#[test]
fn config_duplicate_cgroups() {
    let text = "\
workloads:
  - name: one
    cgroup: kubepods/a
  - name: two
    cgroup: ./kubepods//a/
";
    assert_config_bad(
        text,
        4,
        "workloads[1].cgroup",
        "is already workload `one` at agent.yaml:2",
    );
}

#[test]
fn config_workload_without_cgroup() {
    assert_config_bad(
        "workloads:\n  - name: web\n",
        2,
        "workloads[0].cgroup",
        "is required; give its cgroup",
    );
}

#[test]
fn config_cgroup_with_parent_component() {
    assert_config_bad(
        "workloads:\n  - name: web\n    cgroup: a/../../etc\n",
        3,
        "workloads[0].cgroup",
        "contains `..`",
    );
}

#[test]
fn config_cgroup_root_is_refused() {
    assert_config_bad(
        "workloads:\n  - name: web\n    cgroup: /\n",
        3,
        "workloads[0].cgroup",
        "names the root cgroup",
    );
}

#[test]
fn config_unknown_key_in_workload() {
    assert_config_bad(
        "workloads:\n  - name: web\n    cgroup: a\n    label:\n      app: web\n",
        4,
        "workloads[0].label",
        "did you mean `labels`",
    );
}

#[test]
fn config_two_documents() {
    assert_config_bad(
        "clusterName: a\n---\nclusterName: b\n",
        3,
        "",
        "the configuration is one YAML document",
    );
}

#[test]
fn config_syntax_error() {
    let e = config_errors("workloads:\n  - name: a\n   cgroup: b\n");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].origin.line, 3, "{}", e[0]);
    assert!(e[0].reason.starts_with("invalid YAML"), "{}", e[0]);
}

#[test]
fn config_all_errors_at_once() {
    let text = "\
clusterName: 5
postureScope: all
workloads:
  - name: a
";
    let e = config_errors(text);
    let got: Vec<(usize, &str)> = e
        .iter()
        .map(|e| (e.origin.line, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "clusterName"),
            (2, "postureScope"),
            (4, "workloads[0].cgroup")
        ]
    );
}

#[test]
fn config_missing_file() {
    let missing = data("config/none.yaml");
    let err = config::load(&missing).unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err.0[0].origin, origin(&missing, 0));
    assert!(
        err.0[0]
            .reason
            .contains("cannot read the configuration file"),
        "{err}"
    );
}

#[test]
fn policy_without_spec_loads_with_a_warning() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: empty
";
    let loaded = kubearmor::parse_str(text, Path::new("e.yaml")).unwrap();
    assert_eq!(loaded.set.policies.len(), 1);
    assert!(loaded.set.policies[0].rules.is_empty());
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
    assert_eq!(loaded.warnings[0].field, "spec");
    assert_eq!(loaded.warnings[0].origin, origin(Path::new("e.yaml"), 1));
}

#[test]
fn cluster_policy_is_refused_with_what_to_do() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorClusterPolicy
metadata:
  name: c
";
    assert_bad(text, 2, "kind", "write one KubeArmorPolicy per namespace");
}

#[test]
fn node_selector_in_a_workload_policy() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  nodeSelector:
    matchLabels:
      role: edge
  network:
    matchProtocols:
    - protocol: icmp
";
    assert_bad(
        text,
        6,
        "spec.nodeSelector",
        "belongs to KubeArmorHostPolicy",
    );
}

#[test]
fn document_that_is_not_a_mapping() {
    assert_bad("- a\n- b\n", 1, "", "a policy must be a mapping");
}

#[test]
fn pts_false_and_label_values_without_equals_are_warnings() {
    let text = "\
apiVersion: security.kubearmor.com/v1
kind: KubeArmorPolicy
metadata:
  name: p
spec:
  selector:
    matchExpressions:
    - key: label
      operator: In
      values: [nginx]
  network:
    matchProtocols:
    - protocol: icmp
      pts: false
";
    let loaded = kubearmor::parse_str(text, Path::new("w.yaml")).unwrap();
    let got: Vec<(usize, &str)> = loaded
        .warnings
        .iter()
        .map(|w| (w.origin.line, w.field.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (10, "spec.selector.matchExpressions[0].values[0]"),
            (14, "spec.network.matchProtocols[0].pts"),
        ]
    );
    assert!(loaded.warnings[0].message.contains("app=nginx"));
    assert_eq!(loaded.set.policies[0].rules.len(), 1);
}

/// An empty or comment-only policy file is what a write in progress leaves behind; applying it
/// would drop every rule, so it is refused like any broken file (the agent keeps the old policy).
#[test]
fn a_policy_file_without_any_policy_is_refused() {
    for text in ["", "# being edited\n", "---\n", "\n\n---\n# x\n---\n"] {
        let e = kubearmor::parse_str(text, Path::new("p.yaml")).unwrap_err();
        assert_eq!(e.len(), 1, "{text:?}: {e}");
        let e = &e.0[0];
        assert_eq!(e.reason, kubearmor::NO_POLICY, "{text:?}");
        assert_eq!(e.origin.line, 0);
        assert!(
            e.to_string()
                .starts_with("p.yaml: the file holds no policy"),
            "{e}"
        );
    }
    // A file with a policy and empty documents around it is still fine.
    let one = std::fs::read_to_string(data("policies/multi-doc.yaml")).unwrap();
    assert!(kubearmor::parse_str(&format!("---\n{one}---\n"), Path::new("p.yaml")).is_ok());
}
