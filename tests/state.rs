//! The node's state across restarts: the data dir lock, the event feed
//! (sequence numbers that survive restarts, one event per change, one
//! shape), the certificate expiry, and a forced shutdown that outlives a
//! backup's pause (with a real TCG guest).

mod common;

use common::{call, virsh, wait_for, Daemon, Opts, BIN};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One event read from the feed: (seq, kind, data).
type Ev = (u64, String, Value);

/// Reads `GET /v1/events` over the socket for two seconds, resuming after
/// `after` (0: everything the daemon holds).
fn events(d: &Daemon, after: u64) -> Vec<Ev> {
    common::read_events(d, after)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["seq"].as_u64().unwrap(), v["kind"].as_str().unwrap().to_string(), v["data"].clone())
        })
        .collect()
}

/// The `vm.state` states announced for the VM `id`, in order.
fn states_of(evs: &[Ev], id: &str) -> Vec<String> {
    evs.iter()
        .filter(|e| e.1 == "vm.state" && e.2["vm"]["id"] == id)
        .map(|e| e.2["state"].as_str().unwrap().to_string())
        .collect()
}

/// Rewrites the daemon's config file (it is read again at restart).
fn edit_config(d: &Daemon, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, f(text)).unwrap();
}

/// `novacron health --json` over the socket: the named check.
fn health_check(d: &Daemon, name: &str) -> Value {
    let r = common::cli(d, &["health", "--json"]);
    let report: Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("{}{}", r.stdout, r.stderr));
    report["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap_or(Value::Null)
}

fn expiry_metric(scrape: &str) -> Option<i64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix("novacron_tls_cert_expiry_timestamp_seconds "))
        .map(|v| v.trim().parse::<f64>().unwrap() as i64)
}

async fn metrics(d: &Daemon) -> String {
    let (s, body) = call(&d.local(), Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    body.as_str().unwrap().to_string()
}

#[test]
fn second_daemon_on_one_data_dir_is_refused() {
    let d = Daemon::start("lock", Opts::test_driver(150));
    // Same data dir, its own address and socket: only the lock can stop it.
    let other = d.dir.join("second.toml");
    let text = std::fs::read_to_string(&d.config).unwrap();
    let addr = format!("127.0.0.151:{}", common::api_port());
    let text = text
        .replace(&format!("127.0.0.150:{}", common::api_port()), &addr)
        .replace("novacron.sock", "second.sock");
    std::fs::write(&other, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&other)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second daemon on the same data dir kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("in use") && err.contains(&format!("PID {}", d.pid())), "{err}");
    // The first one is untouched.
    d.wait_ready();
}

