//! Moving a replicated VM between two real daemons in network namespaces,
//! with a real TCG guest writing numbered records (tests/guest/build-guest.sh,
//! `novacron.records=N`): a planned move loses no record and turns the
//! replication around; the death of the owner's host, an operator's
//! takeover on the survivor (every acknowledged record is there, and the
//! replica boots), and the return of the old owner (it learns the new
//! epoch, starts nothing, and its copy is resynced from the new owner).
//!
//! Both daemons share this machine's one libvirtd, so "running on both
//! nodes" cannot happen here by construction; what is checked is that the
//! old owner gives the VM up (record, data plane) before the new one starts it.

mod common;

use common::disk::{get, missing_records, pair_up, post, records_in, sha256, until_repl};
use common::pair::{Node, Pair};
use common::{call, error_code, Opts};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn console(n: &Node, name: &str, id: &str) -> PathBuf {
    n.daemon.data().join("logs").join(format!("{name}.{id}.console.log"))
}

/// kill -9 of the QEMU running guest `name` (a host's sudden death).
fn kill_qemu(name: &str) {
    let pattern = format!("guest={name},");
    let ok = std::process::Command::new("pkill").args(["-9", "-f", "--", &pattern]).status().unwrap();
    assert!(ok.success(), "no QEMU of {name} to kill");
    common::wait_domain_gone(name);
}

