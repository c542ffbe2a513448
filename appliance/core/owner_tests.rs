//! Ownership on libvirt's test driver: a replica of the peer's VM (a record
//! owned by another node, written straight into the store as replication
//! would) is listed, never defined, started, changed or deleted here.

use super::*;
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::DomainState;
use crate::store::{now_ms, Change};
use crate::types::VmState;

const URI: &str = "test:///default";

pub(super) fn test_config(tag: &str) -> Config {
    let mut cfg = Config {
        data_dir: std::env::temp_dir().join(format!("novacron-core-{tag}-{}", Uuid::new_v4())),
        ..Config::default()
    };
    cfg.hypervisor.uri = URI.into();
    cfg.hypervisor.domain_type = "test".into();
    cfg.hypervisor.memory_reserve_mib = 0;
    cfg
}

pub(super) fn open(cfg: &Config) -> Arc<Core> {
    Core::open(cfg.clone(), Arc::new(Libvirt::new(URI)), Arc::new(Metrics::default())).unwrap()
}

/// A VM record as the peer's stream delivers it: owned by `owner`.
pub(super) fn replica(name: &str, owner: Uuid, state: VmState) -> VmRecord {
    let now = now_ms();
    VmRecord {
        id: Uuid::new_v4(),
        name: format!("{name}-{}", Uuid::new_v4().simple()),
        vcpus: 1,
        memory_mib: 64,
        disks: Vec::new(),
        boot: None,
        nics: Vec::new(),
        cloud_init: None,
        shutdown_timeout_secs: None,
        autostart: true,
        owner_node: owner,
        epoch: 3,
        state,
        created_at: now,
        updated_at: now,
        replication: None,
        autostart_priority: 0,
    }
}

/// Opens a core whose store already holds `records` (as after replication
/// and a restart).
fn core_with(tag: &str, records: &[VmRecord]) -> Arc<Core> {
    let cfg = test_config(tag);
    let paths = Paths::new(&cfg.data_dir);
    paths.create().unwrap();
    {
        let store = Store::open(&paths.db).unwrap();
        store.node_identity("node-a").unwrap();
        for r in records {
            store.commit(&Change::VmPut(r.clone())).unwrap();
        }
    }
    open(&cfg)
}

async fn domain_state(core: &Core, id: Uuid) -> Option<DomainState> {
    core.hv_call(move |hv| hv.state(id)).await.unwrap()
}

async fn create(core: &Arc<Core>, name: &str, autostart: bool) -> Uuid {
    let spec: crate::types::VmCreate = serde_json::from_value(serde_json::json!({
        "name": format!("{name}-{}", Uuid::new_v4().simple()),
        "vcpus": 1, "memory_mib": 64, "autostart": autostart,
    }))
    .unwrap();
    match core.execute(&Core::local_admin(0), Command::CreateVm(spec)).await {
        Ok(Reply::Created(vm)) => vm.id,
        Ok(_) => panic!("create answered something else"),
        Err(e) => panic!("create: {e}"),
    }
}

pub(super) async fn cleanup(core: &Core, ids: &[Uuid]) {
    for &id in ids {
        let _ = core.hv_call(move |hv| hv.destroy(id)).await;
        let _ = core.hv_call(move |hv| hv.undefine(id)).await;
    }
    let _ = std::fs::remove_dir_all(&core.paths.data_dir);
}

