//! KubeArmorPolicy / KubeArmorHostPolicy YAML → [`PolicySet`].
//!
//! KubeArmor users' files must load as they are, so everything KubeArmor's CRDs accept is read;
//! what icmp-guard does not enforce (process, file, capabilities, syscall rules, DNS rules) is
//! reported as a [`PolicyWarning`] rather than dropped silently. What KubeArmor's CRD would reject
//! is an error here too, with its file, line and field path.
//!
//! Loading is all-or-nothing: [`load`] and [`parse_str`] read every document of every file and
//! return every error found, and no [`PolicySet`] at all if there is one, so that a typo in one
//! file never leaves the agent enforcing half of the operator's intent.
//!
//! # Where icmp-guard is stricter than KubeArmor
//!
//! - Unknown keys in `spec.network`, its `matchProtocols[]` items and their `fromSource[]` items,
//!   in `spec.selector` and in `spec.nodeSelector` are errors: a misspelt `matchProtocol` or
//!   `matchLabel` would otherwise change what the policy covers without a word.
//! - Protocol names are accepted in any case (`Icmp` too), not only all-lower or all-upper case.
//! - Every `matchProtocols` item with a comma-separated `protocol` is expanded. KubeArmor expands
//!   them only when the *first* item has a comma; otherwise the literal `tcp,udp` matches nothing.
//!   Such items get a warning, since KubeArmor would read them differently.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use icmp_guard_common::Class;

pub use super::diagnostics::{PolicyError, PolicyErrors, PolicyWarning};
use super::{
    Action, LabelExpression, LabelOperator, Origin, Policy, PolicySet, Rule, Selector, Target,
    yaml::{self, Diag, Map, Node},
};

/// The only API version of KubeArmor's policy CRDs.
pub const API_VERSION: &str = "security.kubearmor.com/v1";
/// Namespaced policy for the workloads its `spec.selector` picks.
pub const KIND_POLICY: &str = "KubeArmorPolicy";
/// Cluster-scoped policy for the hosts its `spec.nodeSelector` picks.
pub const KIND_HOST_POLICY: &str = "KubeArmorHostPolicy";
/// Cluster-scoped ingress/egress firewall rules for the nodes its `spec.nodeSelector` picks; its
/// ICMP and ICMPv6 ingress rules are enforced by the inbound guard (see [`super::network`]).
pub const KIND_NETWORK_POLICY: &str = "KubeArmorNetworkPolicy";
/// KubeArmor's CRD limit on a `fromSource[].path`, in characters.
pub const MAX_SOURCE_PATH_CHARS: usize = 200;
/// The error for a policy file with no document in it (empty, or only comments). Such a file is
/// what a write in progress leaves behind; applying it would drop every rule of the file, so it
/// is refused like any other broken file (at start, and on hot reload where the old policy stays).
pub const NO_POLICY: &str = "the file holds no policy (it is empty or only comments); if it is \
                             being written, this reload is refused and the next one reads it; \
                             to enforce no policy from it, delete the file";
/// Namespace of a `KubeArmorPolicy` without `metadata.namespace`, as `kubectl apply` would use.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Every protocol name [`protocol_classes`] knows, in the order error messages list them.
pub const PROTOCOL_NAMES: [&str; 13] = [
    "tcp",
    "udp",
    "sctp",
    "icmp",
    "icmpv6",
    "raw",
    "packet",
    "stream",
    "dgram",
    "seqpacket",
    "dccp",
    "rdm",
    "all",
];

/// Policies read from files, and what the operator should know about them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub set: PolicySet,
    pub warnings: Vec<PolicyWarning>,
}

