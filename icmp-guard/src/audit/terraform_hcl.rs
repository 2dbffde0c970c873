//! Terraform configuration (`.tf` files), parsed with hcl-edit, which keeps byte spans so every
//! rule gets a line.
//!
//! Expressions are evaluated as far as the configuration alone allows: literals, `var.x` from the
//! variable's `default` (or from `terraform.tfvars` / `*.auto.tfvars` beside the files), `local.x`,
//! string templates, `-1`, conditionals with a known condition, `tolist`/`toset`/`concat`, and
//! `dynamic "ingress"` blocks over a known collection. Anything else (`aws_x.y.id`, `data.…`,
//! `module.…`, other functions, `for` expressions) becomes [`Value::Unknown`] with the reason.

use std::{cell::Cell, collections::HashMap, rc::Rc};

use hcl_edit::{
    Span,
    expr::{Expression, ObjectKey, TraversalOperator, UnaryOperator},
    structure::{Block, Body},
    template::{Element, Template},
};

use super::{
    model::{Direction, InputError, ReadOutcome},
    terraform::{self, RuleSite},
    value::Value,
};

const MAX_DEPTH: usize = 32;
/// Steps of evaluation one file may take. Locals can name each other many times over
/// (`a = [local.b, local.b]`, `b = [local.c, local.c]`, …), so the work is not bounded by the
/// file's size; past this budget every value still to evaluate is unknown.
pub const EVAL_BUDGET: u32 = 200_000;
/// Longest string a template may build.
pub const MAX_TEXT: usize = 64 * 1024;
/// Copying text costs a step per this many bytes.
const BYTES_PER_STEP: usize = 256;
const OUT_OF_BUDGET: &str =
    "the expressions refer to each other too many times to be evaluated statically";

/// What one Terraform module (one directory) declares that expressions can refer to.
#[derive(Debug, Default, Clone)]
pub struct ModuleScope {
    /// Variable values: from tfvars, else the default, else unknown.
    pub variables: HashMap<String, Value>,
    pub locals: HashMap<String, Expression>,
}

impl ModuleScope {
    /// Adds `variable` and `locals` blocks of one file.
    pub fn add_declarations(&mut self, body: &Body) {
        let empty = ModuleScope::default();
        for block in body.blocks() {
            match (block.ident.as_str(), block.labels.first()) {
                ("variable", Some(name)) => {
                    let value = match block.body.get_attribute("default") {
                        // Defaults cannot refer to anything, so an empty scope is enough.
                        Some(attr) => Evaluator::new(&empty).eval(&attr.value, 0),
                        None => Value::Unknown(format!(
                            "var.{} has no default; its value is given at plan time",
                            name.as_str()
                        )),
                    };
                    self.variables
                        .entry(name.as_str().to_string())
                        .or_insert(value);
                }
                ("locals", _) => {
                    for attr in block.body.attributes() {
                        self.locals
                            .insert(attr.key.as_str().to_string(), attr.value.clone());
                    }
                }
                _ => {}
            }
        }
    }

    /// Applies a `.tfvars` file: its values win over defaults.
    pub fn add_tfvars(&mut self, body: &Body) {
        let empty = ModuleScope::default();
        for attr in body.attributes() {
            let value = Evaluator::new(&empty).eval(&attr.value, 0);
            self.variables.insert(attr.key.as_str().to_string(), value);
        }
    }
}

/// Parses a `.tf` or `.tfvars` file.
pub fn parse(file: &str, text: &str) -> Result<Body, InputError> {
    hcl_edit::parser::parse_body(text).map_err(|e| InputError {
        file: file.to_string(),
        line: e.location().line(),
        column: e.location().column(),
        message: format!("invalid HCL: {}", e.message()),
        hint: "fix the syntax (`terraform validate` shows the same error)".into(),
    })
}

/// Whether a parsed body looks like Terraform configuration.
pub fn is_terraform(body: &Body) -> bool {
    body.blocks().any(|b| {
        matches!(
            b.ident.as_str(),
            "resource" | "variable" | "provider" | "terraform" | "module" | "data" | "locals"
        )
    })
}

