//! Policy compilation: a [`PolicySet`] and the workloads → the exact map entries the kernel
//! programs look up.
//!
//! All policy logic lives here, in userspace: which policies select which workload, how Block,
//! Audit and Allow combine, allow-list mode and the default posture. The kernel only does
//! "(workload, class, executable) → verdict, else (workload, class) → verdict, else posture".

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};
use icmp_guard_common::{
    Class,
    maps::{
        HOST_WORKLOAD, MAX_RULES, MAX_WORKLOAD_CGROUPS, MAX_WORKLOADS, Settings, WorkloadPolicy,
    },
};

pub mod guard;
pub mod identity;

use crate::sources::{
    policy::{Action, LabelOperator, Origin, Policy, PolicySet, Selector, Target},
    workload::{ContainerRoot, PENDING_PODS, Root, Workload},
};
use identity::{ExecutableId, Resolver};

/// Which sockets allow-list mode puts under the default posture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PostureScope {
    /// Only the classes named by the workload's Allow rules: allowing icmp from ping leaves
    /// nginx's tcp alone.
    #[default]
    Protocol,
    /// KubeArmor's behaviour: every managed class of the workload.
    Workload,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Postures {
    /// Default posture of workloads (KubeArmor `defaultNetworkPosture`).
    pub workloads: Action,
    /// Default posture of the host (KubeArmor `hostDefaultNetworkPosture`).
    pub host: Action,
    /// Per-namespace override (KubeArmor's `kubearmor-network-posture` annotation).
    pub namespaces: BTreeMap<String, Action>,
    pub scope: PostureScope,
}

impl Default for Postures {
    fn default() -> Self {
        Self {
            workloads: Action::Block,
            host: Action::Block,
            namespaces: BTreeMap::new(),
            scope: PostureScope::Protocol,
        }
    }
}

/// What an alert needs to know about the rule that decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub policy: String,
    pub namespace: Option<String>,
    pub host: bool,
    pub protocol: String,
    pub action: Action,
    pub severity: Option<u8>,
    pub tags: Vec<String>,
    pub message: Option<String>,
    pub origin: Origin,
}

/// One lookup key without its generation: `exe == None` is the any-executable key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSlot {
    pub workload: u32,
    pub class: Class,
    pub exe: Option<ExecutableId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompiledVerdict {
    pub action: Action,
    /// Index into [`Compiled::rules_info`].
    pub rule: u32,
}

/// A `fromSource` path that names no file right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub path: PathBuf,
    pub origin: Origin,
    pub error: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    pub settings: Settings,
    pub cgroups: Vec<(u64, u32)>,
    pub workloads: BTreeMap<u32, WorkloadPolicy>,
    pub rules: BTreeMap<RuleSlot, CompiledVerdict>,
    pub rules_info: Vec<RuleInfo>,
    pub unresolved: Vec<Unresolved>,
    /// Every source path, resolved or not: watched so that a replaced or newly installed binary
    /// is picked up.
    pub sources: BTreeSet<PathBuf>,
}

pub struct Input<'a> {
    pub policies: &'a PolicySet,
    pub workloads: &'a [Workload],
    pub node_labels: &'a BTreeMap<String, String>,
    pub postures: &'a Postures,
    pub audit_only: bool,
    pub alerts_per_sec: u32,
}

/// Strictness when two rules give the same key different actions: Block beats Audit beats Allow.
fn rank(a: Action) -> u8 {
    match a {
        Action::Allow => 0,
        Action::Audit => 1,
        Action::Block => 2,
    }
}

