//! Structure-aware mutation for the fuzz targets, on top of libFuzzer's byte mutations.
//!
//! Byte flips rarely get a YAML policy past the parser into the code that reads its fields, so
//! half of the mutations work on the structure of the input instead:
//! - a parsed tree (JSON, or YAML read with saphyr): replace a value with an interesting one,
//!   delete an entry, copy a subtree over another, wrap a value in a list or a mapping, add a key
//!   the readers know; then print it again as JSON or YAML;
//! - lines (YAML and HCL alike): duplicate, delete, swap or re-indent lines, splice a line from
//!   the dictionary, swap one token for another.
//!
//! The rest go to libFuzzer's own mutator (`-dict` gives it the same vocabulary). Mutations are
//! deterministic in libFuzzer's seed, so a run can be reproduced.

use saphyr::{LoadableYamlNode, Mapping, Scalar, Yaml, YamlEmitter};

/// What the inputs of a target look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Yaml,
    Json,
    Hcl,
    /// Any of them (format detection).
    Any,
}

/// A small deterministic generator seeded by libFuzzer.
struct Rng(u64);

impl Rng {
    fn new(seed: u32) -> Rng {
        Rng(u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Keys and values the readers look for; spliced into trees and lines.
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "spec",
    "selector",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "nodeSelector",
    "network",
    "matchProtocols",
    "protocol",
    "fromSource",
    "path",
    "action",
    "severity",
    "tags",
    "message",
    "process",
    "file",
    "capabilities",
    "syscalls",
    "items",
    "clusterName",
    "hostName",
    "nodeLabels",
    "defaultNetworkPosture",
    "hostDefaultNetworkPosture",
    "namespaces",
    "networkPosture",
    "postureScope",
    "alertsPerSecond",
    "workloads",
    "cgroup",
    "labels",
    "pod",
    "container",
    "SecurityGroups",
    "SecurityGroupRules",
    "GroupId",
    "GroupName",
    "IpPermissions",
    "IpPermissionsEgress",
    "IpProtocol",
    "FromPort",
    "ToPort",
    "IpRanges",
    "Ipv6Ranges",
    "CidrIp",
    "CidrIpv6",
    "UserIdGroupPairs",
    "PrefixListIds",
    "IsEgress",
    "Description",
    "AWSTemplateFormatVersion",
    "Resources",
    "Parameters",
    "Default",
    "Conditions",
    "Mappings",
    "Type",
    "Properties",
    "SecurityGroupIngress",
    "SecurityGroupEgress",
    "Ref",
    "Fn::If",
    "Fn::Sub",
    "Fn::Join",
    "Fn::Select",
    "Fn::Split",
    "Fn::FindInMap",
    "Fn::GetAtt",
    "Fn::ImportValue",
    "Fn::Equals",
    "Fn::And",
    "Fn::Or",
    "Fn::Not",
    "Condition",
    "format_version",
    "resource_changes",
    "planned_values",
    "root_module",
    "child_modules",
    "resources",
    "change",
    "after",
    "after_unknown",
    "values",
    "address",
    "type",
    "mode",
    "ingress",
    "egress",
    "cidr_blocks",
    "ipv6_cidr_blocks",
    "from_port",
    "to_port",
    "cidr_ipv4",
    "cidr_ipv6",
    "ip_protocol",
    "security_group_id",
];

const VALUES: &[&str] = &[
    "security.kubearmor.com/v1",
    "KubeArmorPolicy",
    "KubeArmorHostPolicy",
    "List",
    "v1",
    "icmp",
    "icmpv6",
    "raw",
    "packet",
    "tcp",
    "udp",
    "all",
    "tcp,udp",
    "icmp,,raw",
    "Allow",
    "Block",
    "Audit",
    "/usr/bin/ping",
    "/",
    "",
    "..",
    "../..",
    "/proc/self/exe",
    "app=nginx",
    "In",
    "NotIn",
    "block",
    "audit",
    "protocol",
    "workload",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/8",
    "1.2.3.4/0",
    "0:0:0:0:0:0:0:0/0",
    "-1",
    "1",
    "58",
    "icmp6",
    "ingress",
    "AWS::EC2::SecurityGroup",
    "AWS::EC2::SecurityGroupIngress",
    "AWS::NoValue",
    "AWS::Region",
    "${AWS::Region}",
    "${Param}",
    "${",
    "Param",
    "aws_security_group",
    "aws_security_group_rule",
    "aws_vpc_security_group_ingress_rule",
    "create",
    "update",
    "delete",
    "managed",
    "\u{0}",
    "\u{feff}",
    "ä",
    "😀",
    "%00",
    "*",
    "!Ref",
];

const NUMBERS: &[i64] = &[
    0,
    1,
    -1,
    2,
    3,
    4,
    7,
    8,
    255,
    256,
    65535,
    65536,
    4294967295,
    4294967296,
    i64::MAX,
    i64::MIN,
];

/// A line added by a line mutation: a key, a list item, or a Terraform line.
const LINES: &[&str] = &[
    "---",
    "- ",
    "  - protocol: icmp",
    "    fromSource:",
    "      - path: /usr/bin/ping",
    "  action: Allow",
    "  network:",
    "    matchProtocols:",
    "kind: List",
    "items:",
    "&a [*a, *a]",
    "x: &a [1, 2]",
    "y: [*a, *a, *a, *a]",
    "<<: *a",
    "!!binary aGVsbG8=",
    "? complex key",
    "resource \"aws_security_group\" \"x\" {",
    "resource \"aws_security_group_rule\" \"r\" {",
    "  ingress {",
    "    protocol    = \"icmp\"",
    "    protocol    = var.p",
    "    cidr_blocks = [\"0.0.0.0/0\"]",
    "    cidr_blocks = local.c",
    "  dynamic \"ingress\" {",
    "    for_each = var.rules",
    "    content {",
    "variable \"p\" { default = \"icmp\" }",
    "locals { c = [local.d, local.d] }",
    "locals { d = [local.c] }",
    "}",
    "{",
    "[",
    "]",
];

/// Mutates `data[..size]` in place (up to `max_size` bytes) and returns the new size.
pub fn mutate(
    data: &mut [u8],
    size: usize,
    max_size: usize,
    seed: u32,
    shape: Shape,
    fallback: impl FnOnce(&mut [u8], usize, usize) -> usize,
) -> usize {
    let mut rng = Rng::new(seed);
    let Ok(text) = std::str::from_utf8(&data[..size]) else {
        return fallback(data, size, max_size);
    };
    let mutated = match rng.below(4) {
        0 if shape != Shape::Hcl => tree(text, &mut rng, shape),
        0 | 1 => Some(lines(text, &mut rng)),
        _ => None,
    };
    match mutated {
        Some(out) if out.len() <= max_size && out.as_bytes() != &data[..size] => {
            data[..out.len()].copy_from_slice(out.as_bytes());
            out.len()
        }
        _ => fallback(data, size, max_size),
    }
}

fn tree(text: &str, rng: &mut Rng, shape: Shape) -> Option<String> {
    let json = shape == Shape::Json || text.trim_start().starts_with(['{', '[']);
    if json {
        let mut v: serde_json::Value = serde_json::from_str(text).ok()?;
        mutate_json(&mut v, rng);
        return serde_json::to_string_pretty(&v).ok();
    }
    if !shallow(text) {
        return None;
    }
    let docs = Yaml::load_from_str(text).ok()?;
    let mut docs: Vec<Yaml<'static>> = docs.into_iter().map(own).collect();
    if docs.is_empty() {
        return None;
    }
    let i = rng.below(docs.len());
    mutate_yaml(&mut docs, i, rng);
    let mut out = String::new();
    for d in &docs {
        let mut chunk = String::new();
        YamlEmitter::new(&mut chunk).dump(d).ok()?;
        out.push_str(&chunk);
        out.push('\n');
    }
    Some(out)
}

/// Whether a YAML text nests at most 64 levels: saphyr's loader recurses once per level, and
/// a stack overflow in the mutator kills libFuzzer before it can save anything. The events are
/// counted without building a tree.
fn shallow(text: &str) -> bool {
    let mut depth = 0usize;
    for event in saphyr_parser::Parser::new_from_str(text) {
        match event {
            Ok((
                saphyr_parser::Event::SequenceStart(..) | saphyr_parser::Event::MappingStart(..),
                _,
            )) => {
                depth += 1;
                if depth > 64 {
                    return false;
                }
            }
            Ok((saphyr_parser::Event::SequenceEnd | saphyr_parser::Event::MappingEnd, _)) => {
                depth = depth.saturating_sub(1);
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    true
}

/// A copy of a YAML tree that borrows nothing from the input.
fn own(y: Yaml<'_>) -> Yaml<'static> {
    match y {
        Yaml::Value(s) => Yaml::Value(match s {
            Scalar::Null => Scalar::Null,
            Scalar::Boolean(b) => Scalar::Boolean(b),
            Scalar::Integer(i) => Scalar::Integer(i),
            Scalar::FloatingPoint(f) => Scalar::FloatingPoint(f),
            Scalar::String(s) => Scalar::String(s.into_owned().into()),
        }),
        Yaml::Sequence(items) => Yaml::Sequence(items.into_iter().map(own).collect()),
        Yaml::Mapping(m) => Yaml::Mapping(m.into_iter().map(|(k, v)| (own(k), own(v))).collect()),
        Yaml::Tagged(tag, inner) => Yaml::Tagged(
            std::borrow::Cow::Owned(tag.into_owned()),
            Box::new(own(*inner)),
        ),
        Yaml::Representation(s, style, tag) => Yaml::Representation(
            s.into_owned().into(),
            style,
            tag.map(|t| std::borrow::Cow::Owned(t.into_owned())),
        ),
        Yaml::Alias(a) => Yaml::Alias(a),
        Yaml::BadValue => Yaml::BadValue,
    }
}

fn random_yaml_scalar(rng: &mut Rng) -> Yaml<'static> {
    match rng.below(5) {
        0 => Yaml::Value(Scalar::Integer(*rng.pick(NUMBERS))),
        1 => Yaml::Value(Scalar::Boolean(rng.below(2) == 0)),
        2 => Yaml::Value(Scalar::Null),
        3 => Yaml::Value(Scalar::String(rng.pick(KEYS).to_string().into())),
        _ => Yaml::Value(Scalar::String(rng.pick(VALUES).to_string().into())),
    }
}

/// Every node of a tree, as paths of child indices.
fn yaml_paths(y: &Yaml<'_>, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(path.clone());
    if out.len() > 4096 {
        return;
    }
    match y {
        Yaml::Sequence(items) => {
            for (i, c) in items.iter().enumerate() {
                path.push(i);
                yaml_paths(c, path, out);
                path.pop();
            }
        }
        Yaml::Mapping(m) => {
            for (i, (_, c)) in m.iter().enumerate() {
                path.push(i);
                yaml_paths(c, path, out);
                path.pop();
            }
        }
        Yaml::Tagged(_, inner) => {
            path.push(0);
            yaml_paths(inner, path, out);
            path.pop();
        }
        _ => {}
    }
}

fn yaml_at<'a, 'i>(y: &'a mut Yaml<'i>, path: &[usize]) -> &'a mut Yaml<'i> {
    let Some((&first, rest)) = path.split_first() else {
        return y;
    };
    match y {
        Yaml::Sequence(items) => yaml_at(&mut items[first], rest),
        Yaml::Mapping(m) => {
            let (_, v) = m.iter_mut().nth(first).expect("path from yaml_paths");
            yaml_at(v, rest)
        }
        Yaml::Tagged(_, inner) => yaml_at(inner, rest),
        _ => y,
    }
}

fn mutate_yaml(docs: &mut [Yaml<'static>], doc: usize, rng: &mut Rng) {
    let mut paths = Vec::new();
    yaml_paths(&docs[doc], &mut Vec::new(), &mut paths);
    let target = rng.pick(&paths).clone();
    let donor_doc = rng.below(docs.len());
    let mut donor_paths = Vec::new();
    yaml_paths(&docs[donor_doc], &mut Vec::new(), &mut donor_paths);
    let donor_path = rng.pick(&donor_paths).clone();
    let donor = yaml_at(&mut docs[donor_doc], &donor_path).clone();
    let node = yaml_at(&mut docs[doc], &target);
    match rng.below(7) {
        0 | 1 => *node = random_yaml_scalar(rng),
        2 => *node = donor,
        3 => *node = Yaml::Sequence(vec![node.clone(), donor]),
        4 => {
            let mut m = Mapping::new();
            m.insert(
                Yaml::Value(Scalar::String(rng.pick(KEYS).to_string().into())),
                node.clone(),
            );
            *node = Yaml::Mapping(m);
        }
        5 => match node {
            Yaml::Mapping(m) if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).cloned();
                if let Some(k) = k {
                    m.remove(&k);
                }
            }
            Yaml::Sequence(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                items.remove(i);
            }
            other => *other = Yaml::Value(Scalar::Null),
        },
        _ => match node {
            Yaml::Mapping(m) => {
                m.insert(
                    Yaml::Value(Scalar::String(rng.pick(KEYS).to_string().into())),
                    donor,
                );
            }
            Yaml::Sequence(items) => items.push(donor),
            other => {
                *other = Yaml::Tagged(
                    std::borrow::Cow::Owned(saphyr::Tag {
                        handle: "!".into(),
                        suffix: rng
                            .pick(&["Ref", "Sub", "If", "GetAtt", "Foo", "Join"])
                            .to_string(),
                    }),
                    Box::new(other.clone()),
                )
            }
        },
    }
}

fn json_paths(v: &serde_json::Value, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(path.clone());
    if out.len() > 4096 {
        return;
    }
    let children: Vec<&serde_json::Value> = match v {
        serde_json::Value::Array(a) => a.iter().collect(),
        serde_json::Value::Object(o) => o.values().collect(),
        _ => Vec::new(),
    };
    for (i, c) in children.into_iter().enumerate() {
        path.push(i);
        json_paths(c, path, out);
        path.pop();
    }
}

fn json_at<'a>(v: &'a mut serde_json::Value, path: &[usize]) -> &'a mut serde_json::Value {
    let Some((&first, rest)) = path.split_first() else {
        return v;
    };
    match v {
        serde_json::Value::Array(a) => json_at(&mut a[first], rest),
        serde_json::Value::Object(o) => {
            let child = o.values_mut().nth(first).expect("path from json_paths");
            json_at(child, rest)
        }
        other => other,
    }
}

fn random_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::Value;
    match rng.below(6) {
        0 => Value::from(*rng.pick(NUMBERS)),
        1 => Value::Bool(rng.below(2) == 0),
        2 => Value::Null,
        3 => Value::from(*rng.pick(KEYS)),
        4 => Value::from(-1.5),
        _ => Value::from(*rng.pick(VALUES)),
    }
}

fn mutate_json(root: &mut serde_json::Value, rng: &mut Rng) {
    use serde_json::Value;
    let mut paths = Vec::new();
    json_paths(root, &mut Vec::new(), &mut paths);
    let target = rng.pick(&paths).clone();
    let donor_path = rng.pick(&paths).clone();
    let donor = json_at(root, &donor_path).clone();
    let node = json_at(root, &target);
    match rng.below(7) {
        0 | 1 => *node = random_json(rng),
        2 => *node = donor,
        3 => *node = Value::Array(vec![node.take(), donor]),
        4 => {
            let mut m = serde_json::Map::new();
            m.insert(rng.pick(KEYS).to_string(), node.take());
            *node = Value::Object(m);
        }
        5 => match node {
            Value::Object(o) if !o.is_empty() => {
                let k = o.keys().nth(rng.below(o.len())).cloned();
                if let Some(k) = k {
                    o.remove(&k);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                a.remove(i);
            }
            other => *other = Value::Null,
        },
        _ => match node {
            Value::Object(o) => {
                o.insert(rng.pick(KEYS).to_string(), donor);
            }
            Value::Array(a) => a.push(donor),
            other => *other = Value::String(format!("{other}")),
        },
    }
}

/// Line-level mutations, which keep indentation-based structure plausible.
fn lines(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let n = lines.len();
    let i = rng.below(n);
    match rng.below(8) {
        0 => {
            let len = 1 + rng.below((n - i).min(8));
            let block: Vec<String> = lines[i..i + len].to_vec();
            let at = rng.below(n + 1);
            lines.splice(at..at, block);
        }
        1 => {
            let len = 1 + rng.below((n - i).min(4));
            lines.drain(i..i + len);
        }
        2 => {
            let j = rng.below(n);
            lines.swap(i, j);
        }
        3 => {
            if rng.below(2) == 0 {
                lines[i].insert_str(0, "  ");
            } else if lines[i].starts_with(' ') {
                lines[i].remove(0);
            }
        }
        4 => {
            let indent: String = lines[i].chars().take_while(|c| *c == ' ').collect();
            let line = format!("{indent}{}", rng.pick(LINES).trim_start());
            lines.insert(i, line);
        }
        5 => lines.truncate(i),
        6 => {
            // Replace one token (a word, a number or a quoted string) by another.
            let token = if rng.below(2) == 0 {
                rng.pick(KEYS).to_string()
            } else {
                rng.pick(VALUES).to_string()
            };
            lines[i] = replace_token(&lines[i], &token, rng);
        }
        _ => {
            // Repeat a line many times: size and nesting blow-ups.
            let copies = 1 + rng.below(64);
            let line = lines[i].clone();
            for _ in 0..copies {
                lines.insert(i, line.clone());
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn replace_token(line: &str, token: &str, rng: &mut Rng) -> String {
    let spans: Vec<(usize, usize)> = {
        let mut spans = Vec::new();
        let mut start = None;
        for (i, c) in line.char_indices() {
            let word = c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':' | '"');
            match (word, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    spans.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            spans.push((s, line.len()));
        }
        spans
    };
    if spans.is_empty() {
        return format!("{line}{token}");
    }
    let (s, e) = *rng.pick(&spans);
    format!("{}{token}{}", &line[..s], &line[e..])
}
