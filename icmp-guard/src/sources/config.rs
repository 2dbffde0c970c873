//! The agent configuration file: who this node is, which cgroups are workloads, and the default
//! postures KubeArmor keeps in its own configuration and namespace annotations.
//!
//! ```yaml
//! clusterName: prod-eu                # default "default"
//! hostName: node-1                    # default: the machine's hostname
//! nodeLabels:                         # matched by KubeArmorHostPolicy spec.nodeSelector
//!   role: edge
//! defaultNetworkPosture: block        # block | audit; default block
//! hostDefaultNetworkPosture: block    # block | audit; default block
//! postureScope: protocol              # protocol | workload; default protocol
//! alertsPerSecond: 10                 # per workload; 0 = unlimited; default 10
//! namespaces:                         # per-namespace posture, as KubeArmor's
//!   payments:                         # kubearmor-network-posture annotation
//!     networkPosture: audit
//! guard:                              # the inbound ICMP guard (KubeArmorNetworkPolicy)
//!   posture: block                    # block | audit; default block
//!   ratePerSecond: 100                # ICMP packets per second per allowed source; 0 = no limit
//!   burst: 200                        # packets a source may send at once; default 200
//!   alertsPerSecond: 10               # per-packet alerts; 0 = summaries only; default 10
//!   attach: auto                      # auto | native | generic | tc; default auto
//! workloads:
//!   - name: nginx
//!     cgroup: system.slice/nginx.service   # relative to the cgroup v2 mount, or absolute under it
//!     namespace: default                   # default "default"
//!     labels: {app: nginx}                 # matched by KubeArmorPolicy spec.selector
//!     pod: nginx-0                         # optional, for alerts
//!     container: nginx                     # optional, for alerts
//! ```
//!
//! `policies/agent-config.example.yaml` documents every key. Unknown keys are errors (a misspelt
//! `defaultNetworkPosture` must not silently leave the default in force), reported like policy
//! errors: `file:line: field: reason`, all of them at once.

use std::{
    collections::BTreeMap,
    fs,
    path::{Component, Path, PathBuf},
};

use crate::sources::policy::{
    Action, Origin,
    diagnostics::{PolicyError, PolicyErrors},
    yaml::{self, Diag, Map, Node},
};

/// What happens to a socket of a workload in allow-list mode that no rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Posture {
    /// Deny it (`EPERM`) and alert. icmp-guard's default: KubeArmor's code default is `audit`,
    /// but an allow-list that only audits protects nothing.
    #[default]
    Block,
    /// Let it through and alert.
    Audit,
}

impl Posture {
    /// The value as written in the configuration file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Posture::Block => "block",
            Posture::Audit => "audit",
        }
    }

    /// The verdict this posture gives.
    pub const fn action(self) -> Action {
        match self {
            Posture::Block => Action::Block,
            Posture::Audit => Action::Audit,
        }
    }
}

/// Which sockets allow-list mode puts under the default posture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PostureScope {
    /// Only the socket classes that the workload's `Allow` rules name: allowing icmp from ping
    /// leaves nginx's tcp alone. icmp-guard's default.
    #[default]
    Protocol,
    /// KubeArmor's behaviour: one `Allow` rule puts every managed socket class of the workload
    /// under the posture.
    Workload,
}

impl PostureScope {
    pub const fn as_str(self) -> &'static str {
        match self {
            PostureScope::Protocol => "protocol",
            PostureScope::Workload => "workload",
        }
    }
}