pub fn compile(input: &Input, resolver: &Resolver) -> Result<Compiled> {
    let mut out = Compiled {
        settings: Settings {
            audit_only: input.audit_only as u8,
            has_workloads: !input.workloads.is_empty() as u8,
            _pad: [0; 2],
            alerts_per_sec: input.alerts_per_sec,
        },
        ..Default::default()
    };
    if input.workloads.len() + 1 > (MAX_WORKLOADS / 2) as usize {
        bail!(
            "{} workloads declared; at most {} fit in the kernel maps",
            input.workloads.len(),
            MAX_WORKLOADS / 2 - 1
        );
    }
    for w in input.workloads {
        out.cgroups.push((w.cgroup_id, w.id));
    }
    if out.cgroups.len() > (MAX_WORKLOAD_CGROUPS / 2) as usize {
        bail!("too many workload cgroups for the kernel maps");
    }

    let mut paths = Paths {
        host: resolver,
        host_cache: BTreeMap::new(),
        containers: BTreeMap::new(),
    };
    // One rule table entry per rule of a policy, whichever workloads it applies to.
    let mut rule_index: BTreeMap<(usize, usize), u32> = BTreeMap::new();

    // The host is workload 0; declared workloads follow.
    let mut targets: Vec<(u32, Option<&Workload>)> = vec![(HOST_WORKLOAD, None)];
    targets.extend(input.workloads.iter().map(|w| (w.id, Some(w))));

    for (wid, workload) in targets {
        if wid == PENDING_PODS {
            // Pods not known yet: the default posture for every class a pod policy names.
            let classes = input
                .policies
                .policies
                .iter()
                .filter(|p| matches!(p.target, Target::Workloads(_)))
                .flat_map(|p| &p.rules)
                .flat_map(|r| &r.classes)
                .fold(0u16, |m, c| m | c.bit());
            if classes != 0 {
                out.workloads.insert(
                    wid,
                    WorkloadPolicy {
                        rule_classes: 0,
                        posture_classes: classes,
                        posture_action: input.postures.workloads as u8,
                        _pad: [0; 3],
                    },
                );
            }
            continue;
        }
        let selected: Vec<(usize, &Policy)> = input
            .policies
            .policies
            .iter()
            .enumerate()
            .filter(|(_, p)| selects(p, workload, input.node_labels))
            .collect();
        if selected.is_empty() {
            // No policy at all: no decisions and no events for this workload.
            continue;
        }
        let mut allow_classes: u16 = 0;
        let mut rule_classes: u16 = 0;
        for (pi, policy) in selected {
            for (ri, rule) in policy.rules.iter().enumerate() {
                let index = *rule_index.entry((pi, ri)).or_insert_with(|| {
                    out.rules_info.push(RuleInfo {
                        policy: policy.name.clone(),
                        namespace: policy.namespace.clone(),
                        host: matches!(policy.target, Target::Host { .. }),
                        protocol: rule.protocol.clone(),
                        action: rule.action,
                        severity: rule.severity,
                        tags: rule.tags.clone(),
                        message: rule.message.clone(),
                        origin: rule.origin.clone(),
                    });
                    out.rules_info.len() as u32 - 1
                });
                let exes: Vec<Option<ExecutableId>> = if rule.sources.is_empty() {
                    vec![None]
                } else {
                    let mut ids = BTreeSet::new();
                    for source in &rule.sources {
                        ids.extend(paths.identities(workload, source, &rule.origin, &mut out));
                    }
                    ids.into_iter().map(Some).collect()
                };
                for &class in &rule.classes {
                    if rule.action == Action::Allow {
                        allow_classes |= class.bit();
                    }
                    for &exe in &exes {
                        rule_classes |= class.bit();
                        let slot = RuleSlot {
                            workload: wid,
                            class,
                            exe,
                        };
                        let verdict = CompiledVerdict {
                            action: rule.action,
                            rule: index,
                        };
                        match out.rules.entry(slot) {
                            Entry::Vacant(v) => {
                                v.insert(verdict);
                            }
                            Entry::Occupied(mut o) => {
                                if rank(verdict.action) > rank(o.get().action) {
                                    o.insert(verdict);
                                }
                            }
                        }
                    }
                }
            }
        }
        let posture = match workload {
            None => input.postures.host,
            Some(w) => input
                .postures
                .namespaces
                .get(&w.namespace)
                .copied()
                .unwrap_or(input.postures.workloads),
        };
        let posture_classes = if allow_classes == 0 {
            0
        } else {
            match input.postures.scope {
                PostureScope::Protocol => allow_classes,
                PostureScope::Workload => Class::ALL_MANAGED.iter().fold(0, |m, c| m | c.bit()),
            }
        };
        out.workloads.insert(
            wid,
            WorkloadPolicy {
                rule_classes,
                posture_classes,
                posture_action: posture as u8,
                _pad: [0; 3],
            },
        );
    }
    if out.rules.len() > (MAX_RULES / 2) as usize {
        bail!(
            "the policies compile to {} kernel rules; at most {} fit (each class × source × \
             workload is one rule)",
            out.rules.len(),
            MAX_RULES / 2
        );
    }
    Ok(out)
}

/// Paths already resolved through one root (`None`: no such file there).
type Resolved = BTreeMap<PathBuf, Option<ExecutableId>>;