async fn vm(n: &Node, id: &str) -> Value {
    get(n, &format!("/v1/vms/{id}")).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn move_takeover_and_return_keep_every_acknowledged_write() {
    let mut pair = Pair::start("failover", |_| Opts::qemu(1));
    pair_up(&pair).await;
    for n in [&pair.a, &pair.b] {
        let v = get(n, "/v1/peer").await;
        assert!(v["failover"].as_str().unwrap().contains("automatic failover is not configured"), "{v}");
    }
    let (kernel, initrd) = common::install_guest(&pair.a.daemon.data().join("boot"));
    // The record names A's kernel path; B boots the same file (one machine).
    let name = format!("failover-{}", std::process::id());
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    // Far more records than the test waits for: the guest writes until stopped.
    let spec = json!({
        "name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"size_gib": 1}],
        "replication": {"mode": "sync"}, "shutdown_timeout_secs": 3,
        "boot": {"kernel": kernel, "initrd": initrd,
                 "cmdline": "console=ttyS0 panic=-1 quiet novacron.records=200000"}
    });
    let created = post(&pair.a, "/v1/vms", spec).await;
    let id = created["id"].as_str().unwrap().to_string();
    let (node_a, node_b) = (created["owner_node"].clone(), get(&pair.b, "/v1/host").await["node_id"].clone());
    let disk_a = PathBuf::from(created["disks"][0]["path"].as_str().unwrap());
    let disk_b = pair.b.daemon.data().join("disks").join(&id).join("vda.raw");
    until_repl(&pair.a, &id, "initial sync", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;

    // Refused while not replicated enough or without force, changing nothing.
    let (s, v) =
        call(&pair.b.local(), Method::POST, "/v1/peer/takeover", Some(json!({"force": false}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{v}");
    let (s, v) = call(&pair.b.local(), Method::POST, &format!("/v1/vms/{id}/move"), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "not_owner"), "only the owner moves: {v}");

    // -- planned move A -> B with the guest writing, then back B -> A --
    // (the second move found a bug: the old primary's metadata, still open
    // after the first move, clobbered its replica's `up_to_date`).
    post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
    let (log_a, log_b) = (console(&pair.a, &name, &id), console(&pair.b, &name, &id));
    let stint_a = Stint { node: &pair.a, log: &log_a, from: 0, disk: &disk_a };
    let stint_b = Stint { node: &pair.b, log: &log_b, from: 0, disk: &disk_b };
    let on_a = planned_move(&stint_a, &stint_b, &id, 60, 2, &node_b).await;
    let a_view =
        until_repl(&pair.a, &id, "A holds the replica", 30, |r| r["disks"][0]["local"] == "up_to_date").await;
    assert_eq!(a_view["owner_node"], node_b, "{a_view}");
    // Records above A's last one are new bytes on the replica: the check
    // of the move back cannot pass on what A's first stint left there.
    let stint_a = Stint { from: log_len(&log_a), ..stint_a };
    let on_b = planned_move(&stint_b, &stint_a, &id, on_a.len() + 30, 3, &node_a).await;
    let b_view =
        until_repl(&pair.b, &id, "B holds the replica", 30, |r| r["disks"][0]["local"] == "up_to_date").await;
    assert_eq!(b_view["owner_node"], node_a, "{b_view}");
    common::wait_for("records written on A again", 180, || {
        printed_after(&log_a, stint_a.from).len() > on_b.len() + 30
    });

    // -- A's host dies under writes; the operator takes over on B --
    kill_qemu(&name);
    let written_on_a = printed_after(&log_a, stint_a.from);
    pair.a.daemon.kill9();
    common::kill_dataplane(&pair.a.daemon.data());
    pair.cut(0);
    pair.cut(1);
    assert_eq!(
        missing_records(&disk_b, &written_on_a),
        Vec::<u64>::new(),
        "records acknowledged on A missing on B's replica"
    );
    eprintln!("A died after {} records; all on B", written_on_a.len());
    let (s, report) =
        call(&pair.b.local(), Method::POST, "/v1/peer/takeover", Some(json!({"force": true}))).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    let mine = report["vms"].as_array().unwrap().iter().find(|v| v["id"] == json!(id)).cloned().unwrap();
    assert_eq!(
        (mine["result"].as_str(), mine["replica"].as_str()),
        (Some("taken_over"), Some("up_to_date")),
        "{report}"
    );
    assert_eq!(mine["epoch"], 4, "{report}");
    let taken = vm(&pair.b, &id).await;
    assert_eq!((taken["owner_node"].clone(), taken["epoch"].as_u64()), (node_b.clone(), Some(4)), "{taken}");
    // The replica boots and writes (degraded: the peer is gone).
    let takeover_from = log_len(&log_b);
    post(&pair.b, &format!("/v1/vms/{id}/start"), json!(null)).await;
    common::wait_for("the replica boots and writes on B", 180, || {
        printed_after(&log_b, takeover_from).len() >= 60
    });
    until_repl(&pair.b, &id, "B degraded", 30, |r| r["protection"] == "degraded").await;

    // -- A comes back: it learns epoch 4, starts nothing, becomes the standby --
    pair.restore(0);
    pair.restore(1);
    pair.a.daemon.restart();
    let mut back = until_repl(&pair.a, &id, "A learns the takeover", 60, |_| true).await;
    let t0 = Instant::now();
    while back["epoch"] != 4 {
        assert!(t0.elapsed() < Duration::from_secs(60), "A never learned epoch 4: {back}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        back = vm(&pair.a, &id).await;
    }
    assert_eq!(back["owner_node"], node_b, "{back}");
    let (s, v) = call(&pair.a.local(), Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "not_owner"), "{v}");
    until_repl(&pair.b, &id, "A's copy resynced from B", 120, |r| {
        r["disks"][0]["peer"] == "up_to_date" && r["protection"] == "protected"
    })
    .await;
    let dp_log =
        std::fs::read_to_string(pair.a.daemon.data().join("logs").join("dataplane.log")).unwrap_or_default();
    assert!(dp_log.contains("discarded"), "A's data plane did not say what it discards:\n{dp_log}");
    // Stopped: both copies are the same bytes.
    // By ACPI, so that the console shows the guest's own power-off.
    let (s, v) = call(&pair.b.local(), Method::POST, &format!("/v1/vms/{id}/shutdown?wait=60"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("stopped")), "{v}");
    until_repl(&pair.b, &id, "up to date after stop", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;
    // The takeover boot, from its start to its ACPI power-off: after that
    // the guest kernel's `poweroff -f` may fail the write in flight (as
    // before a move; never printed, never acknowledged).
    let since_takeover = log_since(&log_b, takeover_from);
    let Some((until_off, _)) = since_takeover.split_once("NOVACRON-POWEROFF") else {
        panic!("the stop did not power the guest off by ACPI:\n{since_takeover}")
    };
    assert!(
        !until_off.contains("I/O error") && !until_off.contains("NOVACRON-REC-FAILED"),
        "the replica's guest saw an I/O error:\n{until_off}\nB's data plane log:\n{}",
        std::fs::read_to_string(pair.b.daemon.data().join("logs").join("dataplane.log")).unwrap_or_default()
    );
    assert_eq!(sha256(&disk_a), sha256(&disk_b), "B's disk and A's replica differ after the failback resync");
}

/// One node's run of the guest: its console log (appended to at each
/// boot) from byte `from` on, and its copy of the disk.
#[derive(Clone, Copy)]
struct Stint<'a> {
    node: &'a Node,
    log: &'a Path,
    from: usize,
    disk: &'a Path,
}

fn log_len(log: &Path) -> usize {
    std::fs::metadata(log).map_or(0, |m| m.len() as usize)
}

/// Records in `log` from byte `from` on.
fn printed_after(log: &Path, from: usize) -> Vec<u64> {
    records_in(&log_since(log, from))
}

fn log_since(log: &Path, from: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned()
}

/// A planned move of the running VM from `from` to `to` once `from`'s
/// guest printed `records` records: every record printed before the move
/// is on `to`'s copy, the VM runs on `to` at `epoch` (and no longer may on
/// `from`), and the replication turns around. Returns the records `from`
/// printed.
async fn planned_move(
    from: &Stint<'_>,
    to: &Stint<'_>,
    id: &str,
    records: usize,
    epoch: u64,
    to_node: &Value,
) -> Vec<u64> {
    common::wait_for("the guest's records before the move", 180, || {
        printed_after(from.log, from.from).len() >= records
    });
    until_repl(from.node, id, "protected before the move", 60, |r| {
        r["protection"] == "protected" && r["disks"][0]["peer"] == "up_to_date"
    })
    .await;
    let to_from = log_len(to.log);
    let t = Instant::now();
    let moved = post(from.node, &format!("/v1/vms/{id}/move"), json!(null)).await;
    let took = t.elapsed();
    // Read at once: the guest on `to` is still booting (TCG), it has
    // written nothing.
    let done = printed_after(from.log, from.from);
    // Until its ACPI power-off: the guest kernel's own shutdown may fail
    // the write in flight (never printed, so never acknowledged).
    let text = log_since(from.log, from.from);
    let before_off = text.split("NOVACRON-POWEROFF").next().unwrap();
    assert!(
        !before_off.contains("I/O error") && !before_off.contains("NOVACRON-REC-FAILED"),
        "the guest saw an I/O error before its shutdown:\n{text}"
    );
    assert_eq!(
        missing_records(to.disk, &done),
        Vec::<u64>::new(),
        "records acknowledged before the move missing after it"
    );
    eprintln!(
        "moved (epoch {epoch}) after {} records in {took:?}: shutdown {} ms, downtime {} ms ({})",
        done.len(),
        moved["shutdown_ms"],
        moved["downtime_ms"],
        moved["message"]
    );
    assert_eq!((moved["started"].as_bool(), moved["epoch"].as_u64()), (Some(true), Some(epoch)), "{moved}");
    assert_eq!(moved["to"], *to_node, "{moved}");
    let there = vm(to.node, id).await;
    assert_eq!(
        (there["owner_node"].clone(), there["epoch"].as_u64()),
        (to_node.clone(), Some(epoch)),
        "{there}"
    );
    assert_eq!(there["state"], "running", "{there}");
    let (s, v) = call(&from.node.local(), Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "not_owner"), "the old owner gave it up: {v}");
    // The replication turned around: the old copy is the new owner's replica.
    common::wait_for("records written after the move", 180, || printed_after(to.log, to_from).len() >= 30);
    until_repl(to.node, id, "protected by the old owner", 60, |r| {
        r["protection"] == "protected" && r["disks"][0]["peer"] == "up_to_date"
    })
    .await;
    done
}

/// The initial sync sends only the allocated extents of a disk made from a
/// sparse image, at no more than `dataplane.sync_rate_mib` (the bound is
/// one-sided: a slow machine only makes the sync take longer).
#[tokio::test(flavor = "multi_thread")]
async fn the_initial_sync_sends_only_allocated_extents_within_the_throttle() {
    let pair = Pair::start("syncrate", |_| Opts {
        extra: "[dataplane]\nsync_rate_mib = 8\n".into(),
        ..Opts::test_driver(1)
    });
    pair_up(&pair).await;
    // 64 MiB, of which 16 MiB at 0 and 8 MiB at 40 MiB hold data.
    let scratch = common::scratch_dir("syncrate");
    let image = scratch.join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(64 << 20).unwrap();
        for (off, mib) in [(0u64, 16usize), (40 << 20, 8)] {
            let mut data = vec![0u8; mib << 20];
            getrandom::getrandom(&mut data).unwrap();
            f.write_all_at(&data, off).unwrap();
        }
    }
    let r = common::cli(&pair.a.daemon, &["image", "upload", "sparse", image.to_str().unwrap()]);
    assert_eq!(r.code, 0, "upload: {} {}", r.stdout, r.stderr);
    let t = Instant::now();
    let vm = post(
        &pair.a,
        "/v1/vms",
        json!({"name": "synced", "vcpus": 1, "memory_mib": 64, "disks": [{"image": "sparse"}],
               "replication": {"mode": "sync"}}),
    )
    .await;
    let id = vm["id"].as_str().unwrap().to_string();
    // The CLI follows the sync to its end (no terminal: a line per 5 s).
    let cmd = common::cli_command(&pair.a.daemon, &["vm", "show", "synced", "--wait-sync"]);
    let watcher = std::thread::spawn(move || {
        let mut cmd = cmd;
        cmd.output().unwrap()
    });
    let rates = std::sync::Mutex::new(Vec::new());
    let done = until_repl(&pair.a, &id, "initial sync", 120, |r| {
        if let Some(rate) = r["disks"][0]["sync"]["rate_bytes_per_sec"].as_f64() {
            if r["disks"][0]["sync"]["bytes_done"].as_u64().unwrap_or(0) > 4 << 20 {
                rates.lock().unwrap().push(rate);
            }
        }
        r["disks"][0]["peer"] == "up_to_date"
    })
    .await;
    let took = t.elapsed();
    let rates = rates.into_inner().unwrap();
    let sent = done["replication"]["disks"][0]["sync_bytes_total"].as_u64().unwrap();
    let a = PathBuf::from(vm["disks"][0]["path"].as_str().unwrap());
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&a).unwrap().blocks() * 512
    };
    eprintln!("initial sync: {sent} bytes in {took:?} ({allocated} bytes allocated of 64 MiB); rates seen {rates:?}");
    // What the disk file holds (the image's data, and whatever zeros the
    // copy kept allocated), not its 64 MiB.
    assert!(sent >= 24 << 20 && sent <= allocated && sent < 64 << 20, "sent {sent}, allocated {allocated}");
    // At 8 MiB/s, less the 100 ms the pacer lets through at once.
    let least = Duration::from_secs_f64(sent as f64 / (8 << 20) as f64 - 0.2);
    assert!(took >= least, "{sent} bytes synced in {took:?}: faster than 8 MiB/s");
    assert!(rates.iter().all(|r| *r <= 10.0 * (1 << 20) as f64), "rate above the limit: {rates:?}");
    let out = watcher.join().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("vda: full sync [") && stderr.contains("MiB/s  ETA"),
        "no progress shown: {stderr}"
    );
    assert!(stdout.starts_with("synced: protected (vda: here up_to_date, peer up_to_date"), "{stdout}");
    let b = pair.b.daemon.data().join("disks").join(&id).join("vda.raw");
    assert_eq!(sha256(&a), sha256(&b), "the replica differs from the disk");
}