/// The socket classes a KubeArmor protocol name covers in icmp-guard. Case-insensitive; `None`
/// for a name KubeArmor does not know. One name at a time: split `tcp,udp` first.
///
/// | name        | icmp-guard classes                     | KubeArmor (family ignored)           |
/// |-------------|----------------------------------------|--------------------------------------|
/// | `tcp`       | [`Tcp`](Class::Tcp)                     | `SOCK_STREAM` + protocol 0 or 6      |
/// | `udp`       | [`Udp`](Class::Udp)                     | `SOCK_DGRAM` + protocol 0 or 17      |
/// | `sctp`      | [`Sctp`](Class::Sctp)                   | stream or seqpacket + protocol 132   |
/// | `icmp`      | [`Icmp`](Class::Icmp)                   | protocol 1, DGRAM or RAW             |
/// | `icmpv6`    | [`Icmpv6`](Class::Icmpv6)               | protocol 58, DGRAM or RAW            |
/// | `raw`       | [`Raw`](Class::Raw)                     | any `SOCK_RAW`                       |
/// | `packet`    | [`Packet`](Class::Packet)               | socket type `SOCK_PACKET`            |
/// | `stream`    | [`Tcp`](Class::Tcp), [`Sctp`](Class::Sctp) | any `SOCK_STREAM`                 |
/// | `dgram`     | [`Udp`](Class::Udp)                     | any `SOCK_DGRAM`                     |
/// | `seqpacket` | [`Sctp`](Class::Sctp)                   | any `SOCK_SEQPACKET`                 |
/// | `dccp`      | [`Other`](Class::Other)                 | socket type `SOCK_DCCP`              |
/// | `rdm`       | [`Other`](Class::Other)                 | socket type `SOCK_RDM`               |
/// | `all`       | [`Class::ALL_MANAGED`]                  | every socket                         |
///
/// KubeArmor classifies a socket from `(type, protocol)` and ignores the address family;
/// icmp-guard classifies inet and `AF_PACKET` sockets only (see [`icmp_guard_common::class`]).
/// So a name means the same here as in KubeArmor for inet TCP, UDP, SCTP and ICMP, and the
/// differences are deliberate:
///
/// - **Unix and netlink sockets are never managed.** KubeArmor counts `AF_UNIX` stream sockets
///   as `tcp`, unix datagram sockets as `udp` and `AF_NETLINK` sockets as `raw`, so an `Allow`
///   list naming only `icmp` cuts a workload off its own unix sockets and the kernel's netlink
///   answers (name resolution, interface lookups). These are local IPC, not network access.
/// - **`icmp`/`icmpv6`** also require the matching family (`AF_INET` / `AF_INET6`): protocol 58
///   on an `AF_INET` socket is not ICMPv6 and is [`Other`](Class::Other).
/// - **`raw`** is the inet raw socket that forges packets (e.g. hping3's `IPPROTO_RAW`). Raw
///   sockets carrying ICMP are [`Icmp`](Class::Icmp)/[`Icmpv6`](Class::Icmpv6), so one `icmp`
///   rule governs ping whether it opens a raw or a datagram ("ping") socket. In KubeArmor the
///   type is looked up before the protocol, so a `raw` rule there also decides raw ICMP; name
///   `icmp` as well to cover that here.
/// - **`packet`** covers `AF_PACKET` sockets of every type. KubeArmor's `packet` is the obsolete
///   socket type `SOCK_PACKET`; what reads and forges whole frames today is `AF_PACKET` with
///   `SOCK_RAW` or `SOCK_DGRAM`, which KubeArmor counts as `raw`/`dgram`.
/// - **`dgram`** is UDP: ICMP "ping" datagram sockets belong to `icmp`, for the same reason as
///   raw ICMP above.
/// - **`stream`** and **`seqpacket`** are the inet protocols of those types (TCP and SCTP, SCTP);
///   other inet stream protocols such as MPTCP are [`Other`](Class::Other).
/// - **`dccp`** and **`rdm`** map to [`Other`](Class::Other), every inet socket icmp-guard has no
///   class for: there is no DCCP class, and inet has no RDM protocol (`AF_RDS` and TIPC, the RDM
///   families, are not managed).
/// - **`all`** is every managed class; unix and netlink sockets stay unmanaged.
pub fn protocol_classes(name: &str) -> Option<Vec<Class>> {
    let classes: &[Class] = match name.to_ascii_lowercase().as_str() {
        "tcp" => &[Class::Tcp],
        "udp" => &[Class::Udp],
        "sctp" => &[Class::Sctp],
        "icmp" => &[Class::Icmp],
        "icmpv6" => &[Class::Icmpv6],
        "raw" => &[Class::Raw],
        "packet" => &[Class::Packet],
        "stream" => &[Class::Tcp, Class::Sctp],
        "dgram" => &[Class::Udp],
        "seqpacket" => &[Class::Sctp],
        "dccp" => &[Class::Other],
        "rdm" => &[Class::Other],
        "all" => &Class::ALL_MANAGED,
        _ => return None,
    };
    Some(classes.to_vec())
}

/// Loads a policy file, or every `*.yaml`/`*.yml` file under a directory (recursively, in path
/// order so the result does not depend on the filesystem). Files and directories whose names
/// start with `.` are skipped: a Kubernetes ConfigMap mount keeps a second copy of every file in
/// hidden `..data` directories, which would otherwise load every policy twice.
///
/// A file may hold several documents separated by `---`; empty documents are skipped. A `v1`
/// `List` of policies, as `kubectl get ksp -o yaml` prints, is read item by item.
///
/// # Errors
/// Every problem in every file, and a policy defined twice (same kind, namespace and name) across
/// or within files. Nothing is returned for the files that were fine.
pub fn load(path: &Path) -> Result<Loaded, PolicyErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let files = policy_files(path, &mut errors, &mut warnings);
    let mut policies = PolicySet::default();
    for file in &files {
        match fs::read_to_string(file) {
            Ok(text) => {
                let mut diag = Diag::new(file);
                parse_stream(&text, file, &mut diag, &mut policies);
                errors.append(&mut diag.errors);
                warnings.append(&mut diag.warnings);
            }
            Err(e) => errors.push(PolicyError::new(
                file_origin(file),
                "",
                format!(
                    "cannot read the file: {e}; check that it exists, is readable and is UTF-8 text"
                ),
            )),
        }
    }
    finish(policies, errors, warnings)
}

