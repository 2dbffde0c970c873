//! Alerts in KubeArmor's JSON format, built from the kernel's decision records.
//!
//! Keys are the protobuf field names of KubeArmor's `feeder.Alert`, and empty fields are
//! omitted, as KubeArmor's own JSON does, so `karmor`, kubearmor-relay consumers and log
//! pipelines that read KubeArmor alerts read these unchanged. icmp-guard's own details go into
//! `EventData` (field 43 of the same message), never into new top-level keys.

use std::{collections::BTreeMap, sync::Arc};

use icmp_guard_common::{
    Class,
    class::{SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_TYPE_MASK},
    event::{PATH_COMPONENT_MAX, SocketEvent, flags},
    maps::{Action, HOST_WORKLOAD, RULE_POSTURE, SuppressKey},
};
use serde::{Deserialize, Serialize};

use crate::{
    compile::RuleInfo,
    kernel::enforcer::EnforcerKind,
    sources::workload::{PENDING_PODS, Workload},
};

fn is_zero(v: &i32) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "Ref", default, skip_serializing_if = "String::is_empty")]
    pub reference: String,
    #[serde(rename = "Name", default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(
        rename = "Namespace",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub namespace: String,
}

/// `feeder.Alert`, with KubeArmor's JSON key names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Alert {
    #[serde(rename = "Timestamp")]
    pub timestamp: i64,
    #[serde(rename = "UpdatedTime", skip_serializing_if = "String::is_empty")]
    pub updated_time: String,
    #[serde(rename = "ClusterName", skip_serializing_if = "String::is_empty")]
    pub cluster_name: String,
    #[serde(rename = "HostName", skip_serializing_if = "String::is_empty")]
    pub host_name: String,
    #[serde(rename = "NamespaceName", skip_serializing_if = "String::is_empty")]
    pub namespace_name: String,
    #[serde(rename = "Owner", skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    #[serde(rename = "PodName", skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    #[serde(rename = "Labels", skip_serializing_if = "String::is_empty")]
    pub labels: String,
    #[serde(rename = "ContainerID", skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    #[serde(rename = "ContainerName", skip_serializing_if = "String::is_empty")]
    pub container_name: String,
    #[serde(rename = "ContainerImage", skip_serializing_if = "String::is_empty")]
    pub container_image: String,
    #[serde(rename = "HostPPID", skip_serializing_if = "is_zero")]
    pub host_ppid: i32,
    #[serde(rename = "HostPID", skip_serializing_if = "is_zero")]
    pub host_pid: i32,
    #[serde(rename = "PPID", skip_serializing_if = "is_zero")]
    pub ppid: i32,
    #[serde(rename = "PID", skip_serializing_if = "is_zero")]
    pub pid: i32,
    #[serde(rename = "UID", skip_serializing_if = "is_zero")]
    pub uid: i32,
    #[serde(rename = "ParentProcessName", skip_serializing_if = "String::is_empty")]
    pub parent_process_name: String,
    #[serde(rename = "ProcessName", skip_serializing_if = "String::is_empty")]
    pub process_name: String,
    #[serde(rename = "PolicyName", skip_serializing_if = "String::is_empty")]
    pub policy_name: String,
    #[serde(rename = "Severity", skip_serializing_if = "String::is_empty")]
    pub severity: String,
    #[serde(rename = "Tags", skip_serializing_if = "String::is_empty")]
    pub tags: String,
    #[serde(rename = "ATags", skip_serializing_if = "Vec::is_empty")]
    pub atags: Vec<String>,
    #[serde(rename = "Message", skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(rename = "Type", skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(rename = "Source", skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(rename = "Operation", skip_serializing_if = "String::is_empty")]
    pub operation: String,
    #[serde(rename = "Resource", skip_serializing_if = "String::is_empty")]
    pub resource: String,
    #[serde(rename = "Data", skip_serializing_if = "String::is_empty")]
    pub data: String,
    #[serde(rename = "Enforcer", skip_serializing_if = "String::is_empty")]
    pub enforcer: String,
    #[serde(rename = "Action", skip_serializing_if = "String::is_empty")]
    pub action: String,
    #[serde(rename = "Result", skip_serializing_if = "String::is_empty")]
    pub result: String,
    #[serde(rename = "MaxAlertsPerSec", skip_serializing_if = "is_zero")]
    pub max_alerts_per_sec: i32,
    #[serde(rename = "DroppingAlertsInterval", skip_serializing_if = "is_zero")]
    pub dropping_alerts_interval: i32,
    #[serde(rename = "EventData", skip_serializing_if = "BTreeMap::is_empty")]
    pub event_data: BTreeMap<String, String>,
}