#[tokio::test]
async fn every_vm_operation_refuses_a_replica() {
    let peer = Uuid::new_v4();
    let rec = replica("rep", peer, VmState::Stopped);
    let core = core_with("ops", std::slice::from_ref(&rec));
    let id = rec.id.to_string();
    let j = |v: serde_json::Value| v;
    let cmds = vec![
        Command::VmAction { vm: id.clone(), action: VmAction::Start },
        Command::VmAction { vm: rec.name.clone(), action: VmAction::Start },
        Command::VmAction { vm: id.clone(), action: VmAction::Stop },
        Command::VmAction { vm: id.clone(), action: VmAction::Reboot },
        Command::VmAction { vm: id.clone(), action: VmAction::Pause },
        Command::VmAction { vm: id.clone(), action: VmAction::Resume },
        Command::VmAction { vm: id.clone(), action: VmAction::Shutdown { wait: None, timeout: None } },
        Command::UpdateVm(id.clone(), serde_json::from_value(j(serde_json::json!({"vcpus": 2}))).unwrap()),
        Command::DeleteVm { vm: id.clone(), force: true },
        Command::CloneVm(id.clone(), serde_json::from_value(j(serde_json::json!({"name": "c1"}))).unwrap()),
        Command::AttachDisk(
            id.clone(),
            serde_json::from_value(j(serde_json::json!({"size_gib": 1}))).unwrap(),
        ),
        Command::DetachDisk { vm: id.clone(), device: "vda".into() },
        Command::ResizeDisk {
            vm: id.clone(),
            device: "vda".into(),
            req: crate::types::DiskResize { size_gib: 2 },
        },
        Command::CreateSnapshot(
            id.clone(),
            serde_json::from_value(j(serde_json::json!({"name": "s"}))).unwrap(),
        ),
        Command::RevertSnapshot { vm: id.clone(), name: "s".into() },
        Command::DeleteSnapshot { vm: id.clone(), name: "s".into() },
        Command::Console(id.clone()),
    ];
    for cmd in cmds {
        let name = cmd.name();
        match core.execute(&Core::local_admin(0), cmd).await {
            Ok(_) => panic!("{name} on a replica succeeded"),
            Err(e) => {
                assert_eq!(e.code(), "not_owner", "{name}: {e}");
                assert!(e.to_string().contains(&peer.to_string()), "{name}: the owner is not named: {e}");
            }
        }
    }
    // Nothing changed: still listed with its owner, no domain here.
    assert_eq!(core.find_record(&id).unwrap(), rec);
    assert_eq!(domain_state(&core, rec.id).await, None);
    let vm = core.find_vm(&rec.name).unwrap();
    assert_eq!((vm.owner_node, vm.epoch, vm.managed), (Some(peer), 3, true));
    assert!(core.vm_list().1.iter().any(|v| v.id == rec.id), "the replica is listed");
    // Its name is taken across the pair.
    let spec: crate::types::VmCreate =
        serde_json::from_value(serde_json::json!({"name": rec.name, "vcpus": 1, "memory_mib": 64})).unwrap();
    let e = core.execute(&Core::local_admin(0), Command::CreateVm(spec)).await.err().unwrap();
    assert_eq!(e.code(), "name_taken");
    cleanup(&core, &[]).await;
}

#[tokio::test]
async fn reconcile_never_defines_a_replica_nor_rewrites_its_state() {
    let peer = Uuid::new_v4();
    // The peer reports it running; it has no domain here.
    let rec = replica("rec", peer, VmState::Running);
    let core = core_with("reconcile", std::slice::from_ref(&rec));
    // A VM of ours that lost its domain is redefined: the same pass would
    // have redefined the replica too.
    let mine = create(&core, "mine", false).await;
    core.hv_call(move |hv| hv.undefine(mine)).await.unwrap();
    core.reconcile_all().await.unwrap();
    assert_eq!(domain_state(&core, mine).await, Some(DomainState::Stopped), "own VM not redefined");
    assert_eq!(domain_state(&core, rec.id).await, None, "the replica was defined");
    assert_eq!(core.find_record(&rec.id.to_string()).unwrap().state, VmState::Running);
    assert!(!core.vm_list().1.iter().any(|v| v.id == rec.id && !v.managed));
    cleanup(&core, &[mine, rec.id]).await;
}

#[tokio::test]
async fn autostart_skips_replicas_even_with_a_domain_here() {
    let peer = Uuid::new_v4();
    let rec = replica("auto", peer, VmState::Stopped);
    let core = core_with("autostart", std::slice::from_ref(&rec));
    // A stale domain of the replica (left by a move): startable by libvirt.
    let xml = crate::hypervisor::xml::domain_xml(&core.domain_spec(&rec));
    core.hv_call(move |hv| hv.define(&xml)).await.unwrap();
    let mine = create(&core, "mine", true).await;
    core.autostart_after_boot().await;
    assert_eq!(domain_state(&core, mine).await, Some(DomainState::Running), "own VM not autostarted");
    assert_eq!(domain_state(&core, rec.id).await, Some(DomainState::Stopped), "the replica was started");
    assert_eq!(core.find_record(&rec.id.to_string()).unwrap().state, VmState::Stopped);
    // Reconcile leaves the stale domain alone too (neither adopted nor shown
    // as unmanaged).
    core.reconcile_all().await.unwrap();
    assert_eq!(domain_state(&core, rec.id).await, Some(DomainState::Stopped));
    assert!(core.vm_list().1.iter().filter(|v| v.id == rec.id).all(|v| v.managed));
    cleanup(&core, &[mine, rec.id]).await;
}