/// Parses the documents of one file's text; `file` is only used in messages and origins.
///
/// # Errors
/// As [`load`], for this text alone.
pub fn parse_str(text: &str, file: &Path) -> Result<Loaded, PolicyErrors> {
    let mut diag = Diag::new(file);
    let mut policies = PolicySet::default();
    parse_stream(text, file, &mut diag, &mut policies);
    finish(policies, diag.errors, diag.warnings)
}

fn file_origin(file: &Path) -> Origin {
    Origin {
        file: file.to_path_buf(),
        line: 0,
    }
}

fn finish(
    set: PolicySet,
    mut errors: Vec<PolicyError>,
    warnings: Vec<PolicyWarning>,
) -> Result<Loaded, PolicyErrors> {
    errors.extend(duplicates(&set));
    if errors.is_empty() {
        Ok(Loaded { set, warnings })
    } else {
        Err(PolicyErrors(errors))
    }
}

fn kind_of(policy: &Policy) -> &'static str {
    match policy.target {
        Target::Host { .. } => KIND_HOST_POLICY,
        Target::Workloads(_) => KIND_POLICY,
    }
}

/// KubeArmor keeps one policy per kind, namespace and name; a second one would replace the first
/// depending on the order files are read, so both places are named instead.
fn duplicates(set: &PolicySet) -> Vec<PolicyError> {
    let mut first: BTreeMap<(&str, Option<&str>, &str), &Origin> = BTreeMap::new();
    let mut errors = Vec::new();
    let all = set
        .policies
        .iter()
        .map(|p| {
            (
                kind_of(p),
                p.namespace.as_deref(),
                p.name.as_str(),
                &p.origin,
            )
        })
        .chain(
            set.network
                .iter()
                .map(|p| (KIND_NETWORK_POLICY, None, p.name.as_str(), &p.origin)),
        );
    for (kind, namespace, name, origin) in all {
        let key = (kind, namespace, name);
        match first.get(&key) {
            Some(earlier) => {
                let what = match namespace {
                    Some(ns) => format!("{kind} {ns}/{name}"),
                    None => format!("{kind} {name}"),
                };
                errors.push(PolicyError::new(
                    origin.clone(),
                    "metadata.name",
                    format!(
                        "duplicate {what}: already defined at {earlier}; rename one of them or \
                         delete the copy"
                    ),
                ));
            }
            None => {
                first.insert(key, origin);
            }
        }
    }
    errors
}

fn is_policy_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The files to read: `path` itself if it is a file (whatever its extension, since the operator
/// named it), else the policy files under it in path order.
fn policy_files(
    path: &Path,
    errors: &mut Vec<PolicyError>,
    warnings: &mut Vec<PolicyWarning>,
) -> Vec<PathBuf> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            errors.push(PolicyError::new(
                file_origin(path),
                "",
                format!("cannot read: {e}; pass a policy file or a directory of *.yaml files"),
            ));
            return Vec::new();
        }
    };
    if !meta.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    let mut visited = HashSet::new();
    walk(path, &mut files, &mut visited, errors);
    files.sort();
    if files.is_empty() && errors.is_empty() {
        warnings.push(PolicyWarning::new(
            file_origin(path),
            "",
            "no *.yaml or *.yml file in this directory: no policy is loaded",
        ));
    }
    files
}

fn walk(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
    errors: &mut Vec<PolicyError>,
) {
    // Symbolic links to directories are followed once each, so a link loop ends.
    if let Ok(canonical) = fs::canonicalize(dir)
        && !visited.insert(canonical)
    {
        return;
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(PolicyError::new(
                file_origin(dir),
                "",
                format!("cannot list the directory: {e}"),
            ));
            return;
        }
    };
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(e) => {
                errors.push(PolicyError::new(
                    file_origin(dir),
                    "",
                    format!("cannot list the directory: {e}"),
                ));
                continue;
            }
        };
        if is_hidden(&path) {
            continue;
        }
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, files, visited, errors),
            Ok(_) if is_policy_file(&path) => files.push(path),
            Ok(_) => {}
            // A dangling symbolic link named like a policy is a policy the operator expects.
            Err(e) if is_policy_file(&path) => errors.push(PolicyError::new(
                file_origin(&path),
                "",
                format!("cannot read: {e}"),
            )),
            Err(_) => {}
        }
    }
}

fn parse_stream(text: &str, file: &Path, diag: &mut Diag<'_>, out: &mut PolicySet) {
    match yaml::load_documents(text, file) {
        Ok(docs) => {
            if docs.iter().all(yaml::is_null) {
                diag.errors
                    .push(PolicyError::new(file_origin(file), "", NO_POLICY));
            }
            for doc in &docs {
                parse_object(doc, "", diag, out);
            }
        }
        Err(e) => diag.errors.push(e),
    }
}

