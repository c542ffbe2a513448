//! Replicated VM disks between two real daemons in network namespaces
//! (tests/common/pair.rs), each with its own data plane, and a real TCG
//! guest on A writing numbered records (tests/guest/build-guest.sh,
//! `novacron.records=N`): every record the guest saw acknowledged is on
//! B's replica; a cut link degrades A (the peer's copy outdated, writes go
//! on) and its restoration resyncs only the blocks written meanwhile.

mod common;

use common::disk::{get, missing_records, pair_up, post, printed, sha256, until_repl};
use common::pair::{Node, Pair};
use common::{call, Opts};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `GET /metrics` on `n`, checked by `promtool check metrics`.
async fn scrape(n: &Node) -> String {
    let (s, body) = call(&n.local(), Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let text = body.as_str().expect("text exposition").to_string();
    assert!(common::which("promtool"), "promtool is missing: tests/setup-host.sh installs it");
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut p.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The value of the sample of `name` for VM `id` whose labels also hold `extra`.
fn sample(text: &str, name: &str, id: &str, extra: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(&format!("vm_id=\"{id}\"")) && l.contains(extra)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The state of a state-set family (`state="..."` at 1) for VM `id`.
fn state_of(text: &str, name: &str, id: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("vm_id=\"{id}\"")))
        .filter(|l| l.ends_with(" 1"))
        .filter_map(|l| Some(l.split("state=\"").nth(1)?.split('"').next()?.to_string()))
        .collect()
}

/// The `replica:<vm>/vda` check of `GET /v1/health/details`.
async fn replica_health(n: &Node, vm: &str) -> Value {
    let report = get(n, "/v1/health/details").await;
    let name = format!("replica:{vm}/vda");
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} check: {report}"))
}

