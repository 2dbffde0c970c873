//! CloudFormation templates (JSON or YAML, long- or short-form intrinsics).
//!
//! Reads `AWS::EC2::SecurityGroup` (`SecurityGroupIngress[]`, `SecurityGroupEgress[]`) and the
//! standalone `AWS::EC2::SecurityGroupIngress` / `AWS::EC2::SecurityGroupEgress`. Intrinsics are
//! resolved as far as the template alone allows: `Ref` to a parameter uses its `Default`,
//! `Fn::Sub`/`Join`/`Select`/`Split`/`FindInMap` are computed, `Fn::If` is decided when its
//! condition depends only on defaults. What only deployment can tell (`Fn::GetAtt`,
//! `Fn::ImportValue`, a parameter without `Default`, `AWS::Region`, …) becomes
//! [`Value::Unknown`] with the reason, so the rule reports it as unknown instead of passing it.

use std::{cell::Cell, collections::HashMap};

use super::{
    document::{Node, NodeValue},
    model::{Direction, ReadOutcome, Resource, SecurityGroupRule, Source, SourceLocation},
    value::{Value, cidr_source_of, named_source_of, number_of, protocol_of},
};

const SHAPE_HINT: &str =
    "see the AWS::EC2::SecurityGroup reference in the CloudFormation User Guide";
/// Guards against conditions or mappings that refer to themselves.
const MAX_DEPTH: usize = 32;
/// Steps of static evaluation one template may take. Conditions, parameters and mappings can
/// refer to each other many times over, so the work is not bounded by the template's size (ten
/// conditions that each name the next one eight times are 8^10 evaluations); past this budget
/// every value still to resolve is unknown. Real templates take a few thousand steps.
pub const RESOLVE_BUDGET: u32 = 200_000;
/// Longest string `Fn::Sub` or `Fn::Join` may build; repeated substitutions double it.
pub const MAX_TEXT: usize = 64 * 1024;
/// Copying text costs a step per this many bytes, so what references copy stays bounded too
/// (a parameter's long default named 10,000 times).
const BYTES_PER_STEP: usize = 256;
const OUT_OF_BUDGET: &str = "the template's intrinsic functions refer to each other too many \
                             times to be evaluated statically";

/// A template with what static resolution needs.
struct Template<'a> {
    parameters: HashMap<&'a str, &'a Node>,
    mappings: Option<&'a Node>,
    conditions: HashMap<&'a str, &'a Node>,
    resources: HashMap<&'a str, &'a Node>,
    /// What is left of [`RESOLVE_BUDGET`].
    fuel: Cell<u32>,
}

/// Whether a document is a CloudFormation template.
pub fn is_template(doc: &Node) -> bool {
    doc.get("AWSTemplateFormatVersion").is_some()
        || doc
            .get("Resources")
            .and_then(Node::as_map)
            .is_some_and(|r| r.iter().all(|(_, v)| v.get("Type").is_some()))
}

pub fn read(file: &str, doc: &Node) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    let entries = |key: &str| -> HashMap<&str, &Node> {
        doc.get(key)
            .and_then(Node::as_map)
            .map(|m| m.iter().map(|(k, v)| (k.as_str(), v)).collect())
            .unwrap_or_default()
    };
    let Some(resources) = doc.get("Resources") else {
        out.error(
            file,
            doc.line,
            "template has no `Resources` section".into(),
            "a CloudFormation template needs a Resources mapping",
        );
        return out;
    };
    let Some(resource_list) = resources.as_map() else {
        out.error(
            file,
            resources.line,
            format!("`Resources` is {}, expected a mapping", resources.kind()),
            SHAPE_HINT,
        );
        return out;
    };
    let template = Template {
        parameters: entries("Parameters"),
        mappings: doc.get("Mappings"),
        conditions: entries("Conditions"),
        resources: entries("Resources"),
        fuel: Cell::new(RESOLVE_BUDGET),
    };
    for (logical_id, resource) in resource_list {
        let Some(resource_type) = resource.get("Type").and_then(Node::as_str) else {
            out.error(
                file,
                resource.line,
                format!("resource `{logical_id}` has no `Type` string"),
                SHAPE_HINT,
            );
            continue;
        };
        let res = Resource::CloudFormation {
            logical_id: logical_id.clone(),
            resource_type: resource_type.to_string(),
        };
        let properties = resource.get("Properties");
        match resource_type {
            "AWS::EC2::SecurityGroup" => {
                let Some(properties) = properties else {
                    continue;
                };
                for (key, direction) in [
                    ("SecurityGroupIngress", Direction::Ingress),
                    ("SecurityGroupEgress", Direction::Egress),
                ] {
                    if let Some(list) = properties.get(key) {
                        template.read_rule_list(file, &res, key, direction, list, &mut out);
                    }
                }
            }
            "AWS::EC2::SecurityGroupIngress" | "AWS::EC2::SecurityGroupEgress" => {
                let direction = if resource_type.ends_with("Ingress") {
                    Direction::Ingress
                } else {
                    Direction::Egress
                };
                let Some(properties) = properties else {
                    out.error(
                        file,
                        resource.line,
                        format!("`{logical_id}` ({resource_type}) has no `Properties`"),
                        SHAPE_HINT,
                    );
                    continue;
                };
                let value = template.resolve(properties, 0);
                template.read_rule(
                    file,
                    &res,
                    "Properties".into(),
                    direction,
                    properties.line,
                    &value,
                    &mut out,
                );
            }
            _ => {}
        }
    }
    out
}

