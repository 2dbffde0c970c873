//! `aws ec2 describe-security-groups` and `aws ec2 describe-security-group-rules` JSON output.
//!
//! One IpPermission can carry many sources (IpRanges, Ipv6Ranges, PrefixListIds,
//! UserIdGroupPairs); each becomes its own [`SecurityGroupRule`] so that no condition is ever
//! combined across sources or permissions.

use super::{
    document::Node,
    model::{
        Direction, ReadOutcome, Resolved, Resource, SecurityGroupRule, Source, SourceLocation,
    },
    value::{Value, cidr_source_of, named_source_of, number_of, protocol_of},
};

const SHAPE_HINT: &str = "expected the JSON printed by `aws ec2 describe-security-groups --output json` \
     or `aws ec2 describe-security-group-rules --output json`";

/// Reads either output; `doc` is the whole document.
pub fn read(file: &str, doc: &Node) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    if let Some(groups) = doc.get("SecurityGroups") {
        read_groups(file, groups, &mut out);
    } else if let Some(rules) = doc.get("SecurityGroupRules") {
        read_rule_list(file, rules, &mut out);
    } else if doc.as_seq().is_some() {
        // `--query 'SecurityGroups[*]'` prints the bare list.
        read_groups(file, doc, &mut out);
    } else {
        out.error(
            file,
            doc.line,
            "no `SecurityGroups` or `SecurityGroupRules` key at the top level".into(),
            SHAPE_HINT,
        );
    }
    out
}

fn read_groups(file: &str, groups: &Node, out: &mut ReadOutcome) {
    let Some(groups) = groups.as_seq() else {
        out.error(
            file,
            groups.line,
            format!("`SecurityGroups` is {}, expected a list", groups.kind()),
            SHAPE_HINT,
        );
        return;
    };
    for group in groups {
        let Some(group_id) = group.get("GroupId").and_then(Node::as_str) else {
            out.error(
                file,
                group.line,
                "security group without a `GroupId` string".into(),
                SHAPE_HINT,
            );
            continue;
        };
        let resource = Resource::AwsSecurityGroup {
            group_id: group_id.to_string(),
            group_name: group
                .get("GroupName")
                .and_then(Node::as_str)
                .map(String::from),
            security_group_rule_id: None,
        };
        for (key, direction) in [
            ("IpPermissions", Direction::Ingress),
            ("IpPermissionsEgress", Direction::Egress),
        ] {
            let Some(perms) = group.get(key) else {
                continue;
            };
            let Some(perms) = perms.as_seq() else {
                out.error(
                    file,
                    perms.line,
                    format!("`{key}` of {group_id} is {}, expected a list", perms.kind()),
                    SHAPE_HINT,
                );
                continue;
            };
            for (i, perm) in perms.iter().enumerate() {
                read_permission(
                    file,
                    &resource,
                    direction,
                    &format!("{key}[{i}]"),
                    perm,
                    out,
                );
            }
        }
    }
}

/// The source lists of an IpPermission: (key, field holding the value, kind of source).
const SOURCE_LISTS: &[(&str, &[&str], SourceKind)] = &[
    ("IpRanges", &["CidrIp"], SourceKind::Cidr),
    ("Ipv6Ranges", &["CidrIpv6"], SourceKind::Cidr),
    ("PrefixListIds", &["PrefixListId"], SourceKind::PrefixList),
    (
        "UserIdGroupPairs",
        &["GroupId", "GroupName"],
        SourceKind::SecurityGroup,
    ),
];

#[derive(Clone, Copy)]
enum SourceKind {
    Cidr,
    PrefixList,
    SecurityGroup,
}

fn source_of(kind: SourceKind, v: &Value, field: &str) -> Resolved<Source> {
    match kind {
        SourceKind::Cidr => cidr_source_of(v, field),
        SourceKind::PrefixList => named_source_of(v, Source::PrefixList),
        SourceKind::SecurityGroup => named_source_of(v, Source::SecurityGroup),
    }
}