/// The agent configuration; [`Default`] is what the agent uses without a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// `ClusterName` of alerts.
    pub cluster_name: String,
    /// `HostName` of alerts; `None`: the machine's hostname, looked up at run time.
    pub host_name: Option<String>,
    /// This node's labels, matched by `KubeArmorHostPolicy` `spec.nodeSelector.matchLabels`.
    pub node_labels: BTreeMap<String, String>,
    /// `defaultNetworkPosture`: posture of workloads.
    pub default_posture: Posture,
    /// `hostDefaultNetworkPosture`: posture of the host's processes.
    pub host_default_posture: Posture,
    /// `namespaces.<ns>.networkPosture`: overrides `default_posture` for the workloads of a
    /// namespace, as KubeArmor's `kubearmor-network-posture` namespace annotation does.
    pub namespace_postures: BTreeMap<String, Posture>,
    /// `postureScope`.
    pub posture_scope: PostureScope,
    /// `alertsPerSecond`: alerts per second per workload before the rest are counted instead of
    /// sent; 0 = unlimited.
    pub alerts_per_second: u32,
    /// `workloads`: the cgroups that are workloads, in file order.
    pub workloads: Vec<WorkloadSpec>,
    /// `guard`: the inbound ICMP guard's posture, rate limit, alert rate and attach mode.
    pub guard: GuardConfig,
    /// The file, and the line where its content starts; line 0 for defaults.
    pub origin: Origin,
}

/// Default of `clusterName`, as in KubeArmor.
pub const DEFAULT_CLUSTER_NAME: &str = "default";
/// Default of `alertsPerSecond`, KubeArmor's per-container default.
pub const DEFAULT_ALERTS_PER_SECOND: u32 = 10;
/// Default namespace of a workload.
pub const DEFAULT_NAMESPACE: &str = "default";

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            cluster_name: DEFAULT_CLUSTER_NAME.to_string(),
            host_name: None,
            node_labels: BTreeMap::new(),
            default_posture: Posture::Block,
            host_default_posture: Posture::Block,
            namespace_postures: BTreeMap::new(),
            posture_scope: PostureScope::Protocol,
            alerts_per_second: DEFAULT_ALERTS_PER_SECOND,
            workloads: Vec::new(),
            guard: GuardConfig::default(),
            origin: Origin::default(),
        }
    }
}

/// How the guard hooks into an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GuardAttach {
    /// Native XDP where the driver has it, else generic XDP, else TC ingress (and say which).
    #[default]
    Auto,
    /// Native XDP only; an interface whose driver lacks it is an error.
    Native,
    /// Generic (skb) XDP.
    Generic,
    /// TC ingress.
    Tc,
}

impl GuardAttach {
    pub const fn as_str(self) -> &'static str {
        match self {
            GuardAttach::Auto => "auto",
            GuardAttach::Native => "native",
            GuardAttach::Generic => "generic",
            GuardAttach::Tc => "tc",
        }
    }
}

/// The `guard:` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardConfig {
    /// What ICMP gets that no Allow rule lets in, on an interface and family that has Allow rules;
    /// also what over-rate, fragmented and malformed ICMP gets.
    pub posture: Posture,
    /// ICMP packets per second per allowed source; 0 = no limit.
    pub rate_per_second: u32,
    /// Packets a source may send at once before the rate applies (at least 1).
    pub burst: u32,
    /// Per-packet alerts per second for the whole guard; 0 = only the per-second summaries.
    pub alerts_per_second: u32,
    pub attach: GuardAttach,
}

pub const DEFAULT_GUARD_RATE: u32 = 100;
pub const DEFAULT_GUARD_BURST: u32 = 200;
pub const DEFAULT_GUARD_ALERTS_PER_SECOND: u32 = 10;

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            posture: Posture::Block,
            rate_per_second: DEFAULT_GUARD_RATE,
            burst: DEFAULT_GUARD_BURST,
            alerts_per_second: DEFAULT_GUARD_ALERTS_PER_SECOND,
            attach: GuardAttach::Auto,
        }
    }
}

/// A cgroup whose processes form one workload, with the identity KubeArmorPolicy selectors and
/// alerts see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Unique name, used in messages and as the alert's `ContainerName` fallback.
    pub name: String,
    /// Relative to the cgroup v2 mount (`system.slice/nginx.service`), or absolute under it
    /// (`/sys/fs/cgroup/system.slice/nginx.service`). Never contains `..`.
    pub cgroup: PathBuf,
    pub namespace: String,
    /// Matched by `spec.selector.matchLabels` and `matchExpressions`.
    pub labels: BTreeMap<String, String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    /// Line of this workload's list item.
    pub origin: Origin,
}