/// What is needed to turn a kernel record into an alert.
pub struct Context {
    pub cluster_name: String,
    pub host_name: String,
    pub enforcer: EnforcerKind,
    /// `CLOCK_REALTIME - CLOCK_BOOTTIME` in nanoseconds, to place boot-time stamps on the wall.
    pub boot_to_unix_ns: i128,
    pub workloads: BTreeMap<u32, Workload>,
    /// Workloads that went away, most recent last: an alert decided before a pod was deleted may
    /// be read after, and still names it. Ids are never reused.
    pub gone: std::collections::VecDeque<u32>,
    /// Rule tables of the last policy updates, by epoch.
    pub rules: RuleTables,
    /// Executable paths seen in alerts, by identity: what a suppression summary names.
    pub executables: std::sync::Mutex<BTreeMap<(u64, u64), String>>,
}

/// Rule tables by the epoch of the policy update that installed them (`maps::control`). An
/// alert names its epoch; it may be read after later updates, so several tables are kept.
#[derive(Clone, Debug, Default)]
pub struct RuleTables {
    by_epoch: BTreeMap<u16, Arc<Vec<RuleInfo>>>,
}

impl RuleTables {
    /// Updates older than the last this many are forgotten; an alert that old names no rule
    /// and says so.
    const KEEP: usize = 16;

    pub fn insert(&mut self, epoch: u16, rules: Arc<Vec<RuleInfo>>) {
        self.by_epoch.insert(epoch, rules);
        // Epochs wrap at 2^16: forget by insertion distance, not by value.
        while self.by_epoch.len() > Self::KEEP {
            let oldest = *self
                .by_epoch
                .keys()
                .max_by_key(|e| epoch.wrapping_sub(**e))
                .expect("not empty");
            self.by_epoch.remove(&oldest);
        }
    }

    pub fn get(&self, epoch: u16) -> Option<&Arc<Vec<RuleInfo>>> {
        self.by_epoch.get(&epoch)
    }
}

/// Copies a ring-buffer record out (records are not aligned).
pub fn decode(bytes: &[u8]) -> Option<SocketEvent> {
    if bytes.len() < std::mem::size_of::<SocketEvent>() {
        return None;
    }
    // SAFETY: length checked; SocketEvent is plain old data; read_unaligned copes with any
    // alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SocketEvent>()) })
}

/// Rebuilds a path the kernel wrote leaf first, one fixed slot per step (empty slots are mount
/// crossings).
pub fn path_from_slots(buf: &[u8], slots: u16) -> String {
    let parts: Vec<String> = buf
        .chunks(PATH_COMPONENT_MAX)
        .take(slots as usize)
        .map(|slot| slot.split(|&b| b == 0).next().unwrap_or(&[]))
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let mut path = String::new();
    for p in parts.iter().rev() {
        path.push('/');
        path.push_str(p);
    }
    path
}

/// NUL-separated argv → the arguments after argv\[0\].
fn arguments(buf: &[u8], len: u16) -> Vec<String> {
    let len = (len as usize).min(buf.len());
    buf[..len]
        .split(|&b| b == 0)
        .skip(1)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

pub fn family_name(family: u16) -> String {
    match family {
        1 => "AF_UNIX".into(),
        2 => "AF_INET".into(),
        10 => "AF_INET6".into(),
        16 => "AF_NETLINK".into(),
        17 => "AF_PACKET".into(),
        other => format!("AF_{other}"),
    }
}

/// `SOCK_DGRAM|SOCK_NONBLOCK|SOCK_CLOEXEC`, as KubeArmor writes it.
pub fn type_name(sock_type: u32) -> String {
    let mut s = match sock_type & SOCK_TYPE_MASK {
        1 => "SOCK_STREAM".to_string(),
        2 => "SOCK_DGRAM".to_string(),
        3 => "SOCK_RAW".to_string(),
        4 => "SOCK_RDM".to_string(),
        5 => "SOCK_SEQPACKET".to_string(),
        6 => "SOCK_DCCP".to_string(),
        10 => "SOCK_PACKET".to_string(),
        other => format!("SOCK_{other}"),
    };
    if sock_type & SOCK_NONBLOCK != 0 {
        s.push_str("|SOCK_NONBLOCK");
    }
    if sock_type & SOCK_CLOEXEC != 0 {
        s.push_str("|SOCK_CLOEXEC");
    }
    s
}

pub fn rfc3339_micros(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) as i64;
    let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
    chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default()
}