/// One document, or one item of a `List`; `path` is the prefix of its field paths.
fn parse_object(node: &Node<'_>, path: &str, diag: &mut Diag<'_>, out: &mut PolicySet) {
    if yaml::is_null(node) {
        return; // an empty document, e.g. a trailing `---`
    }
    if !matches!(yaml::plain(node).data, saphyr::YamlData::Mapping(_)) {
        diag.error(
            node,
            path,
            format!(
                "a policy must be a mapping with apiVersion, kind, metadata and spec, found {}",
                yaml::describe(node)
            ),
        );
        return;
    }
    let Some(doc) = Map::read(diag, node, path) else {
        return;
    };
    let kind = doc
        .require(
            diag,
            "kind",
            "set it to KubeArmorPolicy, KubeArmorHostPolicy or KubeArmorNetworkPolicy",
        )
        .and_then(|n| yaml::string(diag, n, &doc.field("kind")));
    let api_version = doc
        .require(diag, "apiVersion", "set it to security.kubearmor.com/v1")
        .and_then(|n| yaml::string(diag, n, &doc.field("apiVersion")));

    let is_host = match kind.as_deref() {
        Some(KIND_POLICY) => false,
        Some(KIND_HOST_POLICY) => true,
        Some(KIND_NETWORK_POLICY) => {
            check_api_version(&doc, api_version.as_deref(), diag);
            super::network::parse(&doc, diag, out);
            return;
        }
        Some("List") => {
            parse_list(&doc, api_version.as_deref(), diag, out);
            return;
        }
        Some(other) => {
            let node = doc.get("kind").unwrap_or(doc.node());
            let reason = if other == "KubeArmorClusterPolicy" {
                "KubeArmorClusterPolicy is not supported; write one KubeArmorPolicy per namespace"
                    .to_string()
            } else {
                format!(
                    "unknown kind `{other}`; icmp-guard reads KubeArmorPolicy, \
                     KubeArmorHostPolicy and KubeArmorNetworkPolicy{}",
                    if other.eq_ignore_ascii_case(KIND_POLICY)
                        || other.eq_ignore_ascii_case(KIND_HOST_POLICY)
                        || other.eq_ignore_ascii_case(KIND_NETWORK_POLICY)
                    {
                        " (the kind is case-sensitive)"
                    } else {
                        ""
                    }
                )
            };
            diag.error(node, &doc.field("kind"), reason);
            return;
        }
        // Without a kind the schema is unknown: the missing kind is the one error to fix first.
        None => return,
    };
    check_api_version(&doc, api_version.as_deref(), diag);
    doc.reject_unknown(diag, &["apiVersion", "kind", "metadata", "spec", "status"]);

    let (name, namespace) = parse_metadata(&doc, is_host.then_some(KIND_HOST_POLICY), diag);
    let spec = match doc.get("spec") {
        Some(n) => Map::read(diag, n, &doc.field("spec")),
        // KubeArmor's CRD requires a spec only of host policies, for their nodeSelector.
        None if is_host => {
            doc.require(
                diag,
                "spec",
                "add spec.nodeSelector.matchLabels and spec.network",
            );
            None
        }
        None => {
            diag.warn(
                doc.node(),
                &doc.field("spec"),
                "this policy has no spec, so icmp-guard enforces nothing for it",
            );
            None
        }
    };
    let (target, rules) = match &spec {
        Some(spec) => parse_spec(spec, is_host, diag),
        None => (empty_target(is_host), Vec::new()),
    };
    if let Some(name) = name {
        out.policies.push(Policy {
            name,
            namespace,
            target,
            rules,
            origin: diag.origin(doc.node()),
        });
    }
}

pub(super) fn check_api_version(doc: &Map<'_, '_>, api_version: Option<&str>, diag: &mut Diag<'_>) {
    if let Some(v) = api_version
        && v != API_VERSION
    {
        let node = doc.get("apiVersion").unwrap_or(doc.node());
        diag.error(
            node,
            &doc.field("apiVersion"),
            format!("`{v}` is not supported; use {API_VERSION}"),
        );
    }
}

fn empty_target(is_host: bool) -> Target {
    if is_host {
        Target::Host {
            node_selector: BTreeMap::new(),
        }
    } else {
        Target::Workloads(Selector::default())
    }
}

/// `kind: List` with `apiVersion: v1`, the shape of `kubectl get ksp -o yaml`.
fn parse_list(
    doc: &Map<'_, '_>,
    api_version: Option<&str>,
    diag: &mut Diag<'_>,
    out: &mut PolicySet,
) {
    if let Some(v) = api_version
        && v != "v1"
    {
        let node = doc.get("apiVersion").unwrap_or(doc.node());
        diag.error(
            node,
            &doc.field("apiVersion"),
            format!("a List has apiVersion v1, found `{v}`"),
        );
    }
    doc.reject_unknown(diag, &["apiVersion", "kind", "metadata", "items"]);
    if let Some(items) = doc.sequence(diag, "items") {
        let base = doc.field("items");
        for (i, node) in items.iter().enumerate() {
            parse_object(node, &yaml::item(&base, i), diag, out);
        }
    }
}

