//! Errors and warnings found while reading policy and configuration files.
//!
//! Every diagnostic names the file and line, the field path as a user would write it
//! (`spec.network.matchProtocols[1].fromSource[0].path`) and what to do about it, so that an
//! operator can fix a file without reading icmp-guard's source.

use std::fmt;

use super::Origin;

/// One thing wrong with an input file. Loading is all-or-nothing: one of these anywhere means
/// nothing from any file is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// File and 1-based line; line 0 when the problem is with the file as a whole (unreadable,
    /// missing).
    pub origin: Origin,
    /// Path of the offending field, e.g. `spec.network.matchProtocols[0].protocol`; empty when the
    /// problem is not with one field (YAML syntax, I/O).
    pub field: String,
    pub reason: String,
}

impl PolicyError {
    pub fn new(origin: Origin, field: impl Into<String>, reason: impl Into<String>) -> Self {
        PolicyError {
            origin,
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.origin, &self.field, &self.reason)
    }
}

impl std::error::Error for PolicyError {}

/// Every error found in one load, in file order then line order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }
}

impl fmt::Display for PolicyErrors {
    /// One line per error: `file:line: field: reason`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        PolicyErrors(vec![e])
    }
}

impl<'a> IntoIterator for &'a PolicyErrors {
    type Item = &'a PolicyError;
    type IntoIter = std::slice::Iter<'a, PolicyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Something accepted but worth telling the operator: a section icmp-guard does not enforce, a
/// place where its meaning differs from KubeArmor's. Warnings never stop a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    pub origin: Origin,
    pub field: String,
    pub message: String,
}

impl PolicyWarning {
    pub fn new(origin: Origin, field: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyWarning {
            origin,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.origin, &self.field, &self.message)
    }
}

fn write_located(
    f: &mut fmt::Formatter<'_>,
    origin: &Origin,
    field: &str,
    text: &str,
) -> fmt::Result {
    if field.is_empty() {
        write!(f, "{origin}: {text}")
    } else {
        write!(f, "{origin}: {field}: {text}")
    }
}