/// `CLOCK_REALTIME - CLOCK_BOOTTIME`, the offset that places `bpf_ktime_get_boot_ns` stamps.
pub fn boot_to_unix_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_BOOTTIME)
}

fn now_unix_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// What every alert starts with: its time (seconds and RFC 3339 with microseconds), the
/// cluster and the host. The socket and the guard alerts fill in the rest.
pub fn alert_at(unix_ns: i128, cluster_name: &str, host_name: &str) -> Alert {
    Alert {
        timestamp: unix_ns.div_euclid(1_000_000_000) as i64,
        updated_time: rfc3339_micros(unix_ns),
        cluster_name: cluster_name.to_string(),
        host_name: host_name.to_string(),
        ..Default::default()
    }
}

impl Context {
    fn base(&self, unix_ns: i128) -> Alert {
        alert_at(unix_ns, &self.cluster_name, &self.host_name)
    }

    pub fn alert(&self, ev: &SocketEvent) -> Alert {
        let unix_ns = ev.boot_ns as i128 + self.boot_to_unix_ns;
        let mut a = self.base(unix_ns);
        let process = path_from_slots(&ev.exe, ev.exe_len);
        let parent = path_from_slots(&ev.parent_exe, ev.parent_len);
        let args = arguments(&ev.cmdline, ev.cmdline_len);
        let comm =
            String::from_utf8_lossy(ev.comm.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
        // KubeArmor builds Source from the executable's path and the arguments, not from argv[0],
        // which the caller chooses.
        let head = if process.is_empty() { &comm } else { &process };
        a.source = std::iter::once(head.clone())
            .chain(args)
            .collect::<Vec<_>>()
            .join(" ");
        a.process_name = process;
        a.parent_process_name = parent;
        a.host_pid = ev.host_pid as i32;
        a.host_ppid = ev.host_ppid as i32;
        a.pid = if ev.ns_pid != 0 {
            ev.ns_pid
        } else {
            ev.host_pid
        } as i32;
        a.ppid = if ev.ns_pid != 0 {
            ev.ns_ppid
        } else {
            ev.host_ppid
        } as i32;
        a.uid = ev.uid as i32;
        a.operation = "Network".into();
        a.resource = format!(
            "domain={} type={} protocol={}",
            family_name(ev.family),
            type_name(ev.sock_type),
            ev.protocol
        );
        a.data = "syscall=SYS_SOCKET".into();
        a.enforcer = self.enforcer.alert_name().into();
        let denied = ev.flags & flags::DENIED != 0;
        a.action = match Action::from_u8(ev.action) {
            Action::Allow => "Allow",
            Action::Audit => "Audit",
            Action::Block if denied => "Block",
            Action::Block => "Audit (Block)",
        }
        .into();
        a.result = if denied {
            "Permission denied"
        } else {
            "Passed"
        }
        .into();

        if ev.workload == HOST_WORKLOAD {
            a.kind = "MatchedHostPolicy".into();
        } else if ev.workload == PENDING_PODS {
            a.kind = "MatchedPolicy".into();
            a.event_data.insert(
                "Workload".into(),
                "a pod not yet known to icmp-guard: the default posture applies to every class \
                 a KubeArmorPolicy names until it is"
                    .into(),
            );
        } else {
            a.kind = "MatchedPolicy".into();
            if let Some(w) = self.workloads.get(&ev.workload) {
                a.namespace_name = w.namespace.clone();
                a.labels = w.labels_string();
                a.pod_name = w.pod.clone().unwrap_or_default();
                a.container_name = w.container.clone().unwrap_or_default();
                a.owner = w.owner.as_ref().map(|o| Owner {
                    reference: o.kind.clone(),
                    name: o.name.clone(),
                    namespace: o.namespace.clone(),
                });
                // The caller's own cgroup is its container's.
                if let Some(c) = w.container(ev.cgroup_id) {
                    a.container_id = c.id.clone();
                    if let Some(name) = &c.name {
                        a.container_name = name.clone();
                    }
                    a.container_image = c.image.clone().unwrap_or_default();
                }
            }
        }
        if ev.rule == RULE_POSTURE {
            a.policy_name = "DefaultPosture".into();
        } else if let Some(r) = self.rule(ev.epoch, ev.rule) {
            a.policy_name = r.policy.clone();
            a.severity = r.severity.map(|s| s.to_string()).unwrap_or_default();
            a.tags = r.tags.join(",");
            a.atags = r.tags.clone();
            a.message = r.message.clone().unwrap_or_default();
            a.event_data
                .insert("RuleOrigin".into(), r.origin.to_string());
        } else {
            a.event_data.insert(
                "Rule".into(),
                format!(
                    "unknown: rule {} of policy update {}, which is no longer kept",
                    ev.rule, ev.epoch
                ),
            );
        }
        if !a.process_name.is_empty() {
            self.executables
                .lock()
                .expect("executables lock")
                .insert((ev.exe_dev, ev.exe_ino), a.process_name.clone());
        }

        let class = Class::from_u8(ev.class);
        let d = &mut a.event_data;
        d.insert("Class".into(), class.name().into());
        d.insert("Comm".into(), comm);
        d.insert("CgroupID".into(), ev.cgroup_id.to_string());
        d.insert(
            "Executable".into(),
            format!(
                "{}:{}/{}",
                ev.exe_dev >> 20,
                ev.exe_dev & 0xfffff,
                ev.exe_ino
            ),
        );
        let incomplete: Vec<&str> = [
            (flags::EXE_TRUNCATED, "ProcessName"),
            (flags::PARENT_TRUNCATED, "ParentProcessName"),
            (flags::CMDLINE_TRUNCATED, "Source"),
            (flags::NO_EXE, "Executable"),
        ]
        .iter()
        .filter(|(bit, _)| ev.flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
        if !incomplete.is_empty() {
            d.insert("Incomplete".into(), incomplete.join(","));
        }
        if ev.flags & flags::TYPE_FLAGS_KNOWN == 0 {
            d.insert("TypeFlags".into(), "unknown".into());
        }
        a
    }

    /// The workloads now in force; the ones that went stay known for late alerts (at most
    /// [`Self::GONE_KEPT`]).
    pub fn set_workloads(&mut self, workloads: &[Workload]) {
        let now: BTreeMap<u32, Workload> = workloads.iter().map(|w| (w.id, w.clone())).collect();
        for id in self.workloads.keys() {
            if !now.contains_key(id) && !self.gone.contains(id) {
                self.gone.push_back(*id);
            }
        }
        let mut kept = std::mem::take(&mut self.workloads);
        while self.gone.len() > Self::GONE_KEPT {
            if let Some(id) = self.gone.pop_front() {
                kept.remove(&id);
            }
        }
        kept.retain(|id, _| self.gone.contains(id));
        kept.extend(now);
        self.workloads = kept;
    }

    const GONE_KEPT: usize = 256;

    fn rule(&self, epoch: u16, index: u32) -> Option<&RuleInfo> {
        self.rules.get(epoch)?.get(index as usize)
    }

    /// A `SystemEvent` announcing alerts that were not delivered, and why. KubeArmor announces
    /// its own throttling the same way.
    pub fn loss_event(&self, what: &str, count: u64, workload: Option<u32>, limit: u32) -> Alert {
        let mut a = self.base(now_unix_ns());
        a.kind = "SystemEvent".into();
        a.operation = "AlertThreshold".into();
        a.enforcer = self.enforcer.alert_name().into();
        a.max_alerts_per_sec = limit as i32;
        a.dropping_alerts_interval = 1;
        let who = match workload.and_then(|w| self.workloads.get(&w)) {
            Some(w) => {
                a.namespace_name = w.namespace.clone();
                a.labels = w.labels_string();
                a.pod_name = w.pod.clone().unwrap_or_default();
                format!("workload {}", w.name)
            }
            None if workload == Some(HOST_WORKLOAD) => "the host".to_string(),
            None => "all workloads".to_string(),
        };
        a.message = format!("{count} alerts {what} for {who}");
        a.event_data.insert("Reason".into(), what.into());
        a.event_data.insert("Count".into(), count.to_string());
        a
    }

    /// The rate limit's summary for one workload: how many alerts were suppressed, and for
    /// each (process, class, policy, action) how many, largest first, so that a flood from one
    /// scanner never hides that another program was blocked. `entries` are the counts since the
    /// last summary, all of one workload.
    pub fn suppression_event(&self, entries: &[(SuppressKey, u64)], limit: u32) -> Alert {
        let total = entries.iter().map(|(_, n)| n).sum();
        let workload = entries.first().map(|(k, _)| k.workload);
        let mut a = self.loss_event("suppressed by the alert rate limit", total, workload, limit);
        // Keys that read the same (one program under two policy epochs, say) are one line.
        let mut by_text: std::collections::BTreeMap<String, u64> = Default::default();
        for (k, n) in entries {
            *by_text.entry(self.suppressed_as_text(k)).or_default() += n;
        }
        let mut lines: Vec<(u64, String)> = by_text.into_iter().map(|(t, n)| (n, t)).collect();
        lines.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| x.1.cmp(&y.1)));
        let listed: Vec<String> = lines
            .iter()
            .map(|(n, what)| format!("{n} x {what}"))
            .collect();
        a.message = format!("{}: {}", a.message, listed.join("; "));
        a.event_data.insert("Suppressed".into(), listed.join("; "));
        a
    }