/// Resolves `fromSource` paths where each workload's processes see them: the host's root for
/// the host and declared workloads, each running container's own root for a pod.
struct Paths<'r> {
    host: &'r Resolver,
    host_cache: Resolved,
    /// By the container root; `None` when it is gone (its process exited, its mount went).
    containers: BTreeMap<ContainerRoot, Option<(Resolver, Resolved)>>,
}

impl Paths<'_> {
    fn identities(
        &mut self,
        workload: Option<&Workload>,
        path: &Path,
        origin: &Origin,
        out: &mut Compiled,
    ) -> Vec<ExecutableId> {
        match workload.map(|w| &w.root) {
            None | Some(Root::Host) => {
                out.sources.insert(path.to_path_buf());
                let host = self.host;
                let id = *self
                    .host_cache
                    .entry(path.to_path_buf())
                    .or_insert_with(|| match host.resolve(path) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            out.unresolved.push(Unresolved {
                                path: path.to_path_buf(),
                                origin: origin.clone(),
                                error: e.to_string(),
                            });
                            None
                        }
                    });
                let staged = *self
                    .host_cache
                    .entry(staged_upgrade(path))
                    .or_insert_with(|| staged_identity(host, path));
                id.into_iter().chain(staged).collect()
            }
            // A container without the file (or still being set up) allows nothing through it:
            // that is the image's content, not an operator's mistake, so it is not reported.
            Some(Root::Containers(containers)) => containers
                .iter()
                .flat_map(|c| &c.roots)
                .filter_map(|root| {
                    let entry = self.containers.entry(root.clone()).or_insert_with(|| {
                        match root {
                            ContainerRoot::Process(pid) => Resolver::for_process(*pid),
                            ContainerRoot::Mount(dir) => Resolver::of_mount(dir),
                        }
                        .ok()
                        .map(|r| (r, BTreeMap::new()))
                    });
                    let (resolver, cache) = entry.as_mut()?;
                    *cache
                        .entry(path.to_path_buf())
                        .or_insert_with(|| resolver.resolve(path).ok())
                })
                .collect(),
        }
    }
}

/// Where dpkg writes the new version of `path` before renaming it over `path`.
pub fn staged_upgrade(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".dpkg-new");
    PathBuf::from(s)
}

/// The identity of the new version of `path` a package upgrade is installing, allowed ahead of
/// dpkg's rename so that no run of the upgraded program is refused between the rename and the
/// next compilation. Only a file that root wrote in a directory that only root may write: a
/// user who could create `<path>.dpkg-new` could otherwise get any program allowed.
fn staged_identity(host: &Resolver, path: &Path) -> Option<ExecutableId> {
    use std::os::unix::fs::MetadataExt;
    let staged = staged_upgrade(path);
    let file = std::fs::symlink_metadata(&staged).ok()?;
    let dir = std::fs::metadata(staged.parent()?).ok()?;
    let root_only = |m: &std::fs::Metadata| m.uid() == 0 && m.mode() & 0o022 == 0;
    (file.file_type().is_file() && root_only(&file) && dir.is_dir() && root_only(&dir))
        .then(|| host.resolve(&staged).ok())
        .flatten()
}

fn selects(
    policy: &Policy,
    workload: Option<&Workload>,
    node_labels: &BTreeMap<String, String>,
) -> bool {
    match (&policy.target, workload) {
        (Target::Host { node_selector }, None) => node_selector
            .iter()
            .all(|(k, v)| node_labels.get(k) == Some(v)),
        (Target::Workloads(sel), Some(w)) => {
            policy.namespace.as_deref().unwrap_or("default") == w.namespace
                && selector_matches(sel, &w.labels)
        }
        _ => false,
    }
}

