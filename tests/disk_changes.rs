//! Disk changes of replicated VMs between two real daemons in network
//! namespaces (tests/common/pair.rs), each with its own data plane:
//! attach, resize, detach and deletion reach the peer's replica and leave
//! no file behind there; a clean unpair removes the replicas, a forced one
//! keeps them (they may be the only copy) until deleted with force; a real
//! TCG guest's writes to an attached disk reach the peer's copy.

mod common;

use common::pair::{Node, Pair};
use common::{call, error_code, Opts};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

async fn req(n: &Node, method: Method, path: &str, body: Option<Value>) -> Value {
    let (s, v) = call(&n.local(), method.clone(), path, body).await;
    assert!(s.is_success(), "{method} {path}: {s} {v}\n{}", n.daemon.log());
    v
}

async fn get(n: &Node, path: &str) -> Value {
    req(n, Method::GET, path, None).await
}

async fn post(n: &Node, path: &str, body: Value) -> Value {
    req(n, Method::POST, path, Some(body)).await
}

/// `POST /v1/vms/{id}/disks/{dev}/resize`: its status and answer.
async fn resize(n: &Node, id: &str, dev: &str, gib: u64) -> (StatusCode, Value) {
    let path = format!("/v1/vms/{id}/disks/{dev}/resize");
    call(&n.local(), Method::POST, &path, Some(json!({ "size_gib": gib }))).await
}