/// `metadata.name` and the namespace the policy lives in (`None` for the cluster-scoped kinds,
/// named by `cluster_kind`). Other metadata (labels, annotations, what `kubectl get -o yaml`
/// adds) is accepted and not used.
pub(super) fn parse_metadata(
    doc: &Map<'_, '_>,
    cluster_kind: Option<&str>,
    diag: &mut Diag<'_>,
) -> (Option<String>, Option<String>) {
    let is_host = cluster_kind.is_some();
    let Some(meta_node) = doc.require(diag, "metadata", "add metadata.name") else {
        return (None, (!is_host).then(|| DEFAULT_NAMESPACE.to_string()));
    };
    let Some(meta) = Map::read(diag, meta_node, &doc.field("metadata")) else {
        return (None, (!is_host).then(|| DEFAULT_NAMESPACE.to_string()));
    };
    let name = meta
        .require(
            diag,
            "name",
            "give the policy a name, e.g. `name: allow-ping`",
        )
        .and_then(|n| yaml::string(diag, n, &meta.field("name")));
    if let Some(n) = &name
        && !yaml::is_dns_subdomain(n)
    {
        let node = meta.get("name").unwrap_or(meta.node());
        diag.error(
            node,
            &meta.field("name"),
            format!(
                "`{n}` is not a valid Kubernetes name; use lower-case letters, digits, `-` and \
                 `.`, starting and ending with a letter or digit (at most 253 characters)"
            ),
        );
    }
    let namespace = meta.string(diag, "namespace");
    if is_host {
        if let (Some(ns), Some(node)) = (&namespace, meta.get("namespace")) {
            diag.warn(
                node,
                &meta.field("namespace"),
                format!(
                    "{} is cluster-scoped: namespace `{ns}` is ignored; remove the line",
                    cluster_kind.unwrap_or(KIND_HOST_POLICY)
                ),
            );
        }
        return (name, None);
    }
    if let (Some(ns), Some(node)) = (&namespace, meta.get("namespace"))
        && !yaml::is_dns_label(ns)
    {
        diag.error(
            node,
            &meta.field("namespace"),
            format!(
                "`{ns}` is not a valid namespace; use lower-case letters, digits and `-` (at most \
                 63 characters)"
            ),
        );
    }
    (
        name,
        Some(namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())),
    )
}

/// Sections of a KubeArmor spec that icmp-guard reads.
const SPEC_COMMON: [&str; 5] = ["network", "severity", "tags", "message", "action"];
/// Sections KubeArmor enforces and icmp-guard does not.
const SPEC_UNSUPPORTED: [&str; 6] = [
    "process",
    "file",
    "capabilities",
    "syscalls",
    "apparmor",
    "presets",
];

/// What a rule inherits when it does not say: from `spec.network`, then from `spec`.
#[derive(Clone, Default)]
pub(super) struct Inherited {
    pub action: Option<Action>,
    pub severity: Option<u8>,
    pub tags: Vec<String>,
    pub message: Option<String>,
}

impl Inherited {
    pub fn read(map: &Map<'_, '_>, diag: &mut Diag<'_>) -> Self {
        Inherited {
            action: parse_action(map, diag),
            severity: parse_severity(map, diag),
            tags: map.string_list(diag, "tags").unwrap_or_default(),
            message: map.string(diag, "message").filter(|m| !m.is_empty()),
        }
    }

    /// `self` where set, else `outer`.
    pub fn over(self, outer: &Inherited) -> Inherited {
        Inherited {
            action: self.action.or(outer.action),
            severity: self.severity.or(outer.severity),
            tags: if self.tags.is_empty() {
                outer.tags.clone()
            } else {
                self.tags
            },
            message: self.message.or_else(|| outer.message.clone()),
        }
    }
}

