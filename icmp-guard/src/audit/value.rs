//! Values after static resolution of template expressions (CloudFormation intrinsics, Terraform
//! expressions, plan unknowns), and their conversion into rule fields.

use super::{
    document::{Node, NodeValue},
    model::{Cidr, Protocol, Resolved, Source},
};

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(Vec<(String, Value)>),
    /// CloudFormation's `AWS::NoValue`: the property is removed.
    Absent,
    /// Known only at deploy/apply time; the text says why.
    Unknown(String),
}

impl Value {
    /// A document node taken literally (no intrinsics).
    pub fn from_node(node: &Node) -> Value {
        match &node.value {
            NodeValue::Null => Value::Null,
            NodeValue::Bool(b) => Value::Bool(*b),
            NodeValue::Int(i) => Value::Int(*i),
            NodeValue::Float(f) => Value::Float(*f),
            NodeValue::Str(s) => Value::Str(s.clone()),
            NodeValue::Seq(items) => Value::List(items.iter().map(Value::from_node).collect()),
            NodeValue::Map(entries) => Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from_node(v)))
                    .collect(),
            ),
            NodeValue::Tagged(tag, _) => Value::Unknown(format!("unsupported YAML tag {tag}")),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value of a field, treating `null` and `AWS::NoValue` as not set.
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.get(key)
            .filter(|v| !matches!(v, Value::Null | Value::Absent))
    }

    /// Scalars as text, the way CloudFormation and Terraform coerce them into strings.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// What copying this value costs, in steps of an evaluation budget: one per node and one
    /// per `bytes_per_step` bytes of text. Used where an evaluator copies a stored value.
    pub fn copy_cost(&self, bytes_per_step: usize) -> usize {
        let text = |s: &str| s.len() / bytes_per_step.max(1);
        1 + match self {
            Value::Str(s) | Value::Unknown(s) => text(s),
            Value::List(items) => items.iter().map(|v| v.copy_cost(bytes_per_step)).sum(),
            Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| text(k) + v.copy_cost(bytes_per_step))
                .sum(),
            Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Absent => 0,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
            Value::Map(_) => "a mapping",
            Value::Absent => "AWS::NoValue",
            Value::Unknown(_) => "an unknown value",
        }
    }
}

/// A protocol written as a name, a numeric string or a number.
pub fn protocol_of(v: &Value, field: &str) -> Resolved<Protocol> {
    match v {
        Value::Str(s) => Resolved::Known(Protocol::from_spelling(s)),
        Value::Int(i) => Resolved::Known(Protocol::from_number(*i)),
        Value::Float(f) if f.fract() == 0.0 => Resolved::Known(Protocol::from_number(*f as i64)),
        Value::Unknown(why) => Resolved::Unknown(why.clone()),
        other => Resolved::Unknown(format!("{field} is {}, not a protocol", other.kind())),
    }
}

/// A port (or ICMP type/code) written as a number or a numeric string.
pub fn number_of(v: &Value, field: &str) -> Resolved<i64> {
    match v {
        Value::Int(i) => Resolved::Known(*i),
        Value::Float(f) if f.fract() == 0.0 => Resolved::Known(*f as i64),
        Value::Str(s) => match s.trim().parse::<i64>() {
            Ok(i) => Resolved::Known(i),
            Err(_) => Resolved::Unknown(format!("{field} `{s}` is not a number")),
        },
        Value::Unknown(why) => Resolved::Unknown(why.clone()),
        other => Resolved::Unknown(format!("{field} is {}, not a number", other.kind())),
    }
}

/// A CIDR source. A malformed CIDR is reported as unknown (AWS would reject it, but the audit
/// must not pretend it is narrow).
pub fn cidr_source_of(v: &Value, field: &str) -> Resolved<Source> {
    match v {
        Value::Str(s) => match s.parse::<Cidr>() {
            Ok(c) => Resolved::Known(Source::Cidr(c)),
            Err(e) => Resolved::Unknown(format!("{field}: {e}")),
        },
        Value::Unknown(why) => Resolved::Unknown(why.clone()),
        other => Resolved::Unknown(format!("{field} is {}, not a CIDR block", other.kind())),
    }
}

/// A security-group or prefix-list source: its kind is known from the field even when the id is
/// not (`SourceSecurityGroupId: !Ref OtherGroup`), and neither kind is "anywhere".
pub fn named_source_of(v: &Value, make: fn(String) -> Source) -> Resolved<Source> {
    Resolved::Known(make(
        v.as_text()
            .unwrap_or_else(|| "(resolved at deploy time)".into()),
    ))
}