async fn pair_up(pair: &Pair) {
    let v = post(&pair.a, "/v1/peer/invite", json!({})).await;
    post(&pair.b, "/v1/peer/join", json!({ "code": v["code"] })).await;
    for n in [&pair.a, &pair.b] {
        let t0 = Instant::now();
        while get(n, "/v1/peer").await["link"]["state"] != "up" {
            assert!(t0.elapsed() < Duration::from_secs(20), "link not up\n{}", n.daemon.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `f` every 200 ms until it holds, for at most `secs`.
async fn until<F: std::future::Future<Output = bool>>(what: &str, secs: u64, mut f: impl FnMut() -> F) {
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each disk's (device, local state) on `n` for VM `id`, empty when the
/// VM is not listed there.
async fn replica_states(n: &Node, id: &str) -> Vec<(String, String)> {
    let (s, v) = call(&n.local(), Method::GET, &format!("/v1/vms/{id}"), None).await;
    if s != StatusCode::OK {
        return Vec::new();
    }
    v["replication"]["disks"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| {
                    (d["device"].as_str().unwrap().to_string(), d["local"].as_str().unwrap().to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every disk of `id` is up to date on both nodes (A's view of the peer,
/// B's own replica), and B lists exactly `devices`.
async fn until_in_sync(pair: &Pair, id: &str, devices: &[&str]) {
    let want: Vec<(String, String)> =
        devices.iter().map(|d| (d.to_string(), "up_to_date".to_string())).collect();
    until(&format!("B's replicas {devices:?} up to date"), 60, || async {
        let a = get(&pair.a, &format!("/v1/vms/{id}")).await;
        let peer_ok = a["replication"]["disks"]
            .as_array()
            .is_some_and(|d| d.len() == devices.len() && d.iter().all(|d| d["peer"] == "up_to_date"));
        peer_ok && replica_states(&pair.b, id).await == want
    })
    .await;
}

/// The names in B's folder of the VM's replicas (None: no folder).
fn files(dir: &Path) -> Option<Vec<String>> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).ok()?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    Some(names)
}

fn strings(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

async fn create(n: &Node, name: &str, disks: Value, extra: Value) -> String {
    let mut spec = json!({
        "name": name, "vcpus": 1, "memory_mib": 128, "disks": disks,
        "replication": {"mode": "sync"},
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    post(n, "/v1/vms", spec).await["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_changes_deletion_and_unpairing_reach_the_replica() {
    let pair = Pair::test_driver("dchg");
    pair_up(&pair).await;
    let id = create(&pair.a, "dchg-vm", json!([{"size_gib": 1}]), json!({})).await;
    let dir_b = pair.b.daemon.data().join("disks").join(&id);
    until_in_sync(&pair, &id, &["vda"]).await;
    assert_eq!(files(&dir_b), strings(&["vda.raw", "vda.raw.meta"]));

    // Snapshots and clones are refused, naming the reason.
    for (path, body) in [
        (format!("/v1/vms/{id}/snapshots"), json!({"name": "s1"})),
        (format!("/v1/vms/{id}/clone"), json!({"name": "dchg-clone", "copy": true})),
    ] {
        let (s, v) = call(&pair.a.local(), Method::POST, &path, Some(body)).await;
        assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "unsupported"), "{path}: {v}");
        assert!(v.to_string().contains("data plane"), "{v}");
    }

    // Attach: a raw file on A, a new replica on B, synced.
    let v = post(&pair.a, &format!("/v1/vms/{id}/disks"), json!({"size_gib": 1})).await;
    let vdb = v["disks"][1].clone();
    assert_eq!(vdb["device"], "vdb", "{v}");
    assert!(vdb["path"].as_str().unwrap().ends_with("/vdb.raw"), "{v}");
    until_in_sync(&pair, &id, &["vda", "vdb"]).await;
    assert_eq!(files(&dir_b), strings(&["vda.raw", "vda.raw.meta", "vdb.raw", "vdb.raw.meta"]));

    // Resize: shrinking is refused; growing grows both copies.
    let (s, v) = resize(&pair.a, &id, "vdb", 1).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    post(&pair.a, &format!("/v1/vms/{id}/disks/vdb/resize"), json!({"size_gib": 2})).await;
    let vdb_b = dir_b.join("vdb.raw");
    until("B's replica grown", 60, || async { std::fs::metadata(&vdb_b).is_ok_and(|m| m.len() == 2 * GIB) })
        .await;
    until_in_sync(&pair, &id, &["vda", "vdb"]).await;
    let a_vdb = PathBuf::from(vdb["path"].as_str().unwrap());
    assert_eq!(std::fs::metadata(&a_vdb).unwrap().len(), 2 * GIB);

    // Detach: gone on A, and its replica (file and metadata) gone on B.
    req(&pair.a, Method::DELETE, &format!("/v1/vms/{id}/disks/vdb"), None).await;
    assert!(!a_vdb.exists());
    until("B's vdb replica removed", 30, || async { files(&dir_b) == strings(&["vda.raw", "vda.raw.meta"]) })
        .await;
    until_in_sync(&pair, &id, &["vda"]).await;

    // Deletion: B's folder of the VM goes.
    req(&pair.a, Method::DELETE, &format!("/v1/vms/{id}"), None).await;
    until("B's replicas of the deleted VM removed", 30, || async { files(&dir_b).is_none() }).await;
    assert!(replica_states(&pair.b, &id).await.is_empty());

    // A clean unpair: B drops A's VM and its replica; A keeps its disk.
    let id = create(&pair.a, "dchg-clean", json!([{"size_gib": 1}]), json!({})).await;
    let dir_b = pair.b.daemon.data().join("disks").join(&id);
    until_in_sync(&pair, &id, &["vda"]).await;
    let v = req(&pair.a, Method::DELETE, "/v1/peer", None).await;
    assert_eq!(v["peer_notified"], true, "{v}");
    until("B's replica removed by the clean unpair", 30, || async { files(&dir_b).is_none() }).await;
    let (s, _) = call(&pair.b.local(), Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(pair.a.daemon.data().join("disks").join(&id).join("vda.raw").exists());
    req(&pair.a, Method::DELETE, &format!("/v1/vms/{id}"), None).await;

    // A forced unpair (the peer unreachable): B keeps the replica, says
    // so, and deletes it only with force.
    pair_up(&pair).await;
    let id = create(&pair.a, "dchg-forced", json!([{"size_gib": 1}]), json!({})).await;
    let dir_b = pair.b.daemon.data().join("disks").join(&id);
    until_in_sync(&pair, &id, &["vda"]).await;
    pair.cut(0);
    pair.cut(1);
    let (s, v) = call(&pair.b.local(), Method::DELETE, "/v1/peer?force=true", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["peer_notified"], false, "{v}");
    // Several data plane syncs later, it is still there.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(files(&dir_b), strings(&["vda.raw", "vda.raw.meta"]));
    let v = get(&pair.b, &format!("/v1/vms/{id}")).await;
    assert_eq!(v["replication"]["protection"], "kept_replica", "{v}");
    assert_eq!(v["replication"]["disks"][0]["local"], "up_to_date", "{v}");
    let (s, v) = call(&pair.b.local(), Method::DELETE, &format!("/v1/vms/{id}"), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "wrong_state"), "{v}");
    assert_eq!(files(&dir_b), strings(&["vda.raw", "vda.raw.meta"]));
    req(&pair.b, Method::DELETE, &format!("/v1/vms/{id}?force=true"), None).await;
    until("the kept replica deleted with force", 30, || async { files(&dir_b).is_none() }).await;
}

/// Record n: "NCREC <n>\n" padded to 4 KiB, at byte (256 + n) * 4096.
fn missing_records(disk: &Path, records: u64) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).unwrap();
    let mut block = vec![0u8; 4096];
    (0..records)
        .filter(|&n| {
            let mut want = format!("NCREC {n:08}\n").into_bytes();
            want.resize(4096, 0);
            f.read_exact_at(&mut block, (256 + n) * 4096).is_err() || block != want
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn a_guest_writes_to_an_attached_replicated_disk_and_the_peer_holds_the_data() {
    let pair = Pair::start("dchgq", |_| Opts::qemu(1));
    pair_up(&pair).await;
    let (kernel, initrd) = common::install_guest(&pair.a.daemon.data().join("boot"));
    let name = format!("dchgq-{}", std::process::id());
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    let records = 64u64;
    // No disk at creation: the guest's vda is the attached one.
    let boot = json!({"boot": {"kernel": kernel, "initrd": initrd,
        "cmdline": format!("console=ttyS0 panic=-1 quiet novacron.records={records}")}});
    let id = create(&pair.a, &name, json!([]), boot).await;
    let v = post(&pair.a, &format!("/v1/vms/{id}/disks"), json!({"size_gib": 1})).await;
    let disk_a = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    until_in_sync(&pair, &id, &["vda"]).await;

    post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
    let log = pair.a.daemon.data().join("logs").join(format!("{name}.{id}.console.log"));
    common::wait_for("the guest's records", 300, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("NOVACRON-RECORDS-DONE")
    });
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(!console.contains("NOVACRON-REC-FAILED") && !console.contains("I/O error"), "{console}");
    // The guest is up. Hot attach: the data plane serves the new disk
    // before libvirt plugs its socket into the running guest; B's replica
    // follows.
    let v = post(&pair.a, &format!("/v1/vms/{id}/disks"), json!({"size_gib": 1})).await;
    assert_eq!(v["disks"][1]["device"], "vdb", "{v}");
    let xml = common::virsh(&["dumpxml", &name]);
    assert!(xml.contains("<target dev='vdb'") && xml.contains(&format!("{id}-vdb.sock")), "{xml}");
    until_in_sync(&pair, &id, &["vda", "vdb"]).await;
    until("QEMU connected to the hot-plugged disk's socket", 30, || async {
        get(&pair.a, &format!("/v1/vms/{id}")).await["replication"]["disks"][1]["detail"]
            == "served, guest connected"
    })
    .await;
    // A live grow is refused; a hot detach waits until the guest let go.
    let (s, v) = resize(&pair.a, &id, "vdb", 2).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "wrong_state"), "{v}");
    assert!(v.to_string().contains("stop it first"), "{v}");
    req(&pair.a, Method::DELETE, &format!("/v1/vms/{id}/disks/vdb"), None).await;
    let xml = common::virsh(&["dumpxml", &name]);
    assert!(!xml.contains("<target dev='vdb'"), "{xml}");
    let dir_b = pair.b.daemon.data().join("disks").join(&id);
    until("B's vdb replica removed after the hot detach", 30, || async {
        files(&dir_b) == strings(&["vda.raw", "vda.raw.meta"])
    })
    .await;
    post(&pair.a, &format!("/v1/vms/{id}/stop"), json!(null)).await;
    until_in_sync(&pair, &id, &["vda"]).await;
    assert_eq!(missing_records(&disk_a, records), Vec::<u64>::new(), "records missing on A");
    let disk_b = pair.b.daemon.data().join("disks").join(&id).join("vda.raw");
    assert_eq!(missing_records(&disk_b, records), Vec::<u64>::new(), "records missing on B's replica");
    req(&pair.a, Method::DELETE, &format!("/v1/vms/{id}"), None).await;
    until("B's replicas of the deleted VM removed", 30, || async { files(&dir_b).is_none() }).await;
}