const TOP_KEYS: [&str; 10] = [
    "clusterName",
    "hostName",
    "nodeLabels",
    "defaultNetworkPosture",
    "hostDefaultNetworkPosture",
    "namespaces",
    "postureScope",
    "alertsPerSecond",
    "workloads",
    "guard",
];

const WORKLOAD_KEYS: [&str; 6] = ["name", "cgroup", "namespace", "labels", "pod", "container"];

/// Reads the configuration file at `path`.
///
/// # Errors
/// Every problem in the file, each with its line and field; also a file that cannot be read.
pub fn load(path: &Path) -> Result<AgentConfig, PolicyErrors> {
    let text = fs::read_to_string(path).map_err(|e| {
        PolicyError::new(
            Origin {
                file: path.to_path_buf(),
                line: 0,
            },
            "",
            format!(
                "cannot read the configuration file: {e}; check the path, or start without \
                     one to use the defaults"
            ),
        )
    })?;
    parse_str(&text, path)
}

/// Reads configuration from `text`; `file` is only used in messages and origins. An empty text
/// gives the defaults.
///
/// # Errors
/// As [`load`].
pub fn parse_str(text: &str, file: &Path) -> Result<AgentConfig, PolicyErrors> {
    let docs = yaml::load_documents(text, file)?;
    let mut diag = Diag::new(file);
    let docs: Vec<&Node<'_>> = docs.iter().filter(|d| !yaml::is_null(d)).collect();
    let mut config = AgentConfig {
        origin: Origin {
            file: file.to_path_buf(),
            line: 0,
        },
        ..AgentConfig::default()
    };
    if let Some(extra) = docs.get(1) {
        diag.error(
            extra,
            "",
            "the configuration is one YAML document; merge this one into the first or remove the \
             `---` before it",
        );
    }
    if let Some(doc) = docs.first() {
        config.origin = diag.origin(doc);
        read_config(doc, &mut config, &mut diag);
    }
    if diag.errors.is_empty() {
        Ok(config)
    } else {
        Err(PolicyErrors(diag.errors))
    }
}

fn read_config(doc: &Node<'_>, config: &mut AgentConfig, diag: &mut Diag<'_>) {
    let Some(m) = Map::read(diag, doc, "") else {
        return;
    };
    m.reject_unknown(diag, &TOP_KEYS);
    if let Some(v) = m.string(diag, "clusterName") {
        if v.is_empty() {
            error_at(
                diag,
                &m,
                "clusterName",
                "must not be empty; remove the line for \"default\"",
            );
        } else {
            config.cluster_name = v;
        }
    }
    if let Some(v) = m.string(diag, "hostName") {
        if v.is_empty() {
            error_at(
                diag,
                &m,
                "hostName",
                "must not be empty; remove the line to use the machine's hostname",
            );
        } else {
            config.host_name = Some(v);
        }
    }
    if let Some(v) = m.string_map(diag, "nodeLabels") {
        config.node_labels = v;
    }
    if let Some(p) = posture(&m, "defaultNetworkPosture", diag) {
        config.default_posture = p;
    }
    if let Some(p) = posture(&m, "hostDefaultNetworkPosture", diag) {
        config.host_default_posture = p;
    }
    if let Some(s) = m.string(diag, "postureScope") {
        match s.as_str() {
            "protocol" => config.posture_scope = PostureScope::Protocol,
            "workload" => config.posture_scope = PostureScope::Workload,
            other => error_at(
                diag,
                &m,
                "postureScope",
                &format!("must be protocol or workload, found `{other}`"),
            ),
        }
    }
    if let Some(n) = m.integer(diag, "alertsPerSecond") {
        match u32::try_from(n) {
            Ok(n) => config.alerts_per_second = n,
            Err(_) => error_at(
                diag,
                &m,
                "alertsPerSecond",
                &format!("must be between 0 (unlimited) and {}, found {n}", u32::MAX),
            ),
        }
    }
    if let Some(node) = m.get("namespaces") {
        config.namespace_postures = namespaces(node, &m.field("namespaces"), diag);
    }
    if let Some(items) = m.sequence(diag, "workloads") {
        config.workloads = workloads(items, &m.field("workloads"), diag);
    }
    if let Some(node) = m.get("guard") {
        guard(node, &m.field("guard"), &mut config.guard, diag);
    }
}