/// Byte offset → 1-based line.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex(starts)
    }

    fn line(&self, offset: Option<std::ops::Range<usize>>) -> usize {
        match offset {
            Some(r) => self.0.partition_point(|s| *s <= r.start),
            None => 0,
        }
    }
}

/// Reads the security-group resources of one file.
pub fn read(file: &str, text: &str, body: &Body, scope: &ModuleScope) -> ReadOutcome {
    let mut out = ReadOutcome::default();
    let lines = LineIndex::new(text);
    let eval = Evaluator::new(scope);
    for block in body.blocks() {
        if block.ident.as_str() != "resource" {
            continue;
        }
        let (Some(rtype), Some(name)) = (block.labels.first(), block.labels.get(1)) else {
            out.error(
                file,
                lines.line(block.span()),
                "a `resource` block needs two labels: type and name".into(),
                "write it as resource \"aws_security_group\" \"name\" { … }",
            );
            continue;
        };
        let rtype = rtype.as_str();
        if !terraform::is_audited_type(rtype) {
            continue;
        }
        let address = format!("{rtype}.{}", name.as_str());
        let block_line = lines.line(block.span());
        let site = RuleSite {
            file,
            address: &address,
            resource_type: rtype,
            from_plan: false,
            path: String::new(),
            direction: Direction::Ingress,
            line: block_line,
        };
        if rtype == terraform::SECURITY_GROUP {
            read_security_group(&site, block, &eval, &lines, &mut out);
        } else {
            let values = eval.body_values(&block.body, 0);
            let line_of = |attr: &str| {
                block
                    .body
                    .get_attribute(attr)
                    .map(|a| lines.line(a.span()))
                    .unwrap_or(block_line)
            };
            terraform::read_resource(site, &values, &line_of, &mut out);
        }
    }
    out
}

/// `aws_security_group`: `ingress`/`egress` as blocks, as `dynamic` blocks, or as an attribute
/// (`ingress = [ { … } ]`).
fn read_security_group(
    site: &RuleSite,
    block: &Block,
    eval: &Evaluator,
    lines: &LineIndex,
    out: &mut ReadOutcome,
) {
    for (kind, direction) in [
        ("ingress", Direction::Ingress),
        ("egress", Direction::Egress),
    ] {
        let mut index = 0;
        let sub_site = |index: usize, line: usize| RuleSite {
            file: site.file,
            address: site.address,
            resource_type: site.resource_type,
            from_plan: false,
            path: format!("{kind}[{index}]"),
            direction,
            line,
        };
        for nested in block.body.blocks() {
            let ident = nested.ident.as_str();
            let is_dynamic =
                ident == "dynamic" && nested.labels.first().map(|l| l.as_str()) == Some(kind);
            if ident != kind && !is_dynamic {
                continue;
            }
            let line = lines.line(nested.span());
            if ident == kind {
                let values = eval.body_values(&nested.body, 0);
                let line_of = |attr: &str| {
                    nested
                        .body
                        .get_attribute(attr)
                        .map(|a| lines.line(a.span()))
                        .unwrap_or(line)
                };
                terraform::read_group_style_rule(&sub_site(index, line), &values, &line_of, out);
                index += 1;
                continue;
            }
            // dynamic "ingress" { for_each = …; iterator = …; content { … } }
            let iterator = nested
                .body
                .get_attribute("iterator")
                .and_then(|a| traversal_root(&a.value))
                .unwrap_or(kind)
                .to_string();
            let Some(content) = nested.body.get_blocks("content").next() else {
                out.error(
                    site.file,
                    line,
                    format!(
                        "dynamic \"{kind}\" in {} has no content block",
                        site.address
                    ),
                    "add content { … } with the rule's attributes",
                );
                continue;
            };
            let collection = nested
                .body
                .get_attribute("for_each")
                .map(|a| eval.eval(&a.value, 0))
                .unwrap_or_else(|| Value::Unknown("dynamic block without for_each".into()));
            let items: Vec<(Value, Value)> = match collection {
                Value::List(items) => items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (Value::Int(i as i64), v))
                    .collect(),
                Value::Map(entries) => entries
                    .into_iter()
                    .map(|(k, v)| (Value::Str(k), v))
                    .collect(),
                Value::Unknown(why) => {
                    let values = unreadable_rule(format!("dynamic \"{kind}\" for_each: {why}"));
                    let line_of = |_: &str| line;
                    terraform::read_group_style_rule(
                        &sub_site(index, line),
                        &values,
                        &line_of,
                        out,
                    );
                    index += 1;
                    continue;
                }
                _ => vec![],
            };
            for (key, value) in items {
                let mut bound = eval.clone();
                bound.bindings.insert(
                    iterator.clone(),
                    Value::Map(vec![("key".into(), key), ("value".into(), value)]),
                );
                let values = bound.body_values(&content.body, 0);
                let line_of = |attr: &str| {
                    content
                        .body
                        .get_attribute(attr)
                        .map(|a| lines.line(a.span()))
                        .unwrap_or(line)
                };
                terraform::read_group_style_rule(&sub_site(index, line), &values, &line_of, out);
                index += 1;
            }
        }
        // Attributes-as-blocks: `ingress = [ { … } ]`.
        if let Some(attr) = block.body.get_attribute(kind) {
            let line = lines.line(attr.span());
            match eval.eval(&attr.value, 0) {
                Value::List(items) => {
                    for item in items {
                        let line_of = |_: &str| line;
                        terraform::read_group_style_rule(
                            &sub_site(index, line),
                            &item,
                            &line_of,
                            out,
                        );
                        index += 1;
                    }
                }
                Value::Unknown(why) => {
                    let values = unreadable_rule(format!("{kind}: {why}"));
                    let line_of = |_: &str| line;
                    terraform::read_group_style_rule(
                        &sub_site(index, line),
                        &values,
                        &line_of,
                        out,
                    );
                }
                other => out.error(
                    site.file,
                    line,
                    format!(
                        "`{kind}` of {} is {}, expected a list of objects",
                        site.address,
                        other.kind()
                    ),
                    "write it as ingress { … } blocks",
                ),
            }
        }
    }
}