fn parse_spec(spec: &Map<'_, '_>, is_host: bool, diag: &mut Diag<'_>) -> (Target, Vec<Rule>) {
    let target = if is_host {
        if let Some(e) = spec.entry("selector") {
            diag.error(
                e.key_node,
                &spec.field("selector"),
                "a KubeArmorHostPolicy selects nodes with spec.nodeSelector.matchLabels, not \
                 spec.selector; use kind KubeArmorPolicy to select workloads",
            );
        }
        Target::Host {
            node_selector: parse_node_selector(spec, diag),
        }
    } else {
        if let Some(e) = spec.entry("nodeSelector") {
            diag.error(
                e.key_node,
                &spec.field("nodeSelector"),
                "spec.nodeSelector belongs to KubeArmorHostPolicy; a KubeArmorPolicy selects \
                 workloads with spec.selector",
            );
        }
        Target::Workloads(parse_selector(spec, diag))
    };

    for e in spec.entries() {
        let k = e.key;
        if SPEC_COMMON.contains(&k) || k == "selector" || k == "nodeSelector" {
            continue;
        }
        let message = if SPEC_UNSUPPORTED.contains(&k) {
            format!(
                "icmp-guard does not enforce spec.{k}: only spec.network is enforced; KubeArmor's \
                 {k} rules in this policy have no effect here"
            )
        } else {
            let mut known: Vec<&str> = SPEC_COMMON.to_vec();
            known.push(if is_host { "nodeSelector" } else { "selector" });
            format!(
                "unknown section `{k}` is ignored{}",
                yaml::suggestion(k, &known)
            )
        };
        diag.warn(e.key_node, &spec.field(k), message);
    }

    let spec_defaults = Inherited::read(spec, diag);
    let Some(net_node) = spec.get("network") else {
        diag.warn(
            spec.node(),
            &spec.field("network"),
            "this policy has no spec.network, so icmp-guard enforces nothing for it",
        );
        return (target, Vec::new());
    };
    let Some(network) = Map::read(diag, net_node, &spec.field("network")) else {
        return (target, Vec::new());
    };
    network.reject_unknown(
        diag,
        &[
            "matchProtocols",
            "matchDNSQueries",
            "action",
            "severity",
            "tags",
            "message",
        ],
    );
    if let Some(e) = network.entry("matchDNSQueries") {
        diag.warn(
            e.key_node,
            &network.field("matchDNSQueries"),
            "icmp-guard does not enforce DNS rules; these matchDNSQueries have no effect here",
        );
    }
    let net_defaults = Inherited::read(&network, diag).over(&spec_defaults);
    let Some(items) = network.sequence(diag, "matchProtocols") else {
        if network.get("matchProtocols").is_none() {
            diag.warn(
                network.node(),
                &network.field("matchProtocols"),
                "spec.network has no matchProtocols, so icmp-guard enforces nothing for this \
                 policy",
            );
        }
        return (target, Vec::new());
    };
    let base = network.field("matchProtocols");
    let first_expands = items
        .first()
        .and_then(|n| yaml::plain(n).data.as_mapping_get("protocol"))
        .and_then(|p| p.data.as_str())
        .is_some_and(|p| p.contains(','));
    let mut rules = Vec::new();
    for (i, node) in items.iter().enumerate() {
        let ctx = RuleContext {
            path: yaml::item(&base, i),
            is_host,
            defaults: &net_defaults,
            kubearmor_expands: i == 0 || first_expands,
        };
        rules.extend(parse_rule(node, &ctx, diag));
    }
    (target, rules)
}

fn parse_selector(spec: &Map<'_, '_>, diag: &mut Diag<'_>) -> Selector {
    let Some(node) = spec.get("selector") else {
        return Selector::default();
    };
    let Some(sel) = Map::read(diag, node, &spec.field("selector")) else {
        return Selector::default();
    };
    sel.reject_unknown(diag, &["matchLabels", "matchExpressions"]);
    let match_labels = sel.string_map(diag, "matchLabels").unwrap_or_default();
    let mut match_expressions = Vec::new();
    if let Some(items) = sel.sequence(diag, "matchExpressions") {
        let base = sel.field("matchExpressions");
        for (i, n) in items.iter().enumerate() {
            if let Some(e) = parse_expression(n, &yaml::item(&base, i), diag) {
                match_expressions.push(e);
            }
        }
    }
    Selector {
        match_labels,
        match_expressions,
    }
}

fn parse_expression(node: &Node<'_>, path: &str, diag: &mut Diag<'_>) -> Option<LabelExpression> {
    let m = Map::read(diag, node, path)?;
    m.reject_unknown(diag, &["key", "operator", "values"]);
    let key = m
        .require(diag, "key", "write `key: label`")
        .and_then(|n| yaml::string(diag, n, &m.field("key")));
    if let Some(k) = &key
        && k != "label"
    {
        let node = m.get("key").unwrap_or(m.node());
        let reason = if k == "namespace" {
            "`namespace` is only accepted by KubeArmorClusterPolicy; a KubeArmorPolicy applies to \
             its own namespace: use `key: label` with values such as app=nginx"
                .to_string()
        } else {
            format!("must be `label` (the only key KubeArmor accepts here), found `{k}`")
        };
        diag.error(node, &m.field("key"), reason);
    }
    let operator = m
        .require(
            diag,
            "operator",
            "write `operator: In` or `operator: NotIn`",
        )
        .and_then(|n| yaml::string(diag, n, &m.field("operator")))
        .and_then(|op| match op.as_str() {
            "In" => Some(LabelOperator::In),
            "NotIn" => Some(LabelOperator::NotIn),
            _ => {
                let node = m.get("operator").unwrap_or(m.node());
                diag.error(
                    node,
                    &m.field("operator"),
                    format!("must be In or NotIn (exactly, as in KubeArmor's CRD), found `{op}`"),
                );
                None
            }
        });
    let values = m.string_list(diag, "values").unwrap_or_default();
    if values.is_empty() {
        diag.warn(
            m.node(),
            &m.field("values"),
            "has no values, so this expression selects nothing and excludes nothing; add values \
             such as app=nginx",
        );
    }
    for (i, v) in values.iter().enumerate() {
        if !v.contains('=') {
            let field = yaml::item(&m.field("values"), i);
            let node = m
                .get("values")
                .and_then(|n| yaml::plain(n).data.as_sequence_get(i))
                .unwrap_or(m.node());
            diag.warn(
                node,
                &field,
                format!(
                    "KubeArmor matches these values against `key=value` labels, so `{v}` matches \
                     no workload; write it as e.g. app={v}"
                ),
            );
        }
    }
    // `key` is always `label` once valid, so only the operator and values are kept.
    if key.as_deref() != Some("label") {
        return None;
    }
    Some(LabelExpression {
        operator: operator?,
        values,
    })
}