/// States of `disk.replication` events for VM `id` in `n`'s event feed.
fn replication_events(n: &Node, id: &str) -> Vec<String> {
    common::read_events(&n.daemon, 0)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .filter(|e| e["kind"] == "disk.replication")
        .map(|e| e["data"].clone())
        .filter(|v| v["vm"]["id"] == id)
        .map(|v| {
            format!(
                "{}{}",
                v["state"].as_str().unwrap_or("?"),
                if v["connected"] == true { "" } else { "/down" }
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn sync_replication_keeps_every_acknowledged_write_and_resyncs_only_the_outage() {
    let pair = Pair::start("drepl", |_| Opts::qemu(1));
    pair_up(&pair).await;
    let (kernel, initrd) = common::install_guest(&pair.a.daemon.data().join("boot"));
    let name = format!("drepl-{}", std::process::id());
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    let records = 1500u64;
    let spec = json!({
        "name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"size_gib": 1}],
        "replication": {"mode": "sync"},
        "boot": {"kernel": kernel, "initrd": initrd,
                 "cmdline": format!("console=ttyS0 panic=-1 quiet novacron.records={records}")}
    });
    let vm = post(&pair.a, "/v1/vms", spec).await;
    let id = vm["id"].as_str().unwrap().to_string();
    let disk_a = PathBuf::from(vm["disks"][0]["path"].as_str().unwrap());
    let disk_b = pair.b.daemon.data().join("disks").join(&id).join("vda.raw");
    // The initial sync: the fresh disk is sparse, so it is over at once.
    until_repl(&pair.a, &id, "initial sync", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;
    let v = until_repl(&pair.b, &id, "B's replica", 30, |r| r["disks"][0]["local"] == "up_to_date").await;
    assert_eq!(v["owner_node"], vm["owner_node"], "{v}");

    post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
    let log = pair.a.daemon.data().join("logs").join(format!("{name}.{id}.console.log"));
    common::wait_for("the guest's first records", 180, || printed(&log).0.len() >= 100);
    let v = until_repl(&pair.a, &id, "protected", 10, |r| r["protection"] == "protected").await;
    eprintln!("protected while writing: {}", v["replication"]);
    // Observability while protected: both copies current in /metrics, the
    // write latency replication adds has counts, the health check is ok.
    // The data plane's status is polled every 2 s and the guest writes its
    // first 100 records in about a second: scrape until a poll saw them.
    let mut m = scrape(&pair.a).await;
    for _ in 0..50 {
        if sample(&m, "novacron_disk_replica_write_wait_seconds_count", &id, "").unwrap_or(0.0) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        m = scrape(&pair.a).await;
    }
    assert_eq!(state_of(&m, "novacron_disk_replica_state", &id), ["up_to_date"], "{m}");
    assert_eq!(state_of(&m, "novacron_disk_replica_peer_state", &id), ["up_to_date"], "{m}");
    assert_eq!(state_of(&m, "novacron_vm_replication_protection", &id), ["protected"], "{m}");
    assert_eq!(sample(&m, "novacron_disk_replica_connected", &id, "role=\"primary\""), Some(1.0), "{m}");
    let waits = sample(&m, "novacron_disk_replica_write_wait_seconds_count", &id, "").unwrap_or(0.0);
    assert!(waits >= 1.0, "no write waited for the peer in sync mode:\n{m}");
    let wait_sum = sample(&m, "novacron_disk_replica_write_wait_seconds_sum", &id, "").unwrap();
    eprintln!("{waits} guest writes waited for the peer, {:.3} ms each on average", wait_sum / waits * 1e3);
    assert_eq!(
        sample(&m, "novacron_disk_replica_write_wait_seconds_bucket", &id, "le=\"+Inf\""),
        Some(waits)
    );
    let h = replica_health(&pair.a, &name).await;
    assert_eq!(h["status"], "ok", "{h}");
    // Every replicated-disk metric the alert rules use has a sample here.
    let rules =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring/alerts.yml"))
            .unwrap();
    for used in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if used.starts_with("novacron_disk_replica_") {
            assert!(
                sample(&m, used, &id, "").is_some(),
                "alerts.yml uses {used}; A's scrape has no sample:\n{m}"
            );
        }
    }
    let mb = scrape(&pair.b).await;
    assert_eq!(state_of(&mb, "novacron_disk_replica_state", &id), ["up_to_date"], "B's replica:\n{mb}");
    assert_eq!(sample(&mb, "novacron_disk_replica_connected", &id, "role=\"secondary\""), Some(1.0), "{mb}");
    assert_eq!(replica_health(&pair.b, &name).await["status"], "ok");

    // Cut both links under writes: after the ack timeout A goes on
    // degraded, the guest sees no error, B's copy is outdated.
    let synced_before = get(&pair.a, &format!("/v1/vms/{id}")).await["replication"]["disks"][0]
        ["sync_bytes_total"]
        .as_u64()
        .unwrap();
    let at_cut = printed(&log).0.len() as u64;
    pair.cut(0);
    pair.cut(1);
    let cut = Instant::now();
    until_repl(&pair.a, &id, "peer outdated", 30, |r| {
        r["disks"][0]["peer"] == "outdated" && r["protection"] == "degraded"
    })
    .await;
    // The same in /metrics and the health check (a warning within the
    // grace period: the outage is younger than 5 minutes).
    let m = scrape(&pair.a).await;
    assert_eq!(state_of(&m, "novacron_disk_replica_peer_state", &id), ["outdated"], "{m}");
    assert_eq!(state_of(&m, "novacron_vm_replication_protection", &id), ["degraded"], "{m}");
    assert_eq!(sample(&m, "novacron_disk_replica_connected", &id, ""), Some(0.0), "{m}");
    let h = replica_health(&pair.a, &name).await;
    assert_eq!(h["status"], "warning", "{h}");
    assert!(h["message"].as_str().unwrap().contains("the peer's copy has been outdated"), "{h}");
    common::wait_for("writes going on while the link is cut", 60, || {
        printed(&log).0.len() as u64 >= at_cut + 150
    });
    let at_restore = printed(&log).0.len() as u64;
    eprintln!("{} records written degraded in {:?}", at_restore - at_cut, cut.elapsed());
    pair.restore(0);
    pair.restore(1);
    let resynced =
        until_repl(&pair.a, &id, "delta resync", 90, |r| r["disks"][0]["peer"] == "up_to_date").await;
    let m = scrape(&pair.a).await;
    assert_eq!(state_of(&m, "novacron_disk_replica_peer_state", &id), ["up_to_date"], "{m}");
    assert_eq!(sample(&m, "novacron_disk_replica_connected", &id, ""), Some(1.0), "{m}");
    assert!(sample(&m, "novacron_disk_replica_synced_bytes_total", &id, "").unwrap() > 0.0, "{m}");
    let h = replica_health(&pair.a, &name).await;
    assert_eq!(h["status"], "ok", "{h}");
    // The core's events: up to date, the link lost, outdated, then (a
    // resync may be too short for the 2 s status poll to see) up to date.
    let evs = replication_events(&pair.a, &id);
    eprintln!("disk.replication events on A: {evs:?}");
    let at = |s: &str| evs.iter().position(|e| e == s);
    let (outdated, back) = (at("outdated/down"), evs.iter().rposition(|e| e == "up_to_date"));
    assert!(outdated.is_some() && back.is_some() && outdated < back, "disk.replication events: {evs:?}");
    // The data plane's log (the journal under systemd): the outdate mark
    // and the resync, with the VM, the peer and the device.
    let dp_log = std::fs::read_to_string(pair.a.daemon.data().join("logs").join("dataplane.log")).unwrap();
    for what in [
        "the disk's link to the peer is lost",
        "the peer's copy is marked outdated",
        "resync (delta) to the peer begins",
        "sync to the peer done",
    ] {
        assert!(
            dp_log.lines().any(|l| l.contains(what)
                && l.contains(&format!("VM_ID={id}"))
                && l.contains("PEER_ID=")
                && l.contains("DEVICE=vda")),
            "A's data plane log has no {what:?} with VM_ID={id}:\n{dp_log}"
        );
    }
    let dp_log_b = std::fs::read_to_string(pair.b.daemon.data().join("logs").join("dataplane.log")).unwrap();
    assert!(
        dp_log_b
            .lines()
            .any(|l| l.contains("resync (delta) from the primary begins")
                && l.contains(&format!("VM_ID={id}"))),
        "B's data plane log has no resync of {id}:\n{dp_log_b}"
    );
    let sent = resynced["replication"]["disks"][0]["sync_bytes_total"].as_u64().unwrap() - synced_before;
    // The outage's records (and those in flight at the cut and while
    // reconnecting), not the 1 GiB disk.
    let written = (printed(&log).0.len() as u64 - at_cut + 16) * 4096;
    eprintln!(
        "delta resync sent {sent} bytes for about {} bytes written during the outage",
        (at_restore - at_cut) * 4096
    );
    assert!(sent > 0 && sent <= written, "resync sent {sent} bytes; at most {written} were written");

    common::wait_for("all records", 600, || printed(&log).2);
    let (recs, failed, _) = printed(&log);
    assert!(!failed, "the guest saw an I/O error:\n{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(recs, (0..records).collect::<Vec<_>>());
    // Every acknowledged record is on both copies, and the copies match.
    assert_eq!(missing_records(&disk_a, &recs), Vec::<u64>::new(), "records missing on A");
    let on_b = missing_records(&disk_b, &recs);
    assert_eq!(on_b, Vec::<u64>::new(), "acknowledged records missing on B's replica");
    let (s, v) = call(&pair.a.local(), Method::POST, &format!("/v1/vms/{id}/stop"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    until_repl(&pair.a, &id, "up to date after stop", 30, |r| r["disks"][0]["peer"] == "up_to_date").await;
    assert_eq!(sha256(&disk_a), sha256(&disk_b), "A's disk and B's replica differ");
}
