//! `terraform show -json` output: a plan (`resource_changes`, `planned_values`) or a state
//! (`values`).
//!
//! In a plan, values known only after apply are absent from `after` and marked `true` in
//! `after_unknown` (which mirrors `after`'s shape). They are overlaid as [`Value::Unknown`], so
//! an ingress rule whose CIDR comes from another resource is reported as unknown, not passed.

use super::{
    document::{Node, NodeValue},
    model::{Direction, ReadOutcome},
    terraform::{self, RuleSite},
    value::Value,
};

const SHAPE_HINT: &str = "expected the JSON printed by `terraform show -json PLANFILE`";

pub fn is_plan(doc: &Node) -> bool {
    doc.get("format_version").is_some()
        && (doc.get("resource_changes").is_some()
            || doc.get("planned_values").is_some()
            || doc.get("values").is_some())
}

pub fn read(file: &str, doc: &Node) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    if let Some(changes) = doc.get("resource_changes") {
        let Some(changes) = changes.as_seq() else {
            out.error(
                file,
                changes.line,
                format!("`resource_changes` is {}, expected a list", changes.kind()),
                SHAPE_HINT,
            );
            return out;
        };
        for change in changes {
            read_change(file, change, &mut out);
        }
        return out;
    }
    // No resource_changes: a saved state or an older plan; walk the module tree.
    match doc.get("planned_values").or_else(|| doc.get("values")) {
        Some(values) => match values.get("root_module") {
            Some(root) => read_module(file, root, &mut out),
            None => out.error(
                file,
                values.line,
                "no `root_module` in the planned values".into(),
                SHAPE_HINT,
            ),
        },
        None => out.error(
            file,
            doc.line,
            "no `resource_changes`, `planned_values` or `values`".into(),
            SHAPE_HINT,
        ),
    }
    out
}

fn read_change(file: &str, change: &Node, out: &mut ReadOutcome) {
    let (Some(address), Some(rtype)) = (
        change.get("address").and_then(Node::as_str),
        change.get("type").and_then(Node::as_str),
    ) else {
        out.error(
            file,
            change.line,
            "resource change without `address` and `type`".into(),
            SHAPE_HINT,
        );
        return;
    };
    if !terraform::is_audited_type(rtype) {
        return;
    }
    if change.get("mode").and_then(Node::as_str) == Some("data") {
        return;
    }
    let Some(detail) = change.get("change") else {
        out.error(
            file,
            change.line,
            format!("{address} has no `change`"),
            SHAPE_HINT,
        );
        return;
    };
    let after = match detail.get("after") {
        // Deleted: nothing will be left to audit.
        None => return,
        Some(n) if n.value == NodeValue::Null => return,
        Some(n) => n,
    };
    let values = overlay_unknown(after, detail.get("after_unknown"));
    read_values(file, address, rtype, change.line, &values, out);
}

fn read_module(file: &str, module: &Node, out: &mut ReadOutcome) {
    for resource in module
        .get("resources")
        .and_then(Node::as_seq)
        .unwrap_or_default()
    {
        let (Some(address), Some(rtype), Some(values)) = (
            resource.get("address").and_then(Node::as_str),
            resource.get("type").and_then(Node::as_str),
            resource.get("values"),
        ) else {
            continue;
        };
        if terraform::is_audited_type(rtype)
            && resource.get("mode").and_then(Node::as_str) != Some("data")
        {
            read_values(
                file,
                address,
                rtype,
                resource.line,
                &Value::from_node(values),
                out,
            );
        }
    }
    for child in module
        .get("child_modules")
        .and_then(Node::as_seq)
        .unwrap_or_default()
    {
        read_module(file, child, out);
    }
}

fn read_values(
    file: &str,
    address: &str,
    rtype: &str,
    line: usize,
    values: &Value,
    out: &mut ReadOutcome,
) {
    let site = RuleSite {
        file,
        address,
        resource_type: rtype,
        from_plan: true,
        path: String::new(),
        direction: Direction::Ingress,
        line,
    };
    terraform::read_resource(site, values, &|_| line, out);
}

/// `after` with every place `after_unknown` marks `true` replaced by an unknown value.
fn overlay_unknown(after: &Node, unknown: Option<&Node>) -> Value {
    const WHY: &str = "known only after apply (after_unknown in the plan)";
    match (unknown.map(|u| &u.value), &after.value) {
        (Some(NodeValue::Bool(true)), _) => Value::Unknown(WHY.into()),
        (Some(NodeValue::Map(marks)), NodeValue::Map(entries)) => {
            let mut out: Vec<(String, Value)> = entries
                .iter()
                .map(|(k, v)| {
                    let mark = marks.iter().find(|(mk, _)| mk == k).map(|(_, m)| m);
                    (k.clone(), overlay_unknown(v, mark))
                })
                .collect();
            // Keys that are unknown are absent from `after` altogether.
            for (k, m) in marks {
                if m.value == NodeValue::Bool(true) && !entries.iter().any(|(ek, _)| ek == k) {
                    out.push((k.clone(), Value::Unknown(WHY.into())));
                }
            }
            Value::Map(out)
        }
        (Some(NodeValue::Seq(marks)), NodeValue::Seq(items)) => Value::List(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| overlay_unknown(v, marks.get(i)))
                .collect(),
        ),
        _ => Value::from_node(after),
    }
}