pub(super) fn parse_node_selector(
    spec: &Map<'_, '_>,
    diag: &mut Diag<'_>,
) -> BTreeMap<String, String> {
    let hint = "add spec.nodeSelector.matchLabels, e.g. `kubernetes.io/hostname: node-1`";
    let Some(node) = spec.require(diag, "nodeSelector", hint) else {
        return BTreeMap::new();
    };
    let Some(ns) = Map::read(diag, node, &spec.field("nodeSelector")) else {
        return BTreeMap::new();
    };
    ns.reject_unknown(diag, &["matchLabels"]);
    let Some(labels_node) = ns.require(diag, "matchLabels", hint) else {
        return BTreeMap::new();
    };
    let labels = yaml::string_map(diag, labels_node, &ns.field("matchLabels")).unwrap_or_default();
    if labels.is_empty() && yaml::plain(labels_node).data.as_mapping().is_some() {
        diag.error(
            labels_node,
            &ns.field("matchLabels"),
            format!(
                "is empty, and KubeArmor applies a host policy with no node labels to no node; \
                 {hint}"
            ),
        );
    }
    labels
}

fn parse_action(map: &Map<'_, '_>, diag: &mut Diag<'_>) -> Option<Action> {
    let s = map.string(diag, "action")?;
    match s.as_str() {
        // KubeArmor treats an empty action as unset.
        "" => None,
        "Allow" => Some(Action::Allow),
        "Audit" => Some(Action::Audit),
        "Block" => Some(Action::Block),
        other => {
            let node = map.get("action").unwrap_or(map.node());
            diag.error(
                node,
                &map.field("action"),
                format!(
                    "`{other}` is not an action; use exactly Allow, Audit or Block (KubeArmor's \
                     CRD accepts only these spellings)"
                ),
            );
            None
        }
    }
}

fn parse_severity(map: &Map<'_, '_>, diag: &mut Diag<'_>) -> Option<u8> {
    let v = map.integer(diag, "severity")?;
    match u8::try_from(v) {
        Ok(s @ 1..=10) => Some(s),
        _ => {
            let node = map.get("severity").unwrap_or(map.node());
            diag.error(
                node,
                &map.field("severity"),
                format!("must be between 1 and 10, found {v}"),
            );
            None
        }
    }
}

struct RuleContext<'a> {
    path: String,
    is_host: bool,
    defaults: &'a Inherited,
    /// Whether KubeArmor would split this item's comma-separated protocol.
    kubearmor_expands: bool,
}

const RULE_KEYS: [&str; 7] = [
    "protocol",
    "fromSource",
    "severity",
    "tags",
    "message",
    "action",
    "pts",
];

/// One `matchProtocols` item: one rule per protocol name in it.
fn parse_rule(node: &Node<'_>, ctx: &RuleContext<'_>, diag: &mut Diag<'_>) -> Vec<Rule> {
    let Some(m) = Map::read(diag, node, &ctx.path) else {
        return Vec::new();
    };
    m.reject_unknown(diag, &RULE_KEYS);
    let protocol = m
        .require(diag, "protocol", "name the protocol, e.g. `protocol: icmp`")
        .and_then(|n| yaml::string(diag, n, &m.field("protocol")));
    let sources = parse_sources(&m, ctx.is_host, diag);
    let own = Inherited::read(&m, diag).over(ctx.defaults);
    if let Some(pts) = m.boolean(diag, "pts")
        && !pts
    {
        diag.warn(
            m.get("pts").unwrap_or(m.node()),
            &m.field("pts"),
            "icmp-guard cannot tell terminal sessions apart: this rule applies to every process \
             it matches, with or without a terminal",
        );
    }
    let Some(protocol) = protocol else {
        return Vec::new();
    };
    let proto_node = m.get("protocol").unwrap_or(m.node());
    let names: Vec<&str> = protocol.split(',').map(str::trim).collect();
    if names.len() > 1 && !ctx.kubearmor_expands {
        diag.warn(
            proto_node,
            &m.field("protocol"),
            format!(
                "KubeArmor splits comma-separated protocols only when the first matchProtocols \
                 item has a comma, so it would not apply `{protocol}`; icmp-guard applies each \
                 name. Write one item per protocol to mean the same in both"
            ),
        );
    }
    let origin = diag.origin(m.node());
    let mut rules = Vec::new();
    for name in names {
        if name.is_empty() {
            diag.error(
                proto_node,
                &m.field("protocol"),
                format!("`{protocol}` has an empty name between commas; remove the extra comma"),
            );
            continue;
        }
        let Some(classes) = protocol_classes(name) else {
            diag.error(
                proto_node,
                &m.field("protocol"),
                format!(
                    "unknown protocol `{name}`; use one of {} (any case; several separated by \
                     commas)",
                    PROTOCOL_NAMES.join(", ")
                ),
            );
            continue;
        };
        rules.push(Rule {
            classes,
            protocol: name.to_string(),
            sources: sources.clone(),
            // KubeArmor: an empty `spec.action` means Block.
            action: own.action.unwrap_or(Action::Block),
            severity: own.severity,
            tags: own.tags.clone(),
            message: own.message.clone(),
            origin: origin.clone(),
        });
    }
    rules
}

