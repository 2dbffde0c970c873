//! Finding the inputs (files, directories, stdin) and telling which form each one is.
//!
//! The form comes from the content: `SecurityGroups`/`SecurityGroupRules` is AWS API output,
//! `AWSTemplateFormatVersion`/`Resources` a CloudFormation template, `format_version` with
//! `resource_changes`/`planned_values` a Terraform plan, and HCL with Terraform blocks is
//! Terraform configuration. The extension only decides which parser to try first (`.tf` is HCL,
//! `.json`/`.yaml` are not), and `--input-format` overrides detection.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
};

use hcl_edit::structure::Body;

use super::{
    cloudformation,
    document::{self, Node},
    model::InputError,
    terraform_hcl, terraform_plan,
};

/// How to read the inputs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputFormat {
    /// Detect from content and extension.
    #[default]
    Auto,
    /// `aws ec2 describe-security-groups` or `describe-security-group-rules` JSON.
    Aws,
    /// CloudFormation template, JSON or YAML.
    Cloudformation,
    /// Terraform configuration (.tf, HCL).
    Terraform,
    /// `terraform show -json` output.
    TerraformPlan,
}

/// One input's text and where it came from.
#[derive(Clone, Debug)]
pub struct Input {
    /// As shown in reports: the path as given or found, or `<stdin>`.
    pub name: String,
    /// `None` for stdin.
    pub path: Option<PathBuf>,
    pub text: String,
    /// Named on the command line (or stdin), rather than found in a directory: content that is
    /// not a supported form is then an error instead of being skipped.
    pub explicit: bool,
}

impl Input {
    pub fn from_text(name: &str, text: &str) -> Input {
        Input {
            name: name.to_string(),
            path: None,
            text: text.to_string(),
            explicit: true,
        }
    }

    fn extension(&self) -> String {
        self.path
            .as_ref()
            .and_then(|p| p.extension())
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase()
    }

    pub fn is_tfvars(&self) -> bool {
        self.extension() == "tfvars"
    }
}

/// What an input turned out to be.
pub enum Detected {
    Aws(Node),
    CloudFormation(Node),
    TerraformPlan(Node),
    Terraform(Body),
    /// `.tfvars`: variable values for the `.tf` files beside it.
    TfVars(Body),
    /// Found in a directory walk but not a supported form (e.g. package.json): skipped.
    Skipped(String),
}

impl Detected {
    pub fn format_name(&self) -> &'static str {
        match self {
            Detected::Aws(_) => "aws",
            Detected::CloudFormation(_) => "cloudformation",
            Detected::TerraformPlan(_) => "terraform-plan",
            Detected::Terraform(_) => "terraform",
            Detected::TfVars(_) => "tfvars",
            Detected::Skipped(_) => "skipped",
        }
    }
}

/// Extensions read when walking a directory.
const WALKED_EXTENSIONS: &[&str] = &["json", "yaml", "yml", "template", "tf", "tfvars"];

/// Expands the command-line paths. Errors are for paths that cannot be read at all.
pub fn collect(paths: &[PathBuf], stdin: &mut dyn Read) -> (Vec<Input>, Vec<InputError>) {
    let mut inputs = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            match stdin.read_to_string(&mut text) {
                Ok(_) => inputs.push(Input {
                    name: "<stdin>".into(),
                    path: None,
                    text,
                    explicit: true,
                }),
                Err(e) => errors.push(path_error("<stdin>", &format!("cannot read: {e}"))),
            }
            continue;
        }
        let name = path.display().to_string();
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => walk(path, &mut inputs, &mut errors),
            Ok(_) => read_file(path, true, &mut inputs, &mut errors),
            Err(e) => errors.push(path_error(
                &name,
                &format!("cannot read: {e}; check the path (use - for stdin)"),
            )),
        }
    }
    (inputs, errors)
}

fn path_error(name: &str, message: &str) -> InputError {
    InputError {
        file: name.to_string(),
        line: 0,
        column: 0,
        message: message.to_string(),
        hint: String::new(),
    }
}

fn read_file(path: &Path, explicit: bool, inputs: &mut Vec<Input>, errors: &mut Vec<InputError>) {
    let name = path.display().to_string();
    match fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => inputs.push(Input {
                name,
                path: Some(path.to_path_buf()),
                text,
                explicit,
            }),
            Err(_) => errors.push(path_error(
                &name,
                "not UTF-8 text; security-group definitions are JSON, YAML or HCL",
            )),
        },
        Err(e) => errors.push(path_error(&name, &format!("cannot read: {e}"))),
    }
}

