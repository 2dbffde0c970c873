//! Reading YAML while keeping every value's line, and collecting every problem instead of stopping
//! at the first.
//!
//! The KubeArmor policy reader and the agent configuration reader both walk saphyr's marked nodes
//! through these helpers, so that their errors read the same way: `file:line: field: reason`.
//! A helper that finds a problem records it in [`Diag`] and returns `None`; the caller carries on
//! with the next field, which is how one load reports all its errors at once.
//!
//! Conventions shared by both readers:
//! - A key present with an empty or `null` value counts as absent, as it does for `kubectl`.
//! - Strings must be YAML strings: `severity: "4"` is not a number and `name: 123` is not a
//!   string. The Kubernetes API server rejects both; accepting them here would let a file load in
//!   icmp-guard that KubeArmor users could never apply.
//! - Tags such as `!!str` are looked through.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
};

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, ScanError, YamlData, YamlLoader};
use saphyr_parser::{Event, Parser, SpannedEventReceiver};

use super::{
    Origin,
    diagnostics::{PolicyError, PolicyWarning},
};

pub(crate) type Node<'i> = MarkedYaml<'i>;

/// Errors and warnings of one load, and the file being read.
pub(crate) struct Diag<'f> {
    file: &'f Path,
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<PolicyWarning>,
}

impl<'f> Diag<'f> {
    pub fn new(file: &'f Path) -> Self {
        Diag {
            file,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn origin(&self, node: &Node<'_>) -> Origin {
        Origin {
            file: self.file.to_path_buf(),
            line: node.span.start.line(),
        }
    }

    pub fn error(&mut self, node: &Node<'_>, field: &str, reason: impl Into<String>) {
        let origin = self.origin(node);
        self.errors.push(PolicyError::new(origin, field, reason));
    }

    pub fn warn(&mut self, node: &Node<'_>, field: &str, message: impl Into<String>) {
        let origin = self.origin(node);
        self.warnings
            .push(PolicyWarning::new(origin, field, message));
    }
}

/// How deep mappings and lists may nest in one document. Policies, configs and templates nest
/// a dozen levels at most; deeper documents are refused because saphyr builds, and Rust frees,
/// the tree recursively: `- - - …` nests a level every two bytes and overflowed the stack.
pub(crate) const MAX_NESTING: usize = 64;

/// Every document of a YAML stream, as saphyr's `load_from_str` gives them, but refusing
/// documents that nest deeper than [`MAX_NESTING`].
///
/// The events are fed to saphyr's loader here rather than by `Parser::load`, which recurses once
/// per level before any limit could apply. What `load` does besides is kept: anchors belong to
/// one document, so an alias to another document's anchor is an error as it is there.
pub(crate) fn load_nested<'i, N: LoadableYamlNode<'i>>(text: &'i str) -> Result<Vec<N>, ScanError> {
    let mut loader = YamlLoader::<N>::default();
    let mut depth = 0usize;
    let mut anchors = HashSet::new();
    for event in Parser::new_from_str(text) {
        let (ev, span) = event?;
        match &ev {
            Event::DocumentStart(_) => anchors.clear(),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(ScanError::new(
                        span.start,
                        format!("lists and mappings nest more than {MAX_NESTING} levels deep here"),
                    ));
                }
                anchors.insert(*anchor);
            }
            Event::Scalar(_, _, anchor, _) => {
                anchors.insert(*anchor);
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            Event::Alias(anchor) if !anchors.contains(anchor) => {
                return Err(ScanError::new_str(
                    span.start,
                    "while parsing node, found unknown anchor",
                ));
            }
            _ => {}
        }
        loader.on_event(ev, span);
        if let Some(e) = loader.error() {
            return Err(e.clone());
        }
    }
    Ok(loader.into_documents())
}

/// Parses every document of a YAML stream. A syntax error fails the whole file: saphyr stops at
/// the first one, and a document after a syntax error cannot be trusted anyway.
pub(crate) fn load_documents<'i>(text: &'i str, file: &Path) -> Result<Vec<Node<'i>>, PolicyError> {
    let mut docs = load_nested::<Node<'i>>(text).map_err(|e| {
        PolicyError::new(
            Origin {
                file: file.to_path_buf(),
                line: e.marker().line(),
            },
            "",
            format!(
                "invalid YAML at column {}: {}; fix the syntax here (indent with spaces, \
                 quote values that contain `: ` or ` #`)",
                e.marker().col() + 1,
                e.info()
            ),
        )
    })?;
    for doc in &mut docs {
        give_tagged_values_their_tags_span(doc);
    }
    Ok(docs)
}