/// The takeover starts the peer's autostart VMs by `autostart_priority`
/// (higher first, ties by name), each after the previous start returned,
/// and its report lists every VM in that order (libvirt's test driver: no
/// guest runs, the order is what is checked). The priority reaches the
/// peer with the VM's record, a PATCH of it too.
#[tokio::test(flavor = "multi_thread")]
async fn takeover_starts_the_autostart_vms_by_priority() {
    let mut pair = Pair::test_driver("tkprio");
    pair_up(&pair).await;
    // (name, priority, autostart, replication mode)
    let vms = [
        ("web", 0, true, "sync"),
        ("app", 0, true, "async"),
        ("db", 50, true, "sync"),
        ("dns", 100, true, "sync"),
        ("idle", 500, false, "sync"),
        ("plain", -1, true, "off"),
    ];
    let mut ids = Vec::new();
    for (name, prio, autostart, mode) in vms {
        let spec = json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}],
            "autostart": autostart, "autostart_priority": prio, "replication": {"mode": mode},
        });
        ids.push(post(&pair.a, "/v1/vms", spec).await["id"].as_str().unwrap().to_string());
    }
    let (s, v) =
        call(&pair.a.local(), Method::PATCH, "/v1/vms/web", Some(json!({"autostart_priority": 20}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for (id, (name, ..)) in ids.iter().zip(vms) {
        if name != "plain" {
            until_repl(&pair.a, id, "initial sync", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;
        }
    }
    // B holds every record with its priority (web's as patched).
    let t0 = Instant::now();
    loop {
        let on_b = get(&pair.b, "/v1/vms/web").await;
        if on_b["autostart_priority"] == 20 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "web's priority never reached B: {on_b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&pair.b, "/v1/vms/dns").await["autostart_priority"], 100);

    // A dies; the operator takes over on B.
    pair.a.daemon.kill9();
    common::kill_dataplane(&pair.a.daemon.data());
    pair.cut(0);
    pair.cut(1);
    let before = pair.b.daemon.log().len();
    let (s, report) =
        call(&pair.b.local(), Method::POST, "/v1/peer/takeover", Some(json!({"force": true}))).await;
    assert_eq!(s, StatusCode::OK, "{report}");
    let got: Vec<(String, i64, String)> = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap().to_string();
            (name, v["autostart_priority"].as_i64().unwrap(), v["result"].as_str().unwrap().to_string())
        })
        .collect();
    let want = [
        ("idle", 500, "taken_over"),
        ("dns", 100, "started"),
        ("db", 50, "started"),
        ("web", 20, "started"),
        ("app", 0, "started"),
        ("plain", -1, "left"),
    ]
    .map(|(n, p, r)| (n.to_string(), p, r.to_string()));
    assert_eq!(got, want, "{report}");
    // The starts happened in that order, each logged after it returned.
    let log = pair.b.daemon.log();
    let started: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains("started after the takeover"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("VM_NAME=")))
        .collect();
    assert_eq!(started, ["dns", "db", "web", "app"], "{log}");
    for name in ["dns", "db", "web", "app"] {
        assert_eq!(get(&pair.b, &format!("/v1/vms/{name}")).await["state"], "running", "{name}");
    }
}
