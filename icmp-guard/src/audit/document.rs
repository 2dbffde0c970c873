//! JSON and YAML documents as one tree with line numbers.
//!
//! Both are read with saphyr (YAML 1.2 is a JSON superset, and saphyr keeps the position of every
//! node), so CloudFormation JSON templates, AWS API output and plans get lines too. JSON is first
//! checked with serde_json because its errors speak JSON ("expected `,` or `}`") where a YAML
//! parser would talk about flow mappings.

use saphyr::{MarkedYamlOwned, ScalarOwned, YamlDataOwned};

use crate::sources::policy::yaml::load_nested;

/// One node of a document, with the 1-based line it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub line: usize,
    pub value: NodeValue,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in document order; non-string keys are written out as text.
    Map(Vec<(String, Node)>),
    /// A YAML tag that is not a CloudFormation short-form intrinsic (`!Foo bar`).
    Tagged(String, Box<Node>),
}

/// A parse error at a position (1-based line and column, 0 when unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// CloudFormation's short-form intrinsics (`!Ref x` is `{"Ref": x}`, `!Sub s` is
/// `{"Fn::Sub": s}`, …), turned into the long form so one resolver handles JSON and YAML.
const SHORT_FORM_INTRINSICS: &[(&str, &str)] = &[
    ("Ref", "Ref"),
    ("Condition", "Condition"),
    ("Base64", "Fn::Base64"),
    ("Cidr", "Fn::Cidr"),
    ("FindInMap", "Fn::FindInMap"),
    ("ForEach", "Fn::ForEach"),
    ("GetAtt", "Fn::GetAtt"),
    ("GetAZs", "Fn::GetAZs"),
    ("ImportValue", "Fn::ImportValue"),
    ("Join", "Fn::Join"),
    ("Length", "Fn::Length"),
    ("Select", "Fn::Select"),
    ("Split", "Fn::Split"),
    ("Sub", "Fn::Sub"),
    ("ToJsonString", "Fn::ToJsonString"),
    ("Transform", "Fn::Transform"),
    ("And", "Fn::And"),
    ("Equals", "Fn::Equals"),
    ("If", "Fn::If"),
    ("Not", "Fn::Not"),
    ("Or", "Fn::Or"),
];

/// Whether the text is JSON rather than YAML: JSON documents start with `{` or `[`.
pub fn looks_like_json(text: &str) -> bool {
    matches!(
        text.trim_start_matches('\u{feff}')
            .trim_start()
            .chars()
            .next(),
        Some('{' | '[')
    )
}

/// Parses JSON or YAML into a [`Node`] tree (the first document of a YAML stream).
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let text = text.trim_start_matches('\u{feff}');
    let json_error = looks_like_json(text)
        .then(|| serde_json::from_str::<serde::de::IgnoredAny>(text).err())
        .flatten();
    if let Some(e) = json_error {
        return Err(SyntaxError {
            line: e.line(),
            column: e.column(),
            // serde_json appends " at line L column C"; the position is reported apart.
            message: format!(
                "invalid JSON: {}",
                e.to_string()
                    .rsplit_once(" at line ")
                    .map_or(e.to_string(), |(m, _)| m.to_string())
            ),
        });
    }
    let docs = load_nested::<MarkedYamlOwned>(text).map_err(|e| SyntaxError {
        line: e.marker().line(),
        column: e.marker().col() + 1,
        message: format!("invalid YAML: {}", e.info()),
    })?;
    let Some(doc) = docs.into_iter().next() else {
        return Err(SyntaxError {
            line: 1,
            column: 0,
            message: "the file is empty".into(),
        });
    };
    convert(doc)
}