fn read_permission(
    file: &str,
    resource: &Resource,
    direction: Direction,
    path: &str,
    perm: &Node,
    out: &mut ReadOutcome,
) {
    let Some(protocol) = perm.get("IpProtocol") else {
        out.error(
            file,
            perm.line,
            format!("{resource} {path} has no `IpProtocol`"),
            SHAPE_HINT,
        );
        return;
    };
    let protocol = protocol_of(&Value::from_node(protocol), "IpProtocol");
    let port = |k: &str| perm.get(k).map(|n| number_of(&Value::from_node(n), k));
    for (list_key, fields, kind) in SOURCE_LISTS {
        let Some(list) = perm.get(list_key) else {
            continue;
        };
        let Some(entries) = list.as_seq() else {
            out.error(
                file,
                list.line,
                format!(
                    "`{list_key}` in {resource} {path} is {}, expected a list",
                    list.kind()
                ),
                SHAPE_HINT,
            );
            continue;
        };
        for (j, entry) in entries.iter().enumerate() {
            let Some((field, value)) = fields.iter().find_map(|f| entry.get(f).map(|v| (*f, v)))
            else {
                out.error(
                    file,
                    entry.line,
                    format!(
                        "{resource} {path}.{list_key}[{j}] has none of {}",
                        fields.join(", ")
                    ),
                    SHAPE_HINT,
                );
                continue;
            };
            out.rules.push(SecurityGroupRule {
                resource: resource.clone(),
                location: SourceLocation {
                    file: file.to_string(),
                    line: entry.line,
                },
                rule_path: format!("{path}.{list_key}[{j}]"),
                direction,
                protocol: protocol.clone(),
                from_port: port("FromPort"),
                to_port: port("ToPort"),
                source: source_of(*kind, &Value::from_node(value), field),
                description: entry
                    .get("Description")
                    .and_then(Node::as_str)
                    .map(String::from),
            });
        }
    }
}

/// `describe-security-group-rules`: one source per rule already.
fn read_rule_list(file: &str, rules: &Node, out: &mut ReadOutcome) {
    let Some(rules) = rules.as_seq() else {
        out.error(
            file,
            rules.line,
            format!("`SecurityGroupRules` is {}, expected a list", rules.kind()),
            SHAPE_HINT,
        );
        return;
    };
    for (i, rule) in rules.iter().enumerate() {
        let (Some(group_id), Some(protocol)) = (
            rule.get("GroupId").and_then(Node::as_str),
            rule.get("IpProtocol"),
        ) else {
            out.error(
                file,
                rule.line,
                format!("SecurityGroupRules[{i}] needs `GroupId` and `IpProtocol`"),
                SHAPE_HINT,
            );
            continue;
        };
        let rule_id = rule
            .get("SecurityGroupRuleId")
            .and_then(Node::as_str)
            .map(String::from);
        let direction = match rule.get("IsEgress").map(|n| &n.value) {
            Some(super::document::NodeValue::Bool(true)) => Direction::Egress,
            _ => Direction::Ingress,
        };
        let field = |k: &str| rule.get(k).map(Value::from_node);
        let source = if let Some(v) = field("CidrIpv4") {
            cidr_source_of(&v, "CidrIpv4")
        } else if let Some(v) = field("CidrIpv6") {
            cidr_source_of(&v, "CidrIpv6")
        } else if let Some(v) = field("PrefixListId") {
            named_source_of(&v, Source::PrefixList)
        } else if let Some(v) = field("ReferencedGroupInfo") {
            let id = v.get("GroupId").cloned().unwrap_or(Value::Null);
            named_source_of(&id, Source::SecurityGroup)
        } else {
            out.error(
                file,
                rule.line,
                format!(
                    "SecurityGroupRules[{i}] has no source (CidrIpv4, CidrIpv6, PrefixListId or \
                     ReferencedGroupInfo)"
                ),
                SHAPE_HINT,
            );
            continue;
        };
        out.rules.push(SecurityGroupRule {
            resource: Resource::AwsSecurityGroup {
                group_id: group_id.to_string(),
                group_name: None,
                security_group_rule_id: rule_id,
            },
            location: SourceLocation {
                file: file.to_string(),
                line: rule.line,
            },
            rule_path: format!("SecurityGroupRules[{i}]"),
            direction,
            protocol: protocol_of(&Value::from_node(protocol), "IpProtocol"),
            from_port: rule
                .get("FromPort")
                .map(|n| number_of(&Value::from_node(n), "FromPort")),
            to_port: rule
                .get("ToPort")
                .map(|n| number_of(&Value::from_node(n), "ToPort")),
            source,
            description: rule
                .get("Description")
                .and_then(Node::as_str)
                .map(String::from),
        });
    }
}