/// `fromSource[].path` of a network rule: the executables it is limited to.
fn parse_sources(rule: &Map<'_, '_>, is_host: bool, diag: &mut Diag<'_>) -> Vec<PathBuf> {
    let field = rule.field("fromSource");
    let present = rule.get("fromSource").is_some();
    let items = rule.sequence(diag, "fromSource");
    // A list of the wrong type was reported already; an empty list means "any executable",
    // which a host rule may not say.
    if is_host && (!present || items.is_some_and(|i| i.is_empty())) {
        let node = rule.entry("fromSource").map_or(rule.node(), |e| e.key_node);
        diag.error(
            node,
            &field,
            "is required in a KubeArmorHostPolicy network rule (KubeArmor's CRD requires it); \
             name the executables, e.g. `fromSource: [{path: /usr/bin/ping}]`",
        );
    }
    let mut sources = Vec::new();
    for (i, node) in items.unwrap_or_default().iter().enumerate() {
        let path = yaml::item(&field, i);
        let Some(src) = Map::read(diag, node, &path) else {
            continue;
        };
        for e in src.entries() {
            if e.key != "path" {
                diag.error(
                    e.key_node,
                    &src.field(e.key),
                    format!(
                        "`{}` is not allowed in a network rule's fromSource: KubeArmor matches \
                         network rules by executable `path` only; list each executable, e.g. \
                         `- path: /usr/bin/ping`",
                        e.key
                    ),
                );
            }
        }
        let Some(p) = src
            .require(
                diag,
                "path",
                "write the executable's absolute path, e.g. `path: /usr/bin/ping`",
            )
            .and_then(|n| yaml::string(diag, n, &src.field("path")))
        else {
            continue;
        };
        let node = src.get("path").unwrap_or(src.node());
        if let Err(reason) = check_source_path(&p) {
            diag.error(node, &src.field("path"), reason);
            continue;
        }
        sources.push(PathBuf::from(p));
    }
    sources
}

/// KubeArmor's CRD pattern `^\/+.*[^\/]$` and `maxLength: 200`.
fn check_source_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!(
            "`{p}` is not an absolute path; use the executable's full path as seen inside the \
             container, such as /usr/bin/ping"
        ));
    }
    if p.ends_with('/') {
        return Err(format!(
            "`{p}` ends with `/`, which names a directory; network rules match one executable: \
             remove the trailing `/` and name the program, such as /usr/bin/ping"
        ));
    }
    let chars = p.chars().count();
    if chars > MAX_SOURCE_PATH_CHARS {
        return Err(format!(
            "is {chars} characters long; KubeArmor allows at most {MAX_SOURCE_PATH_CHARS}: use a \
             shorter path to the executable"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_all_map() {
        for name in PROTOCOL_NAMES {
            assert!(protocol_classes(name).is_some(), "{name}");
            assert!(protocol_classes(&name.to_uppercase()).is_some(), "{name}");
        }
        assert_eq!(protocol_classes("nope"), None);
        assert_eq!(protocol_classes("ICMPv6"), Some(vec![Class::Icmpv6]));
        assert_eq!(protocol_classes("all"), Some(Class::ALL_MANAGED.to_vec()));
        assert_eq!(
            protocol_classes("stream"),
            Some(vec![Class::Tcp, Class::Sctp])
        );
        assert!(!protocol_classes("all").unwrap().contains(&Class::Unmanaged));
    }

    #[test]
    fn source_paths() {
        assert!(check_source_path("/usr/bin/ping").is_ok());
        assert!(check_source_path("//usr/bin/ping").is_ok());
        assert!(check_source_path("/").is_err());
        assert!(check_source_path("usr/bin/ping").is_err());
        assert!(check_source_path("/usr/bin/").is_err());
        assert!(check_source_path(&format!("/{}", "a".repeat(199))).is_ok());
        assert!(check_source_path(&format!("/{}", "a".repeat(200))).is_err());
    }
}