fn convert(node: MarkedYamlOwned) -> Result<Node, SyntaxError> {
    let line = node.span.start.line();
    let value = match node.data {
        YamlDataOwned::Value(s) => match s {
            ScalarOwned::Null => NodeValue::Null,
            ScalarOwned::Boolean(b) => NodeValue::Bool(b),
            ScalarOwned::Integer(i) => NodeValue::Int(i),
            ScalarOwned::FloatingPoint(f) => NodeValue::Float(f.into_inner()),
            ScalarOwned::String(s) => NodeValue::Str(s),
        },
        YamlDataOwned::Sequence(items) => NodeValue::Seq(
            items
                .into_iter()
                .map(convert)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        YamlDataOwned::Mapping(map) => {
            let mut entries = Vec::with_capacity(map.len());
            for (k, v) in map {
                let key = match k.data {
                    YamlDataOwned::Value(ScalarOwned::String(s)) => s,
                    YamlDataOwned::Value(ScalarOwned::Integer(i)) => i.to_string(),
                    YamlDataOwned::Value(ScalarOwned::Boolean(b)) => b.to_string(),
                    YamlDataOwned::Value(ScalarOwned::FloatingPoint(f)) => f.to_string(),
                    YamlDataOwned::Value(ScalarOwned::Null) => "null".into(),
                    _ => {
                        return Err(SyntaxError {
                            line: k.span.start.line(),
                            column: k.span.start.col() + 1,
                            message: "a mapping key must be a plain value, not a list or mapping"
                                .into(),
                        });
                    }
                };
                entries.push((key, convert(v)?));
            }
            NodeValue::Map(entries)
        }
        YamlDataOwned::Tagged(tag, inner) => {
            let mut inner = convert(*inner)?;
            // Tagged scalars carry no span of their own in saphyr; the tag's node has it.
            if inner.line == 0 {
                inner.line = line;
            }
            let intrinsic = (tag.handle == "!")
                .then(|| {
                    SHORT_FORM_INTRINSICS
                        .iter()
                        .find(|(short, _)| *short == tag.suffix)
                })
                .flatten();
            match intrinsic {
                Some((_, long)) => {
                    // `!GetAtt Res.Attr` is the string form of `Fn::GetAtt: [Res, Attr]`; both
                    // are left to the resolver, which treats either as unknown.
                    NodeValue::Map(vec![(long.to_string(), inner)])
                }
                None => NodeValue::Tagged(format!("{}{}", tag.handle, tag.suffix), Box::new(inner)),
            }
        }
        YamlDataOwned::Alias(_) | YamlDataOwned::Representation(..) | YamlDataOwned::BadValue => {
            return Err(SyntaxError {
                line,
                column: node.span.start.col() + 1,
                message: "a value here cannot be read (bad tag or alias)".into(),
            });
        }
    };
    Ok(Node { line, value })
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            NodeValue::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            NodeValue::Seq(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(String, Node)]> {
        match &self.value {
            NodeValue::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// For messages: what kind of value this is.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            NodeValue::Null => "null",
            NodeValue::Bool(_) => "a boolean",
            NodeValue::Int(_) | NodeValue::Float(_) => "a number",
            NodeValue::Str(_) => "a string",
            NodeValue::Seq(_) => "a list",
            NodeValue::Map(_) => "a mapping",
            NodeValue::Tagged(..) => "a tagged value",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_have_lines_and_short_forms_become_long_forms() {
        let json = parse("{\n\t\"A\": {\n\t\t\"B\": [1, \"-1\", -1]\n\t}\n}\n").unwrap();
        let b = json.get("A").unwrap().get("B").unwrap();
        assert_eq!(b.line, 3);
        assert_eq!(b.as_seq().unwrap()[1].value, NodeValue::Str("-1".into()));
        assert_eq!(b.as_seq().unwrap()[2].value, NodeValue::Int(-1));

        let yaml = parse("a:\n  b: !Ref Param\n  c: !Foo x\n").unwrap();
        let b = yaml.get("a").unwrap().get("b").unwrap();
        assert_eq!(b.line, 2);
        assert_eq!(b.get("Ref").unwrap().as_str(), Some("Param"));
        let c = yaml.get("a").unwrap().get("c").unwrap();
        assert!(matches!(&c.value, NodeValue::Tagged(t, _) if t == "!Foo"));
    }

    /// Found by review while fuzzing: `- - - …` 40,000 levels deep overflowed the stack
    /// (`icmp-guard audit` aborted) because the tree was converted and freed recursively.
    #[test]
    fn deep_nesting_is_a_syntax_error_not_a_stack_overflow() {
        let deep = format!("Resources:\n{}x\n", "- ".repeat(40_000));
        let e = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || parse(&deep).unwrap_err())
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(e.line, 2);
        assert!(
            e.message.contains("nest more than 64 levels"),
            "{}",
            e.message
        );
    }

    #[test]
    fn errors_have_lines() {
        let e = parse("{\n  \"a\": 1,\n  \"b\": \n}\n").unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.starts_with("invalid JSON"), "{}", e.message);
        let e = parse("a: [1,\nb: 2\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.starts_with("invalid YAML"), "{}", e.message);
    }
}