#[tokio::test(flavor = "multi_thread")]
async fn event_feed_resumes_across_restarts_once_per_change() {
    let mut d = Daemon::start("feed", Opts::test_driver(152));
    let c = d.admin();
    let (s, vm) =
        call(&c, Method::POST, "/v1/vms", Some(json!({"name": "e1", "vcpus": 1, "memory_mib": 64}))).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    for action in ["start", "stop", "start", "stop"] {
        let (s, v) = call(&c, Method::POST, &format!("/v1/vms/e1/{action}"), None).await;
        assert_eq!(s, StatusCode::OK, "{action}: {v}");
    }
    let (s, v) = call(&c, Method::POST, "/v1/vms/e1/snapshots", Some(json!({"name": "s1"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(call(&c, Method::DELETE, "/v1/vms/e1/snapshots/s1", None).await.0, StatusCode::NO_CONTENT);
    // Lifecycle events arrive after the API answered: let them in.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let all = events(&d, 0);
    // One event per transition, each naming the VM by id and name.
    assert_eq!(states_of(&all, &id), ["stopped", "running", "stopped", "running", "stopped"], "{all:?}");
    for e in all.iter().filter(|e| e.1 == "vm.state" || e.1.starts_with("snapshot.")) {
        assert_eq!(e.2["vm"], json!({"id": id, "name": "e1"}), "{e:?}");
    }
    let snaps: Vec<_> = all.iter().filter(|e| e.1.starts_with("snapshot.")).collect();
    assert_eq!(snaps.len(), 2, "{all:?}");
    assert!(snaps.iter().all(|e| e.2["snapshot"] == "s1"), "{snaps:?}");
    let last = all.last().unwrap().0;

    // A clean restart: the feed continues right after the last event.
    assert!(d.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()));
    d.restart();
    assert_eq!(call(&d.local(), Method::POST, "/v1/vms/e1/start", None).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resumed = events(&d, last);
    assert!(!resumed.is_empty(), "nothing after {last}");
    assert!(resumed.iter().all(|e| e.1 != "events.lost"), "{resumed:?}");
    assert_eq!(resumed[0].0, last + 1, "{resumed:?}");
    assert!(resumed.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{resumed:?}");
    assert_eq!(states_of(&resumed, &id), ["running"], "{resumed:?}");
    let last = resumed.last().unwrap().0;

    // kill -9: numbers still grow, and a client resuming is told that
    // events may be missing instead of silently getting fewer.
    d.kill9();
    d.restart();
    // The test driver forgot its domains with the old process: the VM is
    // defined again, stopped.
    let (s, v) = call(&d.local(), Method::POST, "/v1/vms/e1/start", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_crash = events(&d, last);
    assert_eq!(after_crash[0].1, "events.lost", "{after_crash:?}");
    assert_eq!(after_crash[0].2["after"], last);
    assert!(after_crash[1..].iter().all(|e| e.0 > last && e.0 > after_crash[0].0), "{after_crash:?}");
    assert_eq!(states_of(&after_crash, &id).last().map(String::as_str), Some("running"), "{after_crash:?}");
    // Resuming from the lost marker's number loses nothing more.
    let again = events(&d, after_crash[0].0);
    assert!(again.iter().all(|e| e.1 != "events.lost"), "{again:?}");
    assert_eq!(again, after_crash[1..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_expiry_is_read_at_every_start() {
    let mut d = Daemon::start("cert", Opts::test_driver(153));
    let first = health_check(&d, "certificate");
    assert!(first["message"].as_str().unwrap().starts_with("expires in"), "{first}");
    let expiry = expiry_metric(&metrics(&d).await).expect("expiry metric on first start");

    d.restart();
    let again = health_check(&d, "certificate");
    assert_eq!(again, first, "after a restart");
    assert_eq!(expiry_metric(&metrics(&d).await), Some(expiry), "metric after a restart");

    // A configured certificate that runs out in 20 days: warned about.
    let (cert, key) = (d.dir.join("own-cert.pem"), d.dir.join("own-key.pem"));
    common::self_signed_cert(&cert, &key, "localhost", 20);
    let end =
        Command::new("openssl").args(["x509", "-noout", "-enddate", "-in"]).arg(&cert).output().unwrap();
    let end = String::from_utf8_lossy(&end.stdout).trim().trim_start_matches("notAfter=").to_string();
    let end = Command::new("date").args(["-u", "-d", &end, "+%s"]).output().unwrap();
    let end: i64 = String::from_utf8_lossy(&end.stdout).trim().parse().unwrap();
    edit_config(&d, |t| t.replace("[api]\n", &format!("[api]\ntls_cert = {cert:?}\ntls_key = {key:?}\n")));
    d.restart();
    let own = health_check(&d, "certificate");
    assert_eq!(own["status"], "warning", "{own}");
    // openssl's 20 days are counted from the second it made the certificate.
    let msg = own["message"].as_str().unwrap();
    assert!(msg.starts_with("expires in 19 days") || msg.starts_with("expires in 20 days"), "{own}");
    assert_eq!(expiry_metric(&metrics(&d).await), Some(end));
    d.restart();
    let again = health_check(&d, "certificate");
    // The day count may tick over between the two checks; the date may not.
    let date = |c: &Value| c["message"].as_str().unwrap().split_once('(').map(|x| x.1.to_string());
    assert_eq!((&again["status"], date(&again)), (&own["status"], date(&own)), "configured, after a restart");
    assert_eq!(expiry_metric(&metrics(&d).await), Some(end));
}

/// A real guest that ignores ACPI (`acpi=off`): `vm shutdown --timeout`
/// must force it off when the timeout is up, even though a backup with
/// `--pause-running` paused and resumed it in between, the daemon was
/// killed (-9) and restarted meanwhile, and the daemon stops *following*
/// requests without a timeout much sooner. Also:
/// a snapshot of the running guest says it holds memory, as libvirt does.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn forced_shutdown_outlives_a_backup_pause() {
    let mut opts = Opts::test_driver(154);
    opts.uri = "qemu:///system".into();
    let mut d = Daemon::start("fshut", opts);
    // Requests without a timeout are followed for 3 s only.
    edit_config(&d, |t| {
        t.replace("memory_reserve_mib = 256\n", "memory_reserve_mib = 256\nshutdown_timeout_secs = 3\n")
    });
    assert!(d.terminate(Duration::from_secs(10)).is_some());
    d.restart();
    let (kernel, initrd) = common::install_guest(&d.data().join("boot"));
    let c = d.local();
    let name = format!("fshut-{}", std::process::id());
    let spec = json!({
        "name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"size_gib": 1}],
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 panic=-1 quiet acpi=off novacron.marker=fs"}
    });
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let log = d.data().join("logs").join(format!("{name}.{id}.console.log"));
    wait_for("the guest's marker", 120, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("NOVACRON-MARKER=fs")
    });

    // A snapshot without `memory` of the running guest: libvirt saves the
    // memory anyway, and the label says so.
    let (s, snap) =
        call(&c, Method::POST, &format!("/v1/vms/{id}/snapshots"), Some(json!({"name": "d1"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{snap}");
    let xml = virsh(&["snapshot-dumpxml", &name, "d1"]);
    let saved = xml.contains("<memory snapshot='internal'");
    assert!(saved, "{xml}");
    assert_eq!(
        (snap["memory"].as_bool(), snap["restores_memory"].as_bool()),
        (Some(saved), Some(false)),
        "{snap}"
    );
    let (_, list) = call(&c, Method::GET, &format!("/v1/vms/{id}/snapshots"), None).await;
    assert_eq!(list["snapshots"][0]["memory"], true, "{list}");
    assert_eq!(
        call(&c, Method::DELETE, &format!("/v1/vms/{id}/snapshots/d1"), None).await.0,
        StatusCode::NO_CONTENT
    );
    let seen = events(&d, 0).last().map_or(0, |e| e.0);

    let asked = Instant::now();
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/shutdown?timeout=25"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::ACCEPTED, Some("shutting_down")), "{v}");
    let config = d.config.display().to_string();
    let file = d.dir.join("node.tar").display().to_string();
    let r = common::cli(
        &d,
        &["backup", "create", &file, "--include-disks", "--pause-running", "--config", &config],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // Still shutting down after the backup resumed it, and after the
    // daemon's own follow-up limit.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(v["state"], "shutting_down", "{v}");
    let feed = events(&d, seen);
    assert_eq!(states_of(&feed, &id), ["shutting_down", "paused", "shutting_down"], "{feed:?}");
    // kill -9 of the daemon: the acknowledged deadline outlives it.
    d.restart();
    let c = d.local();
    let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(v["state"], "shutting_down", "after kill -9: {v}");
    assert!(d.log().contains("forced shutdown still due"), "{}", d.log());
    wait_for("the guest to be forced off", 60, || virsh(&["domstate", &name]).contains("shut off"));
    let took = asked.elapsed();
    assert!(took >= Duration::from_secs(25), "forced off after {took:?}, before its timeout");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(v["state"], "stopped", "{v}");
    // The restarted daemon's feed starts after a gap (events.lost), with
    // the guest shutting down again, then stopped.
    let feed = events(&d, seen);
    assert_eq!(states_of(&feed, &id), ["shutting_down", "stopped"], "{feed:?}");
}
