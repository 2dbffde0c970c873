//! Policies as icmp-guard understands them, whatever file format they came from.
//!
//! A [`PolicySet`] is what the agent enforces: KubeArmor policies parsed by [`kubearmor`], or the
//! embedded default from [`default`]. It is compiled per workload into map entries by
//! `crate::compile`; the kernel never sees a rule, only the lookups prepared from it.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use icmp_guard_common::Class;
pub use icmp_guard_common::maps::Action;

/// Where something was written: file and 1-based line (0 when not known).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}", self.file.display(), self.line)
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    /// `KubeArmorNetworkPolicy` objects: the inbound ICMP guard's rules. Empty means the guard
    /// is off.
    pub network: Vec<network::NetworkPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Namespace of a `KubeArmorPolicy`; `None` for host policies.
    pub namespace: Option<String>,
    pub target: Target,
    pub rules: Vec<Rule>,
    pub origin: Origin,
}

/// Which processes a policy governs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `KubeArmorHostPolicy`: the host's processes that are in no workload, on nodes whose
    /// labels match.
    Host {
        node_selector: BTreeMap<String, String>,
    },
    /// `KubeArmorPolicy`: the workloads of `namespace` that the selector matches.
    Workloads(Selector),
}

/// `spec.selector` of a KubeArmorPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelExpression>,
}

/// `matchExpressions` item. KubeArmor accepts only the key `label`, whose values are `k=v`
/// strings matched against the workload's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelExpression {
    pub operator: LabelOperator,
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelOperator {
    In,
    NotIn,
}

/// One `matchProtocols` item, after inheritance and after names were mapped onto classes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Socket classes this rule covers (`all` covers every managed class).
    pub classes: Vec<Class>,
    /// The protocol name as written in the policy, for alerts and messages.
    pub protocol: String,
    /// Absolute executable paths; empty means any executable.
    pub sources: Vec<PathBuf>,
    pub action: Action,
    pub severity: Option<u8>,
    pub tags: Vec<String>,
    pub message: Option<String>,
    pub origin: Origin,
}

pub mod default;
pub mod diagnostics;
pub mod kubearmor;
pub mod network;
pub(crate) mod yaml;