#[tokio::test]
async fn ownership_moving_during_an_operation_stops_it() {
    let core = core_with("epoch", &[]);
    let id = create(&core, "moving", false).await;
    let (guard, vm) = core.owned_vm(&id.to_string()).await.unwrap();
    assert!(core.still_owned(&vm).is_ok());
    // A newer epoch for this node (ownership went away and came back).
    core.commit(Change::VmPut(VmRecord { epoch: vm.epoch + 1, ..vm.clone() })).await.unwrap();
    let e = core.still_owned(&vm).unwrap_err();
    assert_eq!(e.code(), "stale_epoch", "{e}");
    // A takeover by the peer while the operation waited.
    let peer = Uuid::new_v4();
    core.commit(Change::VmPut(VmRecord { owner_node: peer, epoch: vm.epoch + 2, ..vm.clone() }))
        .await
        .unwrap();
    assert_eq!(core.still_owned(&vm).unwrap_err().code(), "not_owner");
    drop(guard);
    let e = core
        .execute(&Core::local_admin(0), Command::VmAction { vm: id.to_string(), action: VmAction::Start })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), "not_owner");
    assert_eq!(domain_state(&core, id).await, Some(DomainState::Stopped), "a fenced VM was started");
    cleanup(&core, &[id]).await;
}

/// The last step of a shutdown (daemon.rs `stop_in_order`): once the store
/// is closed, a request still in flight on an open connection changes
/// nothing and is told the daemon is stopping.
#[tokio::test]
async fn a_closed_store_takes_no_more_changes() {
    let core = core_with("closed", &[]);
    let id = create(&core, "before", false).await;
    core.close_store().await.unwrap();
    let spec: crate::types::VmCreate =
        serde_json::from_value(serde_json::json!({"name": "after", "vcpus": 1, "memory_mib": 64})).unwrap();
    let e = core.execute(&Core::local_admin(0), Command::CreateVm(spec)).await.err().unwrap();
    assert_eq!(e.code(), "not_ready", "{e}");
    assert!(core.find_record("after").is_err());
    let stored = Store::open(&core.paths.db).unwrap().vms().unwrap();
    assert_eq!(stored.iter().map(|v| v.id).collect::<Vec<_>>(), [id], "a change reached the store");
    cleanup(&core, &[id]).await;
}

#[tokio::test]
async fn a_replicated_vm_the_peer_took_over_is_stopped_here_at_once() {
    let peer = Uuid::new_v4();
    let spec =
        crate::types::ReplicationSpec { mode: crate::types::ReplicationMode::Sync, max_lag_seconds: 10 };
    let mut taken = replica("taken", peer, VmState::Running);
    taken.replication = Some(spec);
    let mut theirs = replica("theirs", peer, VmState::Running);
    theirs.replication = Some(spec);
    let core = core_with("stale", &[taken.clone(), theirs.clone()]);
    // `taken` still runs from this node's definition (it was cut off while
    // the peer took it over); `theirs` is the peer's own domain (one libvirt
    // shared by two daemons, as in the pair tests).
    let mine = crate::hypervisor::xml::domain_xml(&core.domain_spec(&taken));
    let mut other_spec = core.domain_spec(&theirs);
    other_spec.node_id = peer;
    let other = crate::hypervisor::xml::domain_xml(&other_spec);
    let (a, b) = (taken.id, theirs.id);
    core.hv_call(move |hv| {
        hv.define(&mine)?;
        hv.start(a)?;
        hv.define(&other)?;
        hv.start(b)
    })
    .await
    .unwrap();
    core.reconcile_all().await.unwrap();
    assert_eq!(domain_state(&core, a).await, None, "the stale domain still exists");
    assert_eq!(domain_state(&core, b).await, Some(DomainState::Running), "the peer's domain was touched");
    cleanup(&core, &[a, b]).await;
}
