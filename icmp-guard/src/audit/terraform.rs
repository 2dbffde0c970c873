//! Terraform's AWS security-group resources, shared by the HCL and plan readers: both turn a
//! resource (or an inline `ingress` block) into a [`Value`] map first, then come here.

use super::{
    model::{
        Direction, ReadOutcome, Resolved, Resource, SecurityGroupRule, Source, SourceLocation,
    },
    value::{Value, cidr_source_of, named_source_of, number_of, protocol_of},
};

/// The resource types this audit reads.
pub const SECURITY_GROUP: &str = "aws_security_group";
pub const SECURITY_GROUP_RULE: &str = "aws_security_group_rule";
pub const VPC_INGRESS_RULE: &str = "aws_vpc_security_group_ingress_rule";
pub const VPC_EGRESS_RULE: &str = "aws_vpc_security_group_egress_rule";

pub fn is_audited_type(t: &str) -> bool {
    matches!(
        t,
        SECURITY_GROUP | SECURITY_GROUP_RULE | VPC_INGRESS_RULE | VPC_EGRESS_RULE
    )
}

/// Which resource a rule comes from, and where.
pub struct RuleSite<'a> {
    pub file: &'a str,
    pub address: &'a str,
    pub resource_type: &'a str,
    pub from_plan: bool,
    /// Path inside the resource, e.g. `ingress[0]` (empty for standalone rules).
    pub path: String,
    pub direction: Direction,
    /// Line of the rule; used when an attribute has no line of its own.
    pub line: usize,
}

impl RuleSite<'_> {
    fn resource(&self) -> Resource {
        Resource::Terraform {
            address: self.address.to_string(),
            resource_type: self.resource_type.to_string(),
            from_plan: self.from_plan,
        }
    }

    fn rule(
        &self,
        attr: &str,
        index: Option<usize>,
        line: usize,
        fields: &RuleFields,
        source: Resolved<Source>,
    ) -> SecurityGroupRule {
        let mut path = self.path.clone();
        if !path.is_empty() && !attr.is_empty() {
            path.push('.');
        }
        path.push_str(attr);
        if let Some(i) = index {
            path.push_str(&format!("[{i}]"));
        }
        SecurityGroupRule {
            resource: self.resource(),
            location: SourceLocation {
                file: self.file.to_string(),
                line,
            },
            rule_path: path,
            direction: self.direction,
            protocol: fields.protocol.clone(),
            from_port: fields.from_port.clone(),
            to_port: fields.to_port.clone(),
            source,
            description: fields.description.clone(),
        }
    }
}

struct RuleFields {
    protocol: Resolved<Protocol>,
    from_port: Option<Resolved<i64>>,
    to_port: Option<Resolved<i64>>,
    description: Option<String>,
}

use super::model::Protocol;

fn fields(obj: &Value, protocol_key: &str) -> RuleFields {
    RuleFields {
        protocol: obj
            .field(protocol_key)
            .map(|v| protocol_of(v, protocol_key))
            .unwrap_or_else(|| Resolved::Unknown(format!("`{protocol_key}` is not set"))),
        from_port: obj.field("from_port").map(|v| number_of(v, "from_port")),
        to_port: obj.field("to_port").map(|v| number_of(v, "to_port")),
        description: obj.field("description").and_then(Value::as_text),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Cidr,
    PrefixList,
    SecurityGroup,
}

fn source(kind: Kind, v: &Value, attr: &str) -> Resolved<Source> {
    match kind {
        Kind::Cidr => cidr_source_of(v, attr),
        Kind::PrefixList => named_source_of(v, Source::PrefixList),
        Kind::SecurityGroup => named_source_of(v, Source::SecurityGroup),
    }
}

/// A list attribute of sources (`cidr_blocks`, `ipv6_cidr_blocks`, …): one rule per element;
/// an unknown list is one unknown source.
fn list_sources(
    site: &RuleSite,
    obj: &Value,
    attr: &str,
    kind: Kind,
    fields: &RuleFields,
    line_of: &dyn Fn(&str) -> usize,
    out: &mut ReadOutcome,
) {
    let Some(v) = obj.field(attr) else { return };
    let line = line_of(attr);
    match v {
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                out.rules
                    .push(site.rule(attr, Some(i), line, fields, source(kind, item, attr)));
            }
        }
        Value::Unknown(why) => {
            // Only the kind matters for security groups and prefix lists: never "anywhere".
            let src = match kind {
                Kind::Cidr => Resolved::Unknown(format!("{attr}: {why}")),
                _ => source(kind, v, attr),
            };
            out.rules.push(site.rule(attr, None, line, fields, src));
        }
        other => out.error(
            site.file,
            line,
            format!(
                "`{attr}` of {} is {}, expected a list",
                site.address,
                other.kind()
            ),
            "write it as a list, e.g. [\"10.0.0.0/8\"]",
        ),
    }
}