    /// `process=… class=… policy=… action=…` for a suppressed alert.
    fn suppressed_as_text(&self, k: &SuppressKey) -> String {
        let process = self
            .executables
            .lock()
            .expect("executables lock")
            .get(&(k.exe_dev, k.exe_ino))
            .cloned()
            .unwrap_or_else(|| {
                format!(
                    "executable {}:{}/{}",
                    k.exe_dev >> 20,
                    k.exe_dev & 0xfffff,
                    k.exe_ino
                )
            });
        let policy = if k.rule == RULE_POSTURE {
            "DefaultPosture".to_string()
        } else {
            self.rule(k.epoch, k.rule)
                .map(|r| r.policy.clone())
                .unwrap_or_else(|| format!("rule {} of policy update {}", k.rule, k.epoch))
        };
        let action = match Action::from_u8(k.action) {
            Action::Allow => "Allow",
            Action::Audit => "Audit",
            Action::Block if k.denied != 0 => "Block",
            Action::Block => "Audit (Block)",
        };
        format!(
            "process={process} class={} policy={policy} action={action}",
            Class::from_u8(k.class).name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_rebuilt_root_first() {
        let mut buf = vec![0u8; PATH_COMPONENT_MAX * 4];
        for (i, name) in ["hping3", "sbin", "", "usr"].iter().enumerate() {
            buf[i * PATH_COMPONENT_MAX..][..name.len()].copy_from_slice(name.as_bytes());
        }
        assert_eq!(path_from_slots(&buf, 4), "/usr/sbin/hping3");
        assert_eq!(path_from_slots(&buf, 0), "");
    }

    #[test]
    fn resource_matches_the_seed_alert() {
        assert_eq!(
            type_name(2 | SOCK_NONBLOCK | SOCK_CLOEXEC),
            "SOCK_DGRAM|SOCK_NONBLOCK|SOCK_CLOEXEC"
        );
        assert_eq!(type_name(3), "SOCK_RAW");
        assert_eq!(family_name(2), "AF_INET");
        assert_eq!(family_name(17), "AF_PACKET");
    }

    #[test]
    fn source_skips_argv0() {
        let buf = b"hping3\0www.google.com\0";
        assert_eq!(arguments(buf, buf.len() as u16), vec!["www.google.com"]);
    }

    #[test]
    fn updated_time_is_rfc3339_with_microseconds() {
        assert_eq!(
            rfc3339_micros(1_696_593_032_098_937_000),
            "2023-10-06T11:50:32.098937Z"
        );
    }
}