impl<'a> Template<'a> {
    fn read_rule_list(
        &self,
        file: &str,
        res: &Resource,
        key: &str,
        direction: Direction,
        list: &Node,
        out: &mut ReadOutcome,
    ) {
        match &list.value {
            // A literal list: resolve item by item so each keeps its own line.
            NodeValue::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let value = self.resolve(item, 0);
                    self.read_rule(
                        file,
                        res,
                        format!("{key}[{i}]"),
                        direction,
                        item.line,
                        &value,
                        out,
                    );
                }
            }
            // An intrinsic producing the list (`!If [c, [...], [...]]`).
            _ => match self.resolve(list, 0) {
                Value::List(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.read_rule(
                            file,
                            res,
                            format!("{key}[{i}]"),
                            direction,
                            list.line,
                            item,
                            out,
                        );
                    }
                }
                Value::Absent | Value::Null => {}
                v @ Value::Unknown(_) => {
                    self.read_rule(file, res, key.to_string(), direction, list.line, &v, out);
                }
                other => out.error(
                    file,
                    list.line,
                    format!(
                        "`{key}` of `{res}` is {}, expected a list of rules",
                        other.kind()
                    ),
                    SHAPE_HINT,
                ),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read_rule(
        &self,
        file: &str,
        res: &Resource,
        path: String,
        direction: Direction,
        line: usize,
        rule: &Value,
        out: &mut ReadOutcome,
    ) {
        let location = SourceLocation {
            file: file.to_string(),
            line,
        };
        let base = SecurityGroupRule {
            resource: res.clone(),
            location,
            rule_path: path.clone(),
            direction,
            protocol: super::model::Resolved::Unknown(String::new()),
            from_port: None,
            to_port: None,
            source: super::model::Resolved::Unknown(String::new()),
            description: None,
        };
        let rule = match rule {
            Value::Map(_) => rule,
            Value::Absent | Value::Null => return,
            Value::Unknown(why) => {
                // The whole rule is unknown (e.g. `Fn::If` on an undecidable condition): it may
                // be ICMP from anywhere, so it is reported, not skipped.
                out.rules.push(SecurityGroupRule {
                    protocol: super::model::Resolved::Unknown(why.clone()),
                    source: super::model::Resolved::Unknown(why.clone()),
                    ..base
                });
                return;
            }
            other => {
                out.error(
                    file,
                    line,
                    format!("{path} of `{res}` is {}, expected a mapping", other.kind()),
                    SHAPE_HINT,
                );
                return;
            }
        };
        let Some(protocol) = rule.field("IpProtocol") else {
            out.error(
                file,
                line,
                format!("{path} of `{res}` has no `IpProtocol`"),
                "IpProtocol is required: icmp, icmpv6, tcp, udp, -1 or a protocol number",
            );
            return;
        };
        // Each source property is its own rule; CloudFormation allows one per rule, but a
        // template naming two still opens both.
        let sources: Vec<_> = [
            ("CidrIp", false),
            ("CidrIpv6", false),
            ("SourcePrefixListId", true),
            ("SourceSecurityGroupId", true),
            ("SourceSecurityGroupName", true),
        ]
        .into_iter()
        .filter_map(|(key, named)| rule.field(key).map(|v| (key, named, v)))
        .map(|(key, named, v)| match (key, named) {
            (_, false) => cidr_source_of(v, key),
            ("SourcePrefixListId", true) => named_source_of(v, Source::PrefixList),
            _ => named_source_of(v, Source::SecurityGroup),
        })
        .collect();
        if sources.is_empty() {
            out.error(
                file,
                line,
                format!(
                    "{path} of `{res}` has no source (CidrIp, CidrIpv6, SourcePrefixListId, \
                     SourceSecurityGroupId or SourceSecurityGroupName)"
                ),
                "CloudFormation rejects a rule without a source",
            );
            return;
        }
        let protocol = protocol_of(protocol, "IpProtocol");
        let from_port = rule.field("FromPort").map(|v| number_of(v, "FromPort"));
        let to_port = rule.field("ToPort").map(|v| number_of(v, "ToPort"));
        let description = rule.field("Description").and_then(Value::as_text);
        for source in sources {
            out.rules.push(SecurityGroupRule {
                protocol: protocol.clone(),
                from_port: from_port.clone(),
                to_port: to_port.clone(),
                source,
                description: description.clone(),
                ..base.clone()
            });
        }
    }

