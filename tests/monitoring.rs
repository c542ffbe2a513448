//! Monitoring assets (docs/monitoring/) and `novacron health`: the alert
//! rules pass promtool, and every metric they or the dashboard use is one a
//! real daemon exports.

mod common;

use common::{call, Daemon, Opts, BIN};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring").join(name)
}

fn promtool(args: &[&str]) {
    assert!(
        common::which("promtool"),
        "promtool is missing: install the Debian package prometheus (tests/setup-host.sh)"
    );
    let out = Command::new("promtool").args(args).current_dir(asset("")).output().expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
}

/// `novacron_*` names in a text, with histogram suffixes kept.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("novacron_") {
        let start = i + at;
        let prev_ok = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if prev_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

fn run(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let r = common::cli(d, args);
    (r.code, r.stdout, r.stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn assets_use_exported_metrics_and_health_reports() {
    let d = Daemon::start("monitoring", Opts::test_driver(62));
    let admin = d.admin();
    // Traffic, so the per-request series exist.
    let spec = json!({"name": "m1", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}]});
    let (s, _) = call(&admin, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = call(&admin, Method::GET, "/v1/vms/none", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&admin, Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = call(&admin, Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let scrape = body.as_str().expect("text exposition").to_string();
    // The exposition itself passes Prometheus' own linter.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (tests/setup-host.sh installs it)");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    // Families declared without a sample here: those of replicated disks
    // (tests/disk_replication.rs checks their samples).
    for l in scrape.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        if let Some((name, kind)) = l.split_once(' ') {
            if kind == "histogram" {
                exported.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
            exported.insert(name.to_string());
        }
    }
    for name in [
        "novacron_data_dir_free_bytes",
        "novacron_data_dir_size_bytes",
        "novacron_last_backup_timestamp_seconds",
        "novacron_tls_cert_expiry_timestamp_seconds",
    ] {
        assert!(exported.contains(name), "{name} not exported:\n{scrape}");
    }
    assert!(scrape.contains("novacron_last_backup_timestamp_seconds 0\n"), "no backup yet");

    let rules = std::fs::read_to_string(asset("alerts.yml")).unwrap();
    let dashboard_text = std::fs::read_to_string(asset("grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "panel {} target", p["title"]);
        }
    }
    for (what, text) in [("alerts.yml", &rules), ("grafana-dashboard.json", &dashboard_text)] {
        let used = metric_names(text);
        assert!(used.len() >= 5, "{what}: {used:?}");
        for name in used {
            assert!(exported.contains(&name), "{what} uses {name}, which the daemon does not export");
        }
    }

    // `novacron health`: every check, Nagios exit codes. The disk check
    // reads the host's real file system, which a busy test machine (image
    // builds) can bring under 15% free, so its thresholds are tested with
    // injected numbers (core/health.rs `thresholds`). Here every other
    // check is ok, and the report's status and exit code are the disk's.
    let (code, out, _) = run(&d, &["health", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["daemon", "libvirt", "store", "disk", "certificate", "files", "vms", "peer", "conflicts"],
        "{out}"
    );
    for c in checks.iter().filter(|c| c["name"] != "disk") {
        assert_eq!(c["status"], "ok", "{c}");
    }
    let disk = checks.iter().find(|c| c["name"] == "disk").unwrap()["status"].as_str().unwrap();
    let disk_code = match disk {
        "ok" => 0,
        "warning" => 1,
        other => panic!("disk check is {other}: {out}"),
    };
    assert_eq!((code, report["status"].as_str()), (disk_code, Some(disk)), "{out}");
    let (code, out, err) = run(&d, &["health"]);
    assert_eq!(code, disk_code, "{out}{err}");
    for check in names {
        assert!(out.lines().any(|l| l.starts_with(check)), "{check} missing:\n{out}");
    }
    assert!(out.contains("not paired"), "{out}");
    // Viewers may read it and the metrics; nobody without a token may.
    let viewer = {
        let (s, v) =
            call(&admin, Method::POST, "/v1/tokens", Some(json!({"name": "watcher", "role": "viewer"})))
                .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        d.https(v["secret"].as_str())
    };
    for path in ["/v1/health/details", "/metrics"] {
        let (s, v) = call(&viewer, Method::GET, path, None).await;
        assert_eq!(s, StatusCode::OK, "viewer {path}: {v}");
        let (s, _) = call(&d.https(None), Method::GET, path, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path} without a token");
    }
    // A daemon that cannot be asked is critical.
    let out = Command::new(BIN)
        .args(["--socket", "/nonexistent/novacron.sock", "health"])
        .env_remove("NOVACRON_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
}