fn guard(node: &Node<'_>, path: &str, out: &mut GuardConfig, diag: &mut Diag<'_>) {
    let Some(m) = Map::read(diag, node, path) else {
        return;
    };
    m.reject_unknown(
        diag,
        &[
            "posture",
            "ratePerSecond",
            "burst",
            "alertsPerSecond",
            "attach",
        ],
    );
    if let Some(p) = posture(&m, "posture", diag) {
        out.posture = p;
    }
    let number = |key: &str, min: u32, slot: &mut u32, diag: &mut Diag<'_>| {
        if let Some(n) = m.integer(diag, key) {
            match u32::try_from(n) {
                Ok(n) if n >= min => *slot = n,
                _ => error_at(
                    diag,
                    &m,
                    key,
                    &format!("must be between {min} and {}, found {n}", u32::MAX),
                ),
            }
        }
    };
    number("ratePerSecond", 0, &mut out.rate_per_second, diag);
    number("burst", 1, &mut out.burst, diag);
    number("alertsPerSecond", 0, &mut out.alerts_per_second, diag);
    if let Some(s) = m.string(diag, "attach") {
        out.attach = match s.as_str() {
            "auto" => GuardAttach::Auto,
            "native" => GuardAttach::Native,
            "generic" => GuardAttach::Generic,
            "tc" => GuardAttach::Tc,
            other => {
                error_at(
                    diag,
                    &m,
                    "attach",
                    &format!("must be auto, native, generic or tc, found `{other}`"),
                );
                return;
            }
        };
    }
}

fn error_at(diag: &mut Diag<'_>, m: &Map<'_, '_>, key: &str, reason: &str) {
    let node = m.get(key).unwrap_or(m.node());
    diag.error(node, &m.field(key), reason);
}

fn posture(m: &Map<'_, '_>, key: &str, diag: &mut Diag<'_>) -> Option<Posture> {
    let s = m.string(diag, key)?;
    match s.as_str() {
        "block" => Some(Posture::Block),
        "audit" => Some(Posture::Audit),
        other => {
            let hint = if other == "allow" {
                "; an `allow` posture would make Allow rules mean nothing, so icmp-guard does not \
                 offer it"
            } else {
                ""
            };
            error_at(
                diag,
                m,
                key,
                &format!(
                    "must be block or audit (lower case, as in KubeArmor), found `{other}`{hint}"
                ),
            );
            None
        }
    }
}

/// `namespaces: {<ns>: {networkPosture: audit}}`. A mapping per namespace rather than a bare
/// value leaves room for further per-namespace settings without changing the file's shape.
fn namespaces(node: &Node<'_>, path: &str, diag: &mut Diag<'_>) -> BTreeMap<String, Posture> {
    let mut out = BTreeMap::new();
    let Some(m) = Map::read(diag, node, path) else {
        return out;
    };
    for e in m.entries() {
        let field = m.field(e.key);
        if !yaml::is_dns_label(e.key) {
            diag.error(
                e.key_node,
                &field,
                format!(
                    "`{}` is not a valid namespace; use lower-case letters, digits and `-`",
                    e.key
                ),
            );
        }
        let Some(ns) = Map::read(diag, e.value, &field) else {
            continue;
        };
        ns.reject_unknown(diag, &["networkPosture"]);
        let Some(_) = ns.require(
            diag,
            "networkPosture",
            "write `networkPosture: audit` or `block`",
        ) else {
            continue;
        };
        if let Some(p) = posture(&ns, "networkPosture", diag) {
            out.insert(e.key.to_string(), p);
        }
    }
    out
}