/// `matchLabels` must all match; `matchExpressions` items (key `label`) hold `k=v` or `k` values:
/// `In` needs one of them present, `NotIn` none.
pub fn selector_matches(sel: &Selector, labels: &BTreeMap<String, String>) -> bool {
    let has = |value: &str| match value.split_once('=') {
        Some((k, v)) => labels.get(k).map(String::as_str) == Some(v),
        None => labels.contains_key(value),
    };
    sel.match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|e| match e.operator {
            LabelOperator::In => e.values.iter().any(|v| has(v)),
            LabelOperator::NotIn => !e.values.iter().any(|v| has(v)),
        })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::sources::policy::{LabelExpression, Rule};

    fn rule(classes: &[Class], sources: &[&Path], action: Action) -> Rule {
        Rule {
            classes: classes.to_vec(),
            protocol: "test".into(),
            sources: sources.iter().map(|p| p.to_path_buf()).collect(),
            action,
            severity: None,
            tags: vec![],
            message: None,
            origin: Origin::default(),
        }
    }

    fn pod_policy(name: &str, labels: &[(&str, &str)], rules: Vec<Rule>) -> Policy {
        Policy {
            name: name.into(),
            namespace: Some("default".into()),
            target: Target::Workloads(Selector {
                match_labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                match_expressions: vec![],
            }),
            rules,
            origin: Origin::default(),
        }
    }

    fn nginx() -> Workload {
        Workload {
            id: 1,
            name: "nginx".into(),
            namespace: "default".into(),
            labels: [("app".to_string(), "nginx".to_string())].into(),
            pod: None,
            container: None,
            cgroup: PathBuf::from("/sys/fs/cgroup/nginx"),
            cgroup_id: 4242,
            owner: None,
            root: Root::Host,
        }
    }

    fn compile_one(policies: Vec<Policy>, postures: &Postures) -> Compiled {
        let set = PolicySet {
            policies,
            network: Vec::new(),
        };
        let workloads = [nginx()];
        compile(
            &Input {
                policies: &set,
                workloads: &workloads,
                node_labels: &BTreeMap::new(),
                postures,
                audit_only: false,
                alerts_per_sec: 10,
            },
            &Resolver::host().unwrap(),
        )
        .unwrap()
    }

    /// Two real files with distinct identities, as fromSource paths.
    fn tools() -> (PathBuf, PathBuf, Resolver) {
        let dir = std::env::temp_dir().join(format!("icmp-guard-compile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("ping"), dir.join("other"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        (a, b, Resolver::host().unwrap())
    }

    #[test]
    fn the_seed_policy_compiles_to_source_rules_and_a_protocol_scoped_posture() {
        let (ping, _, r) = tools();
        let c = compile_one(
            vec![pod_policy(
                "restrict-scanning-tools",
                &[("app", "nginx")],
                vec![
                    rule(&[Class::Icmp], &[&ping], Action::Allow),
                    rule(&[Class::Udp], &[&ping], Action::Allow),
                ],
            )],
            &Postures::default(),
        );
        let id = r.resolve(&ping).unwrap();
        let slot = |class| RuleSlot {
            workload: 1,
            class,
            exe: Some(id),
        };
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.rules[&slot(Class::Icmp)].action, Action::Allow);
        assert_eq!(c.rules[&slot(Class::Udp)].action, Action::Allow);
        let wp = c.workloads[&1];
        assert_eq!(wp.posture_classes, Class::Icmp.bit() | Class::Udp.bit());
        assert_eq!(wp.posture_action, Action::Block as u8);
        // tcp is neither ruled nor under posture: nginx keeps serving.
        assert_eq!(wp.rule_classes & Class::Tcp.bit(), 0);
        assert_eq!(wp.posture_classes & Class::Tcp.bit(), 0);
        // No host policy: the host gets no entry, hence no decisions.
        assert!(!c.workloads.contains_key(&HOST_WORKLOAD));
        assert_eq!(c.cgroups, vec![(4242, 1)]);
    }

    #[test]
    fn workload_scope_puts_every_class_under_posture() {
        let (ping, _, _) = tools();
        let postures = Postures {
            scope: PostureScope::Workload,
            ..Postures::default()
        };
        let c = compile_one(
            vec![pod_policy(
                "p",
                &[("app", "nginx")],
                vec![rule(&[Class::Icmp], &[&ping], Action::Allow)],
            )],
            &postures,
        );
        let all = Class::ALL_MANAGED.iter().fold(0, |m, c| m | c.bit());
        assert_eq!(c.workloads[&1].posture_classes, all);
    }

    #[test]
    fn block_beats_audit_beats_allow_on_the_same_key() {
        let (ping, _, r) = tools();
        let c = compile_one(
            vec![
                pod_policy(
                    "allow",
                    &[("app", "nginx")],
                    vec![rule(&[Class::Raw], &[&ping], Action::Allow)],
                ),
                pod_policy(
                    "block",
                    &[("app", "nginx")],
                    vec![rule(&[Class::Raw], &[&ping], Action::Block)],
                ),
                pod_policy(
                    "audit",
                    &[("app", "nginx")],
                    vec![rule(&[Class::Raw], &[&ping], Action::Audit)],
                ),
            ],
            &Postures::default(),
        );
        let v = c.rules[&RuleSlot {
            workload: 1,
            class: Class::Raw,
            exe: Some(r.resolve(&ping).unwrap()),
        }];
        assert_eq!(v.action, Action::Block);
        assert_eq!(c.rules_info[v.rule as usize].policy, "block");
    }

    #[test]
    fn source_and_class_rules_are_separate_keys() {
        let (ping, _, r) = tools();
        let c = compile_one(
            vec![pod_policy(
                "p",
                &[("app", "nginx")],
                vec![
                    rule(&[Class::Icmp], &[], Action::Block),
                    rule(&[Class::Icmp], &[&ping], Action::Allow),
                ],
            )],
            &Postures::default(),
        );
        // The kernel tries (class, source) first, so ping's Allow wins over the class Block.
        let any = RuleSlot {
            workload: 1,
            class: Class::Icmp,
            exe: None,
        };
        let mine = RuleSlot {
            exe: Some(r.resolve(&ping).unwrap()),
            ..any
        };
        assert_eq!(c.rules[&any].action, Action::Block);
        assert_eq!(c.rules[&mine].action, Action::Allow);
    }

    #[test]
    fn namespace_posture_overrides_the_default() {
        let (ping, _, _) = tools();
        let postures = Postures {
            namespaces: [("default".to_string(), Action::Audit)].into(),
            ..Postures::default()
        };
        let c = compile_one(
            vec![pod_policy(
                "p",
                &[("app", "nginx")],
                vec![rule(&[Class::Icmp], &[&ping], Action::Allow)],
            )],
            &postures,
        );
        assert_eq!(c.workloads[&1].posture_action, Action::Audit as u8);
    }

    #[test]
    fn unresolvable_sources_are_reported_not_installed() {
        let missing = PathBuf::from("/nonexistent/icmp-guard/ping");
        let c = compile_one(
            vec![pod_policy(
                "p",
                &[("app", "nginx")],
                vec![rule(&[Class::Icmp], &[&missing], Action::Allow)],
            )],
            &Postures::default(),
        );
        assert!(c.rules.is_empty());
        assert_eq!(c.unresolved.len(), 1);
        assert_eq!(c.unresolved[0].path, missing);
        // Allow-list mode still applies: nothing may open icmp until ping exists.
        assert_eq!(c.workloads[&1].posture_classes, Class::Icmp.bit());
        assert!(c.sources.contains(&missing));
    }

    #[test]
    fn selectors_follow_kubearmor() {
        let labels: BTreeMap<String, String> = [
            ("app".into(), "nginx".into()),
            ("tier".into(), "web".into()),
        ]
        .into();
        let sel = |ml: &[(&str, &str)], ex: Vec<LabelExpression>| Selector {
            match_labels: ml
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            match_expressions: ex,
        };
        let expr = |op, values: &[&str]| LabelExpression {
            operator: op,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        assert!(selector_matches(&sel(&[("app", "nginx")], vec![]), &labels));
        assert!(!selector_matches(
            &sel(&[("app", "redis")], vec![]),
            &labels
        ));
        assert!(selector_matches(
            &sel(&[], vec![expr(LabelOperator::In, &["app=nginx", "x=y"])]),
            &labels
        ));
        assert!(selector_matches(
            &sel(&[], vec![expr(LabelOperator::In, &["tier"])]),
            &labels
        ));
        assert!(!selector_matches(
            &sel(&[], vec![expr(LabelOperator::NotIn, &["tier=web"])]),
            &labels
        ));
        assert!(
            selector_matches(&sel(&[], vec![]), &labels),
            "an empty selector selects all"
        );
    }

    #[test]
    fn host_policies_need_matching_node_labels() {
        let host = Policy {
            name: "h".into(),
            namespace: None,
            target: Target::Host {
                node_selector: [("kubernetes.io/os".to_string(), "linux".to_string())].into(),
            },
            rules: vec![rule(&[Class::Raw], &[], Action::Audit)],
            origin: Origin::default(),
        };
        let linux: BTreeMap<String, String> = [("kubernetes.io/os".into(), "linux".into())].into();
        assert!(selects(&host, None, &linux));
        assert!(!selects(&host, None, &BTreeMap::new()));
        assert!(
            !selects(&host, Some(&nginx()), &linux),
            "host policies never select workloads"
        );
    }
}
