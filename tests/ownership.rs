//! A replica of the peer's VM on real libvirt (qemu:///system, the tiny TCG
//! guest): listed, never defined or started by reconciliation, autostart or
//! `vm start`. The replica is made the way replication will deliver it: a
//! VM record owned by another node, written into the stopped daemon's store.

mod common;

use common::{call, error_code, virsh, wait_for, Daemon, DomainGuard, Opts};
use hyper::{Method, StatusCode};
use novacron::store::{Change, Paths, Store, VmRecord};
use novacron::types::VmState;
use serde_json::{json, Value};
use std::time::Duration;

fn domain_exists(name: &str) -> bool {
    !virsh(&["domstate", name]).contains("failed to get domain")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn a_replica_is_listed_but_never_defined_or_started() {
    let mut d = Daemon::start("ownership", Opts::qemu(33));
    let (kernel, initrd) = common::install_guest(&d.data().join("boot"));
    let c = d.admin();
    let pid = std::process::id();
    let spec = |name: &str| {
        json!({
            "name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"size_gib": 1}], "autostart": true,
            "boot": {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 panic=-1 quiet"}
        })
    };
    let (own, rep) = (format!("own-{pid}"), format!("rep-{pid}"));
    let _cleanup = DomainGuard(vec![own.clone(), rep.clone()]);
    let mut ids = Vec::new();
    for name in [&own, &rep] {
        let (s, v) = call(&c, Method::POST, "/v1/vms", Some(spec(name))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (own_id, rep_id) = (ids[0].clone(), ids[1].clone());
    assert!(domain_exists(&rep));

    // Turn `rep` into the peer's VM: owned by another node at a later epoch,
    // reported running there, and never defined here.
    assert!(d.terminate(Duration::from_secs(15)).is_some_and(|s| s.success()), "{}", d.log());
    virsh(&["undefine", &rep]);
    assert!(!domain_exists(&rep));
    let peer = uuid::Uuid::new_v4();
    {
        let store = Store::open(&Paths::new(&d.data()).db).unwrap();
        let rec: VmRecord = store.vms().unwrap().into_iter().find(|v| v.name == rep).unwrap();
        let replica = VmRecord { owner_node: peer, epoch: 7, state: VmState::Running, ..rec };
        store.commit(&Change::VmPut(replica)).unwrap();
    }
    // Let autostart run again on this boot.
    std::fs::remove_file(d.data().join("autostart-boot-id")).unwrap();
    d.restart();
    let c = d.admin();

    // Autostart ran: our own VM is up...
    wait_for("our own VM to be autostarted", 60, || virsh(&["domstate", &own]).contains("running"));
    // ...and a periodic reconciliation pass (every 10 s) went by too.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(!domain_exists(&rep), "the replica was defined here; log:\n{}", d.log());
    let (_, list) = call(&c, Method::GET, "/v1/vms", None).await;
    let listed: Vec<&Value> =
        list["vms"].as_array().unwrap().iter().filter(|v| v["name"] == rep.as_str()).collect();
    assert_eq!(listed.len(), 1, "{list}");
    let peer_s = peer.to_string();
    assert_eq!(
        (listed[0]["owner_node"].as_str(), listed[0]["epoch"].as_u64(), listed[0]["managed"].as_bool()),
        (Some(peer_s.as_str()), Some(7), Some(true)),
        "{list}"
    );
    // Its state is the owner's report, not this node's `missing`.
    assert_eq!(listed[0]["state"], "running", "{list}");

    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{rep_id}/start"), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "not_owner"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&peer_s), "{v}");
    let (s, v) = call(&c, Method::DELETE, &format!("/v1/vms/{rep_id}?force=true"), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "not_owner"), "{v}");
    assert!(!domain_exists(&rep), "the replica was defined by start");

    let (s, v) = call(&c, Method::DELETE, &format!("/v1/vms/{own_id}?force=true"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
}