/// saphyr gives the value under a tag (`!!str 5`, `!Ref x`) no position of its own (line 0), and
/// every reader looks through tags ([`plain`]), so an error about such a value would have no
/// line. The value takes the tag's position instead. (Found by fuzzing.)
fn give_tagged_values_their_tags_span(node: &mut Node<'_>) {
    let span = node.span;
    match &mut node.data {
        YamlData::Tagged(_, inner) => {
            if inner.span.start.line() == 0 {
                inner.span = span;
            }
            give_tagged_values_their_tags_span(inner);
        }
        YamlData::Sequence(items) => items
            .iter_mut()
            .for_each(give_tagged_values_their_tags_span),
        YamlData::Mapping(m) => m.values_mut().for_each(give_tagged_values_their_tags_span),
        _ => {}
    }
}

/// The node itself, or the node a tag such as `!!str` is attached to.
pub(crate) fn plain<'a, 'i>(mut node: &'a Node<'i>) -> &'a Node<'i> {
    while let YamlData::Tagged(_, inner) = &node.data {
        node = inner;
    }
    node
}

pub(crate) fn is_null(node: &Node<'_>) -> bool {
    matches!(plain(node).data, YamlData::Value(Scalar::Null))
}

/// What a node is, for "must be a string, found a list" messages.
pub(crate) fn describe(node: &Node<'_>) -> String {
    match &plain(node).data {
        YamlData::Mapping(_) => "a mapping".into(),
        YamlData::Sequence(_) => "a list".into(),
        YamlData::Value(Scalar::Null) => "an empty value".into(),
        YamlData::Value(Scalar::Boolean(b)) => format!("the boolean {b}"),
        YamlData::Value(Scalar::Integer(i)) => format!("the number {i}"),
        YamlData::Value(Scalar::FloatingPoint(x)) => format!("the number {x}"),
        YamlData::Value(Scalar::String(s)) => format!("the string \"{s}\""),
        _ => "a value that cannot be read".into(),
    }
}