/// Recurses in name order (stable output), skipping hidden directories and `.terraform`
/// (downloaded modules and providers are not the user's configuration).
fn walk(dir: &Path, inputs: &mut Vec<Input>, errors: &mut Vec<InputError>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(path_error(
                &dir.display().to_string(),
                &format!("cannot list directory: {e}"),
            ));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, inputs, errors);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| WALKED_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            read_file(&path, false, inputs, errors);
        }
    }
}

fn syntax_error(input: &Input, e: document::SyntaxError, hint: &str) -> InputError {
    InputError {
        file: input.name.clone(),
        line: e.line,
        column: e.column,
        message: e.message,
        hint: hint.to_string(),
    }
}

/// Parses an input and tells its form.
pub fn detect(input: &Input, forced: InputFormat) -> Result<Detected, InputError> {
    let ext = input.extension();
    let hcl_first = matches!(forced, InputFormat::Terraform)
        || (forced == InputFormat::Auto && matches!(ext.as_str(), "tf" | "tfvars"));
    if hcl_first {
        let body = terraform_hcl::parse(&input.name, &input.text)?;
        return Ok(if ext == "tfvars" {
            Detected::TfVars(body)
        } else {
            Detected::Terraform(body)
        });
    }
    let data_ext = matches!(ext.as_str(), "json" | "yaml" | "yml" | "template");
    let doc = match document::parse(&input.text) {
        Ok(doc) => doc,
        Err(e) => {
            // Unknown extension (or stdin): it may be HCL.
            let hcl = (forced == InputFormat::Auto
                && !data_ext
                && !document::looks_like_json(&input.text))
            .then(|| terraform_hcl::parse(&input.name, &input.text).ok())
            .flatten()
            .filter(terraform_hcl::is_terraform);
            if let Some(body) = hcl {
                return Ok(Detected::Terraform(body));
            }
            return Err(syntax_error(
                input,
                e,
                "fix the syntax; the other files are still audited",
            ));
        }
    };
    let wrong_form = |expected: &str| InputError {
        file: input.name.clone(),
        line: doc.line,
        column: 0,
        message: format!("this is not {expected}"),
        hint: "check the file, or let --input-format auto detect it".into(),
    };
    match forced {
        InputFormat::Aws => {
            return if is_aws(&doc) {
                Ok(Detected::Aws(doc))
            } else {
                Err(wrong_form(
                    "`aws ec2 describe-security-groups` / `describe-security-group-rules` output \
                     (no SecurityGroups or SecurityGroupRules list)",
                ))
            };
        }
        InputFormat::Cloudformation => {
            return if doc.as_map().is_some() {
                Ok(Detected::CloudFormation(doc))
            } else {
                Err(wrong_form("a CloudFormation template (expected a mapping)"))
            };
        }
        InputFormat::TerraformPlan => {
            return if terraform_plan::is_plan(&doc) {
                Ok(Detected::TerraformPlan(doc))
            } else {
                Err(wrong_form(
                    "`terraform show -json` output (no format_version with resource_changes or \
                     planned_values)",
                ))
            };
        }
        InputFormat::Auto | InputFormat::Terraform => {}
    }
    if is_aws(&doc) {
        Ok(Detected::Aws(doc))
    } else if terraform_plan::is_plan(&doc) {
        Ok(Detected::TerraformPlan(doc))
    } else if cloudformation::is_template(&doc) {
        Ok(Detected::CloudFormation(doc))
    } else if doc.as_map().is_none() && !data_ext {
        // YAML reads most HCL as one long string; try HCL before giving up.
        match terraform_hcl::parse(&input.name, &input.text) {
            Ok(body) if terraform_hcl::is_terraform(&body) => Ok(Detected::Terraform(body)),
            _ => unrecognized(input, &doc),
        }
    } else {
        unrecognized(input, &doc)
    }
}

fn unrecognized(input: &Input, doc: &Node) -> Result<Detected, InputError> {
    const WHAT: &str = "not a supported input: expected `aws ec2 describe-security-groups` / \
         `describe-security-group-rules` JSON, a CloudFormation template, Terraform .tf or \
         `terraform show -json` output";
    if input.explicit {
        Err(InputError {
            file: input.name.clone(),
            line: doc.line,
            column: 0,
            message: WHAT.into(),
            hint: "name the form with --input-format if detection is wrong".into(),
        })
    } else {
        Ok(Detected::Skipped(WHAT.into()))
    }
}

fn is_aws(doc: &Node) -> bool {
    if doc.get("SecurityGroups").is_some() || doc.get("SecurityGroupRules").is_some() {
        return true;
    }
    // `--query 'SecurityGroups[*]'` prints a bare list of groups.
    doc.as_seq().is_some_and(|items| {
        !items.is_empty()
            && items
                .iter()
                .all(|g| g.get("GroupId").is_some() && g.get("IpPermissions").is_some())
    })
}