/// The name an `iterator = name` attribute gives.
fn traversal_root(expr: &Expression) -> Option<&str> {
    match expr {
        Expression::Variable(v) => Some(v.as_str()),
        _ => None,
    }
}

#[derive(Clone)]
struct Evaluator<'a> {
    scope: &'a ModuleScope,
    /// Iterator variables of `dynamic` blocks.
    bindings: HashMap<String, Value>,
    /// What is left of [`EVAL_BUDGET`], shared by the copies made for `dynamic` blocks.
    fuel: Rc<Cell<u32>>,
}

impl<'a> Evaluator<'a> {
    fn new(scope: &'a ModuleScope) -> Self {
        Evaluator {
            scope,
            bindings: HashMap::new(),
            fuel: Rc::new(Cell::new(EVAL_BUDGET)),
        }
    }

    /// A copy of a stored value (a variable, an iterator), paid for by its size: a long default
    /// named many times would otherwise be copied for free each time.
    fn copy(&self, v: &Value) -> Value {
        if self.spend(v.copy_cost(BYTES_PER_STEP)) {
            v.clone()
        } else {
            Value::Unknown(OUT_OF_BUDGET.into())
        }
    }

    /// Takes `n` steps of the budget; false when fewer were left.
    fn spend(&self, n: usize) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let left = self.fuel.get();
        self.fuel.set(left.saturating_sub(n));
        left >= n
    }

    /// The attributes of a block body as a map (nested blocks are not rule attributes).
    fn body_values(&self, body: &Body, depth: usize) -> Value {
        Value::Map(
            body.attributes()
                .map(|a| (a.key.as_str().to_string(), self.eval(&a.value, depth + 1)))
                .collect(),
        )
    }

    fn eval(&self, expr: &Expression, depth: usize) -> Value {
        if depth > MAX_DEPTH {
            return Value::Unknown("expression nested too deeply to evaluate".into());
        }
        if !self.spend(1) {
            return Value::Unknown(OUT_OF_BUDGET.into());
        }
        match expr {
            Expression::Null(_) => Value::Null,
            Expression::Bool(b) => Value::Bool(*b.value()),
            Expression::Number(n) => {
                let n = n.value();
                match n.as_i64() {
                    Some(i) => Value::Int(i),
                    None => n.as_f64().map_or(Value::Null, Value::Float),
                }
            }
            Expression::String(s) if !self.spend(s.value().len() / BYTES_PER_STEP) => {
                Value::Unknown(OUT_OF_BUDGET.into())
            }
            Expression::String(s) => Value::Str(s.value().clone()),
            Expression::Array(items) => {
                Value::List(items.iter().map(|e| self.eval(e, depth + 1)).collect())
            }
            Expression::Object(object) => {
                let mut entries = Vec::new();
                for (key, value) in object.iter() {
                    let key = match key {
                        ObjectKey::Ident(i) => i.as_str().to_string(),
                        ObjectKey::Expression(e) => match self.eval(e, depth + 1).as_text() {
                            Some(k) => k,
                            None => return Value::Unknown("object key known only at apply".into()),
                        },
                    };
                    entries.push((key, self.eval(value.expr(), depth + 1)));
                }
                Value::Map(entries)
            }
            Expression::StringTemplate(t) => self.eval_template(t, depth),
            Expression::HeredocTemplate(h) => self.eval_template(&h.template, depth),
            Expression::Parenthesis(p) => self.eval(p.inner(), depth + 1),
            Expression::Variable(v) => match self.bindings.get(v.as_str()) {
                Some(bound) => self.copy(bound),
                None => Value::Unknown(format!("`{}` is known only at plan time", v.as_str())),
            },
            Expression::Traversal(t) => self.eval_traversal(&t.expr, &t.operators, depth),
            Expression::UnaryOp(op) => {
                let inner = self.eval(&op.expr, depth + 1);
                match (op.operator.value(), inner) {
                    (UnaryOperator::Neg, Value::Int(i)) => Value::Int(-i),
                    (UnaryOperator::Neg, Value::Float(f)) => Value::Float(-f),
                    (UnaryOperator::Not, Value::Bool(b)) => Value::Bool(!b),
                    (_, v @ Value::Unknown(_)) => v,
                    (_, other) => Value::Unknown(format!("operator on {}", other.kind())),
                }
            }
            Expression::Conditional(c) => match self.eval(&c.cond_expr, depth + 1) {
                Value::Bool(true) => self.eval(&c.true_expr, depth + 1),
                Value::Bool(false) => self.eval(&c.false_expr, depth + 1),
                cond => {
                    let (a, b) = (
                        self.eval(&c.true_expr, depth + 1),
                        self.eval(&c.false_expr, depth + 1),
                    );
                    if a == b {
                        a
                    } else {
                        let why = match cond {
                            Value::Unknown(why) => why,
                            other => format!("condition is {}", other.kind()),
                        };
                        Value::Unknown(format!("conditional expression: {why}"))
                    }
                }
            },
            Expression::FuncCall(call) => {
                let name = call.name.name.as_str();
                let args: Vec<Value> = call.args.iter().map(|a| self.eval(a, depth + 1)).collect();
                match (name, args.as_slice()) {
                    ("tolist" | "toset" | "tostring" | "tonumber", [v]) => v.clone(),
                    ("concat", lists) => {
                        let mut all = Vec::new();
                        for l in lists {
                            match l {
                                Value::List(items) => all.extend(items.iter().cloned()),
                                Value::Unknown(why) => return Value::Unknown(why.clone()),
                                other => {
                                    return Value::Unknown(format!("concat of {}", other.kind()));
                                }
                            }
                        }
                        Value::List(all)
                    }
                    _ => Value::Unknown(format!("{name}(…) is not evaluated statically")),
                }
            }
            Expression::BinaryOp(_) => {
                Value::Unknown("an operator expression is not evaluated statically".into())
            }
            Expression::ForExpr(_) => {
                Value::Unknown("a `for` expression is not evaluated statically".into())
            }
        }
    }

    fn eval_template(&self, template: &Template, depth: usize) -> Value {
        let mut text = String::new();
        for element in template.iter() {
            match element {
                Element::Literal(l) => text.push_str(l.value()),
                Element::Interpolation(i) => match self.eval(&i.expr, depth + 1) {
                    v @ Value::Unknown(_) => return v,
                    v => match v.as_text() {
                        Some(t) => text.push_str(&t),
                        None => return Value::Unknown(format!("interpolation of {}", v.kind())),
                    },
                },
                Element::Directive(_) => {
                    return Value::Unknown("a template directive is not evaluated".into());
                }
            }
            if text.len() > MAX_TEXT {
                break;
            }
        }
        if text.len() > MAX_TEXT {
            return Value::Unknown(format!(
                "a string template builds more than the {MAX_TEXT} bytes evaluated statically"
            ));
        }
        if !self.spend(text.len() / BYTES_PER_STEP) {
            return Value::Unknown(OUT_OF_BUDGET.into());
        }
        Value::Str(text)
    }

    fn eval_traversal(
        &self,
        base: &Expression,
        operators: &[hcl_edit::Decorated<TraversalOperator>],
        depth: usize,
    ) -> Value {
        let attr = |i: usize| match operators.get(i).map(|o| o.value()) {
            Some(TraversalOperator::GetAttr(name)) => Some(name.as_str()),
            _ => None,
        };
        let (mut value, rest) = match base {
            Expression::Variable(root) => match (root.as_str(), attr(0)) {
                ("var", Some(name)) => (
                    match self.scope.variables.get(name) {
                        Some(v) => self.copy(v),
                        None => {
                            Value::Unknown(format!("var.{name} is not declared in this module"))
                        }
                    },
                    1,
                ),
                ("local", Some(name)) => (
                    match self.scope.locals.get(name) {
                        Some(e) => self.eval(e, depth + 1),
                        None => Value::Unknown(format!("local.{name} is not declared")),
                    },
                    1,
                ),
                (root, _) if self.bindings.contains_key(root) => {
                    (self.copy(&self.bindings[root]), 0)
                }
                (root, _) => {
                    let mut what = root.to_string();
                    for name in (0..operators.len()).map_while(attr) {
                        what.push('.');
                        what.push_str(name);
                    }
                    return Value::Unknown(format!("{what} is known only after apply"));
                }
            },
            other => (self.eval(other, depth + 1), 0),
        };
        for op in &operators[rest..] {
            value = match (op.value(), value) {
                (_, v @ Value::Unknown(_)) => return v,
                (TraversalOperator::GetAttr(name), v) => match v.get(name.as_str()) {
                    Some(found) => found.clone(),
                    None => {
                        return Value::Unknown(format!("attribute `{}` not found", name.as_str()));
                    }
                },
                (TraversalOperator::Index(index), v) => {
                    let index = self.eval(index, depth + 1);
                    match (&v, &index) {
                        (Value::List(items), Value::Int(i)) => {
                            match usize::try_from(*i).ok().and_then(|i| items.get(i)) {
                                Some(found) => found.clone(),
                                None => return Value::Unknown(format!("index {i} out of range")),
                            }
                        }
                        (Value::Map(_), _) => {
                            match index.as_text().and_then(|k| v.get(&k).cloned()) {
                                Some(found) => found,
                                None => return Value::Unknown("key not found".into()),
                            }
                        }
                        _ => return Value::Unknown("index into an unknown value".into()),
                    }
                }
                (TraversalOperator::LegacyIndex(i), Value::List(items)) => {
                    match usize::try_from(*i.value()).ok().and_then(|i| items.get(i)) {
                        Some(found) => found.clone(),
                        None => return Value::Unknown("index out of range".into()),
                    }
                }
                _ => return Value::Unknown("splat expressions are not evaluated".into()),
            };
        }
        value
    }
}

/// Stands in for a rule whose contents cannot be evaluated statically: its protocol and its
/// sources are unknown, so it is reported as unknown rather than passed.
fn unreadable_rule(why: String) -> Value {
    let unknown = Value::Unknown(why);
    Value::Map(vec![
        ("protocol".into(), unknown.clone()),
        ("cidr_blocks".into(), unknown),
    ])
}