/// `parent.key`, or `key` at the top.
pub(crate) fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[i]`.
pub(crate) fn item(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// One `key: value` of a mapping whose key is a string.
pub(crate) struct Entry<'a, 'i> {
    pub key: &'a str,
    pub key_node: &'a Node<'i>,
    pub value: &'a Node<'i>,
}

/// A YAML mapping with string keys, and its field path.
pub(crate) struct Map<'a, 'i> {
    node: &'a Node<'i>,
    path: String,
    entries: Vec<Entry<'a, 'i>>,
}

impl<'a, 'i> Map<'a, 'i> {
    /// Reads `node` as a mapping; records an error and returns `None` if it is something else.
    /// Keys that are not strings are reported and left out.
    pub fn read(diag: &mut Diag<'_>, node: &'a Node<'i>, path: &str) -> Option<Self> {
        let node = plain(node);
        let YamlData::Mapping(m) = &node.data else {
            diag.error(
                node,
                path,
                format!(
                    "must be a mapping of `key: value` lines, found {}",
                    describe(node)
                ),
            );
            return None;
        };
        let mut entries = Vec::with_capacity(m.len());
        for (k, v) in m {
            match plain(k).data.as_str() {
                Some(key) => entries.push(Entry {
                    key,
                    key_node: k,
                    value: v,
                }),
                None => diag.error(
                    k,
                    path,
                    format!("keys must be strings, found {}; quote the key", describe(k)),
                ),
            }
        }
        Some(Map {
            node,
            path: path.to_string(),
            entries,
        })
    }

    pub fn node(&self) -> &'a Node<'i> {
        self.node
    }

    /// Field path of `key` in this mapping.
    pub fn field(&self, key: &str) -> String {
        child(&self.path, key)
    }

    pub fn entries(&self) -> &[Entry<'a, 'i>] {
        &self.entries
    }

    pub fn entry(&self, key: &str) -> Option<&Entry<'a, 'i>> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The value of `key`; `None` when absent or empty (`key:` / `key: null`).
    pub fn get(&self, key: &str) -> Option<&'a Node<'i>> {
        self.entry(key).map(|e| e.value).filter(|v| !is_null(v))
    }

    /// The value of `key`, or an error on this mapping's line saying it is required and `hint`.
    pub fn require(&self, diag: &mut Diag<'_>, key: &str, hint: &str) -> Option<&'a Node<'i>> {
        let v = self.get(key);
        if v.is_none() {
            let node = self.entry(key).map_or(self.node, |e| e.key_node);
            diag.error(node, &self.field(key), format!("is required; {hint}"));
        }
        v
    }

    /// Records an error for every key not in `allowed`, with a suggestion when it looks like a
    /// typo of an allowed one. Used where a misspelt key would silently change what a file means.
    pub fn reject_unknown(&self, diag: &mut Diag<'_>, allowed: &[&str]) {
        for e in &self.entries {
            if !allowed.contains(&e.key) {
                diag.error(
                    e.key_node,
                    &self.field(e.key),
                    format!("unknown key `{}`{}", e.key, suggestion(e.key, allowed)),
                );
            }
        }
    }

    pub fn string(&self, diag: &mut Diag<'_>, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|v| string(diag, v, &self.field(key)))
    }

    pub fn integer(&self, diag: &mut Diag<'_>, key: &str) -> Option<i64> {
        self.get(key)
            .and_then(|v| integer(diag, v, &self.field(key)))
    }

    pub fn boolean(&self, diag: &mut Diag<'_>, key: &str) -> Option<bool> {
        self.get(key)
            .and_then(|v| boolean(diag, v, &self.field(key)))
    }

    pub fn string_list(&self, diag: &mut Diag<'_>, key: &str) -> Option<Vec<String>> {
        self.get(key)
            .and_then(|v| string_list(diag, v, &self.field(key)))
    }

    pub fn string_map(&self, diag: &mut Diag<'_>, key: &str) -> Option<BTreeMap<String, String>> {
        self.get(key)
            .and_then(|v| string_map(diag, v, &self.field(key)))
    }

    pub fn sequence(&self, diag: &mut Diag<'_>, key: &str) -> Option<&'a [Node<'i>]> {
        self.get(key)
            .and_then(|v| sequence(diag, v, &self.field(key)))
    }
}

/// ` (did you mean `x`?); expected one of: a, b, c`
pub(crate) fn suggestion(key: &str, allowed: &[&str]) -> String {
    let close = allowed
        .iter()
        .filter(|a| a.eq_ignore_ascii_case(key) || edit_distance(a, key) <= 2)
        .min_by_key(|a| edit_distance(a, key));
    let mut s = String::new();
    if let Some(c) = close {
        s.push_str(&format!(" (did you mean `{c}`?)"));
    }
    s.push_str("; expected one of: ");
    s.push_str(&allowed.join(", "));
    s
}

/// Levenshtein distance, for typo suggestions on short keys.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(crate) fn string(diag: &mut Diag<'_>, node: &Node<'_>, field: &str) -> Option<String> {
    let n = plain(node);
    match &n.data {
        YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
        YamlData::Value(Scalar::Boolean(_))
        | YamlData::Value(Scalar::Integer(_))
        | YamlData::Value(Scalar::FloatingPoint(_)) => {
            diag.error(
                n,
                field,
                format!(
                    "must be a string, found {}; put it in quotes to make it one",
                    describe(n)
                ),
            );
            None
        }
        _ => {
            diag.error(n, field, format!("must be a string, found {}", describe(n)));
            None
        }
    }
}

pub(crate) fn integer(diag: &mut Diag<'_>, node: &Node<'_>, field: &str) -> Option<i64> {
    let n = plain(node);
    match &n.data {
        YamlData::Value(Scalar::Integer(i)) => Some(*i),
        _ => {
            diag.error(
                n,
                field,
                format!(
                    "must be a whole number without quotes, found {}",
                    describe(n)
                ),
            );
            None
        }
    }
}

pub(crate) fn boolean(diag: &mut Diag<'_>, node: &Node<'_>, field: &str) -> Option<bool> {
    let n = plain(node);
    match &n.data {
        YamlData::Value(Scalar::Boolean(b)) => Some(*b),
        _ => {
            diag.error(
                n,
                field,
                format!("must be true or false, found {}", describe(n)),
            );
            None
        }
    }
}

pub(crate) fn sequence<'a, 'i>(
    diag: &mut Diag<'_>,
    node: &'a Node<'i>,
    field: &str,
) -> Option<&'a [Node<'i>]> {
    let n = plain(node);
    match &n.data {
        YamlData::Sequence(items) => Some(items.as_slice()),
        _ => {
            diag.error(
                n,
                field,
                format!(
                    "must be a list (lines starting with `- `), found {}",
                    describe(n)
                ),
            );
            None
        }
    }
}

/// A list of strings; every bad item is reported with its index.
pub(crate) fn string_list(
    diag: &mut Diag<'_>,
    node: &Node<'_>,
    field: &str,
) -> Option<Vec<String>> {
    let items = sequence(diag, node, field)?;
    let before = diag.errors.len();
    let out: Vec<String> = items
        .iter()
        .enumerate()
        .filter_map(|(i, v)| string(diag, v, &item(field, i)))
        .collect();
    (diag.errors.len() == before).then_some(out)
}

/// A `key: value` mapping of strings, such as labels. Values must be YAML strings, as in
/// Kubernetes' `map[string]string`: `enabled: true` has to be written `enabled: "true"`.
pub(crate) fn string_map(
    diag: &mut Diag<'_>,
    node: &Node<'_>,
    field: &str,
) -> Option<BTreeMap<String, String>> {
    let map = Map::read(diag, node, field)?;
    let before = diag.errors.len();
    let mut out = BTreeMap::new();
    for e in map.entries() {
        let f = child(field, e.key);
        if e.key.is_empty() {
            diag.error(e.key_node, &f, "keys must not be empty");
            continue;
        }
        if is_null(e.value) {
            diag.error(
                e.value,
                &f,
                "has no value; write `\"\"` for an empty string, or remove the line",
            );
            continue;
        }
        if let Some(v) = string(diag, e.value, &f) {
            out.insert(e.key.to_string(), v);
        }
    }
    (diag.errors.len() == before).then_some(out)
}