    /// Takes one step of the budget; false when it is spent.
    fn spend(&self) -> bool {
        self.spend_n(1)
    }

    /// Takes `n` steps; false when fewer were left.
    fn spend_n(&self, n: usize) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let left = self.fuel.get();
        self.fuel.set(left.saturating_sub(n));
        left >= n
    }

    /// A string an intrinsic built, unless it grew past [`MAX_TEXT`] or past what is left of the
    /// budget, which every [`BYTES_PER_STEP`] bytes of built text take one step of.
    fn text_value(&self, function: &str, text: String) -> Value {
        if text.len() > MAX_TEXT {
            Value::Unknown(format!(
                "{function} builds a string longer than the {MAX_TEXT} bytes evaluated statically"
            ))
        } else if !self.spend_n(text.len() / BYTES_PER_STEP) {
            Value::Unknown(OUT_OF_BUDGET.into())
        } else {
            Value::Str(text)
        }
    }

    /// Resolves intrinsics in `node` as far as the template alone allows.
    fn resolve(&self, node: &Node, depth: usize) -> Value {
        if depth > MAX_DEPTH {
            return Value::Unknown("intrinsics nested too deeply to resolve".into());
        }
        if !self.spend() {
            return Value::Unknown(OUT_OF_BUDGET.into());
        }
        match &node.value {
            NodeValue::Map(entries) if entries.len() == 1 => {
                let (key, arg) = &entries[0];
                match key.as_str() {
                    "Ref" => self.resolve_ref(arg, depth),
                    "Fn::Sub" => self.resolve_sub(arg, depth),
                    "Fn::Join" => self.resolve_join(arg, depth),
                    "Fn::Select" => self.resolve_select(arg, depth),
                    "Fn::Split" => self.resolve_split(arg, depth),
                    "Fn::FindInMap" => self.resolve_find_in_map(arg, depth),
                    "Fn::If" => self.resolve_if(arg, depth),
                    "Fn::GetAtt" => Value::Unknown(format!(
                        "Fn::GetAtt {} is known only after deployment",
                        describe_get_att(arg)
                    )),
                    "Fn::ImportValue" => Value::Unknown(format!(
                        "Fn::ImportValue {} comes from another stack's export at deploy time",
                        self.resolve(arg, depth + 1)
                            .as_text()
                            .unwrap_or_else(|| "(computed name)".into())
                    )),
                    k if k.starts_with("Fn::") => {
                        Value::Unknown(format!("{k} is not evaluated statically"))
                    }
                    _ => Value::Map(vec![(key.clone(), self.resolve(arg, depth + 1))]),
                }
            }
            NodeValue::Map(entries) => Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), self.resolve(v, depth + 1)))
                    .filter(|(_, v)| *v != Value::Absent)
                    .collect(),
            ),
            NodeValue::Seq(items) => Value::List(
                items
                    .iter()
                    .map(|v| self.resolve(v, depth + 1))
                    .filter(|v| *v != Value::Absent)
                    .collect(),
            ),
            NodeValue::Str(s) if !self.spend_n(s.len() / BYTES_PER_STEP) => {
                Value::Unknown(OUT_OF_BUDGET.into())
            }
            _ => Value::from_node(node),
        }
    }

    fn resolve_ref(&self, arg: &Node, depth: usize) -> Value {
        let Some(name) = arg.as_str() else {
            return Value::Unknown("Ref to a computed name".into());
        };
        self.lookup_name(name, depth)
    }

    /// A name as `Ref` or `${…}` in `Fn::Sub` sees it.
    fn lookup_name(&self, name: &str, depth: usize) -> Value {
        if name == "AWS::NoValue" {
            return Value::Absent;
        }
        if name.starts_with("AWS::") {
            return Value::Unknown(format!(
                "pseudo parameter {name} is known only at deploy time"
            ));
        }
        if let Some(param) = self.parameters.get(name) {
            let Some(default) = param.get("Default") else {
                return Value::Unknown(format!(
                    "Ref to parameter `{name}`, which has no Default; its value is chosen at \
                     deploy time"
                ));
            };
            let value = self.resolve(default, depth + 1);
            // List parameters take their default as one comma-separated string.
            let is_list = param
                .get("Type")
                .and_then(Node::as_str)
                .is_some_and(|t| t.starts_with("List<") || t == "CommaDelimitedList");
            return match (is_list, value) {
                (true, Value::Str(s)) => {
                    Value::List(s.split(',').map(|p| Value::Str(p.trim().into())).collect())
                }
                (_, v) => v,
            };
        }
        if self.resources.contains_key(name) {
            return Value::Unknown(format!(
                "Ref to resource `{name}`, whose id is known only after deployment"
            ));
        }
        Value::Unknown(format!(
            "Ref to `{name}`, which the template does not declare"
        ))
    }

    fn resolve_sub(&self, arg: &Node, depth: usize) -> Value {
        let (template, vars): (&Node, Option<&Node>) = match &arg.value {
            NodeValue::Seq(items) if items.len() == 2 => (&items[0], Some(&items[1])),
            _ => (arg, None),
        };
        let Some(text) = template.as_str() else {
            return Value::Unknown("Fn::Sub with a computed template".into());
        };
        let mut result = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            result.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                result.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let name = &after[..end];
            if let Some(literal) = name.strip_prefix('!') {
                // `${!Literal}` writes `${Literal}` unchanged.
                result.push_str("${");
                result.push_str(literal);
                result.push('}');
            } else {
                let value = match vars.and_then(|v| v.get(name)) {
                    Some(v) => self.resolve(v, depth + 1),
                    None if name.contains('.') => Value::Unknown(format!(
                        "Fn::Sub uses ${{{name}}}, an attribute known only after deployment"
                    )),
                    None => self.lookup_name(name, depth + 1),
                };
                match value.as_text() {
                    Some(t) => result.push_str(&t),
                    None => {
                        return match value {
                            Value::Unknown(why) => Value::Unknown(format!("Fn::Sub: {why}")),
                            other => Value::Unknown(format!(
                                "Fn::Sub variable {name} is {}, not text",
                                other.kind()
                            )),
                        };
                    }
                }
            }
            rest = &after[end + 1..];
            if result.len() > MAX_TEXT {
                break;
            }
        }
        result.push_str(rest);
        self.text_value("Fn::Sub", result)
    }

    fn resolve_join(&self, arg: &Node, depth: usize) -> Value {
        let Some([delimiter, list]) = arg.as_seq().and_then(|s| <&[Node; 2]>::try_from(s).ok())
        else {
            return Value::Unknown("Fn::Join needs [delimiter, list]".into());
        };
        let delimiter = delimiter.as_str().unwrap_or_default();
        match self.resolve(list, depth + 1) {
            Value::List(items) => {
                let mut parts = Vec::with_capacity(items.len());
                for item in items {
                    match item.as_text() {
                        Some(t) => parts.push(t),
                        None => return unknown_in("Fn::Join", item),
                    }
                }
                self.text_value("Fn::Join", parts.join(delimiter))
            }
            other => unknown_in("Fn::Join", other),
        }
    }

    fn resolve_select(&self, arg: &Node, depth: usize) -> Value {
        let Some([index, list]) = arg.as_seq().and_then(|s| <&[Node; 2]>::try_from(s).ok()) else {
            return Value::Unknown("Fn::Select needs [index, list]".into());
        };
        let index = match number_of(&self.resolve(index, depth + 1), "Fn::Select index") {
            super::model::Resolved::Known(i) => i,
            super::model::Resolved::Unknown(why) => return Value::Unknown(why),
        };
        match self.resolve(list, depth + 1) {
            Value::List(items) => usize::try_from(index)
                .ok()
                .and_then(|i| items.get(i).cloned())
                .unwrap_or_else(|| {
                    Value::Unknown(format!("Fn::Select index {index} is out of range"))
                }),
            other => unknown_in("Fn::Select", other),
        }
    }

    fn resolve_split(&self, arg: &Node, depth: usize) -> Value {
        let Some([delimiter, text]) = arg.as_seq().and_then(|s| <&[Node; 2]>::try_from(s).ok())
        else {
            return Value::Unknown("Fn::Split needs [delimiter, string]".into());
        };
        let delimiter = delimiter.as_str().unwrap_or(",");
        match self.resolve(text, depth + 1) {
            Value::Str(s) if !delimiter.is_empty() => {
                Value::List(s.split(delimiter).map(|p| Value::Str(p.into())).collect())
            }
            other => unknown_in("Fn::Split", other),
        }
    }

    fn resolve_find_in_map(&self, arg: &Node, depth: usize) -> Value {
        let Some(args) = arg.as_seq().filter(|a| a.len() >= 3) else {
            return Value::Unknown("Fn::FindInMap needs [map, key, key]".into());
        };
        let mut keys = Vec::with_capacity(3);
        for key in &args[..3] {
            match self.resolve(key, depth + 1).as_text() {
                Some(k) => keys.push(k),
                None => {
                    return Value::Unknown(
                        "Fn::FindInMap with a key known only at deploy time".into(),
                    );
                }
            }
        }
        let found = self
            .mappings
            .and_then(|m| m.get(&keys[0]))
            .and_then(|m| m.get(&keys[1]))
            .and_then(|m| m.get(&keys[2]));
        match found {
            Some(node) => self.resolve(node, depth + 1),
            None => Value::Unknown(format!(
                "Fn::FindInMap [{}, {}, {}] is not in the template's Mappings",
                keys[0], keys[1], keys[2]
            )),
        }
    }

    fn resolve_if(&self, arg: &Node, depth: usize) -> Value {
        let Some([condition, when_true, when_false]) =
            arg.as_seq().and_then(|s| <&[Node; 3]>::try_from(s).ok())
        else {
            return Value::Unknown(
                "Fn::If needs [condition, value-if-true, value-if-false]".into(),
            );
        };
        let Some(name) = condition.as_str() else {
            return Value::Unknown("Fn::If with a computed condition name".into());
        };
        match self.condition(name, depth + 1) {
            Some(true) => self.resolve(when_true, depth + 1),
            Some(false) => self.resolve(when_false, depth + 1),
            None => {
                let (a, b) = (
                    self.resolve(when_true, depth + 1),
                    self.resolve(when_false, depth + 1),
                );
                if a == b {
                    a
                } else {
                    Value::Unknown(format!(
                        "Fn::If on condition `{name}`, which depends on values known only at \
                         deploy time"
                    ))
                }
            }
        }
    }

    /// A named condition's value when the template alone decides it.
    fn condition(&self, name: &str, depth: usize) -> Option<bool> {
        let node = self.conditions.get(name)?;
        self.eval_condition(node, depth + 1)
    }

    fn eval_condition(&self, node: &Node, depth: usize) -> Option<bool> {
        if depth > MAX_DEPTH || !self.spend() {
            return None;
        }
        let (key, arg) = node
            .as_map()
            .filter(|m| m.len() == 1)
            .map(|m| (&m[0].0, &m[0].1))?;
        let items = || arg.as_seq().unwrap_or_default();
        match key.as_str() {
            "Condition" => self.condition(arg.as_str()?, depth + 1),
            "Fn::Equals" => {
                let [a, b] = <&[Node; 2]>::try_from(items()).ok()?;
                let a = self.resolve(a, depth + 1).as_text()?;
                let b = self.resolve(b, depth + 1).as_text()?;
                Some(a == b)
            }
            "Fn::Not" => Some(!self.eval_condition(items().first()?, depth + 1)?),
            "Fn::And" => items()
                .iter()
                .map(|c| self.eval_condition(c, depth + 1))
                .try_fold(true, |acc, c| c.map(|c| acc && c)),
            "Fn::Or" => items()
                .iter()
                .map(|c| self.eval_condition(c, depth + 1))
                .try_fold(false, |acc, c| c.map(|c| acc || c)),
            _ => None,
        }
    }
}

fn unknown_in(function: &str, v: Value) -> Value {
    match v {
        Value::Unknown(why) => Value::Unknown(format!("{function}: {why}")),
        other => Value::Unknown(format!("{function} over {}", other.kind())),
    }
}

fn describe_get_att(arg: &Node) -> String {
    match &arg.value {
        NodeValue::Str(s) => s.clone(),
        NodeValue::Seq(items) => items
            .iter()
            .filter_map(Node::as_str)
            .collect::<Vec<_>>()
            .join("."),
        _ => "(computed)".into(),
    }
}