fn workloads(items: &[Node<'_>], path: &str, diag: &mut Diag<'_>) -> Vec<WorkloadSpec> {
    let mut out: Vec<WorkloadSpec> = Vec::new();
    for (i, node) in items.iter().enumerate() {
        let Some(w) = workload(node, &yaml::item(path, i), diag) else {
            continue;
        };
        // Two workloads on one cgroup would make a socket's workload depend on map order; two
        // with one name would make alerts and messages ambiguous.
        if let Some(prev) = out.iter().find(|p| p.name == w.name) {
            diag.error(
                node,
                &yaml::child(&yaml::item(path, i), "name"),
                format!(
                    "workload name `{}` is already used at {}; give each workload its own name",
                    w.name, prev.origin
                ),
            );
        }
        if let Some(prev) = out
            .iter()
            .find(|p| normalized(&p.cgroup) == normalized(&w.cgroup))
        {
            diag.error(
                node,
                &yaml::child(&yaml::item(path, i), "cgroup"),
                format!(
                    "cgroup {} is already workload `{}` at {}; a cgroup belongs to one workload",
                    w.cgroup.display(),
                    prev.name,
                    prev.origin
                ),
            );
        }
        out.push(w);
    }
    out
}

/// The path without `.` components or repeated and trailing slashes, for duplicate detection.
fn normalized(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

fn workload(node: &Node<'_>, path: &str, diag: &mut Diag<'_>) -> Option<WorkloadSpec> {
    let m = Map::read(diag, node, path)?;
    let before = diag.errors.len();
    m.reject_unknown(diag, &WORKLOAD_KEYS);
    let name = m
        .require(
            diag,
            "name",
            "give the workload a unique name, e.g. `name: nginx`",
        )
        .and_then(|n| yaml::string(diag, n, &m.field("name")));
    if name.as_deref() == Some("") {
        error_at(diag, &m, "name", "must not be empty");
    }
    let cgroup = m
        .require(
            diag,
            "cgroup",
            "give its cgroup, relative to the cgroup v2 mount, e.g. \
             `cgroup: system.slice/nginx.service`",
        )
        .and_then(|n| yaml::string(diag, n, &m.field("cgroup")));
    if let Some(c) = &cgroup {
        let p = Path::new(c);
        if c.is_empty() || normalized(p).as_os_str().is_empty() || p == Path::new("/") {
            error_at(
                diag,
                &m,
                "cgroup",
                "names the root cgroup, which holds every process: give the workload's own \
                 cgroup, e.g. system.slice/nginx.service",
            );
        } else if p.components().any(|c| c == Component::ParentDir) {
            error_at(
                diag,
                &m,
                "cgroup",
                &format!(
                    "`{c}` contains `..`; write the cgroup's path without it, relative to the \
                     cgroup v2 mount"
                ),
            );
        }
    }
    let namespace = m
        .string(diag, "namespace")
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    if !yaml::is_dns_label(&namespace) {
        error_at(
            diag,
            &m,
            "namespace",
            &format!(
                "`{namespace}` is not a valid namespace; use lower-case letters, digits and `-` \
                 (at most 63 characters)"
            ),
        );
    }
    let labels = m.string_map(diag, "labels").unwrap_or_default();
    let pod = m.string(diag, "pod");
    let container = m.string(diag, "container");
    if diag.errors.len() != before {
        return None;
    }
    Some(WorkloadSpec {
        name: name?,
        cgroup: PathBuf::from(cgroup?),
        namespace,
        labels,
        pod,
        container,
        origin: diag.origin(m.node()),
    })
}