/// Kubernetes' DNS-1123 label: lower-case letters, digits and `-`, starting and ending with a
/// letter or digit, at most 63 characters. Namespaces are such labels.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Kubernetes' DNS-1123 subdomain: dot-separated DNS labels, at most 253 characters. Object
/// names (of policies) are such subdomains.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("network", "netwrok"), 2);
        assert_eq!(edit_distance("matchProtocols", "matchProtocol"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn suggestion_names_the_close_key() {
        let s = suggestion("matchProtocol", &["matchProtocols", "action"]);
        assert!(s.contains("did you mean `matchProtocols`"), "{s}");
        let s = suggestion("zzzzzz", &["matchProtocols", "action"]);
        assert!(!s.contains("did you mean"), "{s}");
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_label("kube-system"));
        assert!(!is_dns_label("Kube"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("restrict-scanning-tools"));
        assert!(is_dns_subdomain("a.b-c"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("under_score"));
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_an_error_at_its_line() {
        let ok = format!("{}x\n", "- ".repeat(MAX_NESTING));
        assert!(load_documents(&ok, Path::new("t.yaml")).is_ok());
        // Deep enough to overflow a 2 MiB stack when built and freed recursively.
        for (deep, line) in [
            (format!("a: 1\nb:\n{}x\n", "- ".repeat(50_000)), 3),
            (
                format!("a: 1\nb: {}{}\n", "[".repeat(50_000), "]".repeat(50_000)),
                2,
            ),
        ] {
            let e = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || load_documents(&deep, Path::new("t.yaml")).unwrap_err())
                .unwrap()
                .join()
                .unwrap();
            assert_eq!(e.origin.line, line, "{e}");
            // Flow collections hit the scanner's own limit (255 levels) first.
            assert!(
                e.reason.contains("nest more than 64 levels")
                    || e.reason.contains("recursion limit exceeded"),
                "{e}"
            );
        }
    }

    #[test]
    fn an_alias_to_another_documents_anchor_is_an_error_as_in_saphyr() {
        assert!(load_documents("a: &x 1\nb: *x\n", Path::new("t.yaml")).is_ok());
        let e = load_documents("a: &x 1\n---\nb: *x\n", Path::new("t.yaml")).unwrap_err();
        assert!(e.reason.contains("unknown anchor"), "{e}");
        assert_eq!(e.origin.line, 3);
    }

    /// Found by fuzzing (`apiVersion: !Join 256`): the error had line 0.
    #[test]
    fn errors_about_tagged_values_have_the_tags_line() {
        let docs = load_documents("a: 1\nb: !Join 256\nc: !!str x\n", Path::new("t.yaml")).unwrap();
        let mut d = Diag::new(Path::new("t.yaml"));
        let m = Map::read(&mut d, &docs[0], "").unwrap();
        assert_eq!(m.string(&mut d, "b"), None);
        assert_eq!(d.errors.len(), 1);
        assert_eq!(d.errors[0].origin.line, 2, "{}", d.errors[0]);
        assert_eq!(m.string(&mut d, "c").as_deref(), Some("x"));
        assert_eq!(d.origin(plain(m.get("c").unwrap())).line, 3);
    }

    #[test]
    fn null_values_count_as_absent() {
        let docs = load_documents("a:\nb: ~\nc: x\n", Path::new("t.yaml")).unwrap();
        let mut d = Diag::new(Path::new("t.yaml"));
        let m = Map::read(&mut d, &docs[0], "").unwrap();
        assert!(m.get("a").is_none());
        assert!(m.get("b").is_none());
        assert_eq!(m.string(&mut d, "c").as_deref(), Some("x"));
        assert!(d.errors.is_empty());
    }
}