/// An `ingress`/`egress` object of `aws_security_group`, or an `aws_security_group_rule`.
pub fn read_group_style_rule(
    site: &RuleSite,
    obj: &Value,
    line_of: &dyn Fn(&str) -> usize,
    out: &mut ReadOutcome,
) {
    let f = fields(obj, "protocol");
    list_sources(site, obj, "cidr_blocks", Kind::Cidr, &f, line_of, out);
    list_sources(site, obj, "ipv6_cidr_blocks", Kind::Cidr, &f, line_of, out);
    list_sources(
        site,
        obj,
        "prefix_list_ids",
        Kind::PrefixList,
        &f,
        line_of,
        out,
    );
    list_sources(
        site,
        obj,
        "security_groups",
        Kind::SecurityGroup,
        &f,
        line_of,
        out,
    );
    if let Some(v) = obj.field("source_security_group_id") {
        let line = line_of("source_security_group_id");
        out.rules.push(site.rule(
            "source_security_group_id",
            None,
            line,
            &f,
            source(Kind::SecurityGroup, v, "source_security_group_id"),
        ));
    }
    if matches!(obj.field("self"), Some(Value::Bool(true))) {
        out.rules.push(site.rule(
            "self",
            None,
            line_of("self"),
            &f,
            Resolved::Known(Source::SecurityGroup("self".into())),
        ));
    }
}

/// `aws_vpc_security_group_ingress_rule` / `_egress_rule`: one source attribute each.
pub fn read_vpc_rule(
    site: &RuleSite,
    obj: &Value,
    line_of: &dyn Fn(&str) -> usize,
    out: &mut ReadOutcome,
) {
    let f = fields(obj, "ip_protocol");
    for (attr, kind) in [
        ("cidr_ipv4", Kind::Cidr),
        ("cidr_ipv6", Kind::Cidr),
        ("prefix_list_id", Kind::PrefixList),
        ("referenced_security_group_id", Kind::SecurityGroup),
    ] {
        if let Some(v) = obj.field(attr) {
            out.rules
                .push(site.rule(attr, None, line_of(attr), &f, source(kind, v, attr)));
        }
    }
}

/// Dispatches a whole resource by type. `values` holds its attributes (and, for
/// `aws_security_group`, `ingress`/`egress` as lists of objects).
pub fn read_resource(
    mut site: RuleSite,
    values: &Value,
    line_of: &dyn Fn(&str) -> usize,
    out: &mut ReadOutcome,
) {
    match site.resource_type {
        SECURITY_GROUP => {
            for (attr, direction) in [
                ("ingress", Direction::Ingress),
                ("egress", Direction::Egress),
            ] {
                site.direction = direction;
                match values.field(attr) {
                    Some(Value::List(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            let s = RuleSite {
                                path: format!("{attr}[{i}]"),
                                ..site.clone_shallow()
                            };
                            read_group_style_rule(&s, item, line_of, out);
                        }
                    }
                    Some(Value::Unknown(why)) => {
                        let s = RuleSite {
                            path: attr.to_string(),
                            ..site.clone_shallow()
                        };
                        // `ingress = var.rules` without a default: every rule is unknown.
                        let unknown = RuleFields {
                            protocol: Resolved::Unknown(why.clone()),
                            from_port: None,
                            to_port: None,
                            description: None,
                        };
                        out.rules.push(s.rule(
                            "",
                            None,
                            line_of(attr),
                            &unknown,
                            Resolved::Unknown(why.clone()),
                        ));
                    }
                    _ => {}
                }
            }
        }
        SECURITY_GROUP_RULE => {
            site.direction = match values.field("type").and_then(Value::as_text).as_deref() {
                Some("egress") => Direction::Egress,
                _ => Direction::Ingress,
            };
            read_group_style_rule(&site, values, line_of, out);
        }
        VPC_INGRESS_RULE => {
            site.direction = Direction::Ingress;
            read_vpc_rule(&site, values, line_of, out);
        }
        VPC_EGRESS_RULE => {
            site.direction = Direction::Egress;
            read_vpc_rule(&site, values, line_of, out);
        }
        _ => {}
    }
}

impl RuleSite<'_> {
    fn clone_shallow(&self) -> Self {
        RuleSite {
            file: self.file,
            address: self.address,
            resource_type: self.resource_type,
            from_plan: self.from_plan,
            path: self.path.clone(),
            direction: self.direction,
            line: self.line,
        }
    }
}
