use super::*;
use crate::types::Disk;

fn tmp_db(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("novacron-store-{tag}-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("state.db")
}

fn vm(name: &str, node: Uuid) -> VmRecord {
    let id = Uuid::new_v4();
    VmRecord {
        id,
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        disks: vec![Disk {
            device: "vda".into(),
            path: format!("/data/disks/{id}-vda.qcow2"),
            size_bytes: 1 << 30,
            image: None,
        }],
        boot: None,
        nics: vec![crate::types::Nic { network: "lan".into(), mac: "52:54:00:00:00:01".into() }],
        cloud_init: None,
        shutdown_timeout_secs: None,
        autostart: false,
        owner_node: node,
        epoch: 1,
        state: VmState::Stopped,
        created_at: 1,
        updated_at: 1,
    }
}

#[test]
fn database_is_private_and_migrated() {
    use std::os::unix::fs::PermissionsExt;
    let path = tmp_db("perm");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), migrations::MIGRATIONS.last().unwrap().0);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

#[test]
fn node_identity_is_kept() {
    let path = tmp_db("node");
    let first = Store::open(&path).unwrap().node_identity("a").unwrap();
    let again = Store::open(&path).unwrap().node_identity("b").unwrap();
    assert_eq!(first, again);
    assert_eq!(again.name, "a");
}

#[test]
fn newer_schema_is_refused() {
    let path = tmp_db("new");
    drop(Store::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    assert!(matches!(Store::open(&path), Err(StoreError::TooNew { found: 999, .. })));
}

#[test]
fn conflicts_change_nothing() {
    let store = Store::open(&tmp_db("conflict")).unwrap();
    let node = Uuid::new_v4();
    store.commit(&Change::VmPut(vm("a", node))).unwrap();
    let before = store.changes_since(0, 100).unwrap().len();
    let err = store.commit(&Change::VmPut(vm("a", node))).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(store.vms().unwrap().len(), 1);
    assert_eq!(store.changes_since(0, 100).unwrap().len(), before);
    let missing = Change::VmDelete { id: Uuid::new_v4() };
    assert!(matches!(store.commit(&missing), Err(StoreError::NotFound(_))));
}

/// Replaying the change stream of one store on an empty one reproduces its
/// state exactly.
#[test]
fn replay_reproduces_state() {
    let a = Store::open(&tmp_db("replay-a")).unwrap();
    let node = Uuid::new_v4();
    let mut kept = Vec::new();
    for i in 0..40 {
        let mut v = vm(&format!("vm-{i}"), node);
        if i % 3 == 0 {
            v.boot = Some(crate::types::BootSpec {
                kernel: "/data/boot/vmlinuz".into(),
                initrd: None,
                cmdline: Some("console=ttyS0 \"quoted\"".into()),
            });
        }
        a.commit(&Change::VmPut(v.clone())).unwrap();
        kept.push(v);
    }
    for (i, v) in kept.iter().enumerate() {
        match i % 4 {
            0 => {
                a.commit(&Change::VmDelete { id: v.id }).unwrap();
            }
            1 => {
                a.commit(&Change::VmState { id: v.id, state: VmState::Running, at: 7 }).unwrap();
            }
            2 => {
                let mut v2 = v.clone();
                v2.vcpus = 4;
                v2.epoch = 2;
                v2.disks.push(Disk {
                    device: "vdb".into(),
                    path: format!("/data/disks/{}-vdb.qcow2", v.id),
                    size_bytes: 5,
                    image: Some("base.qcow2".into()),
                });
                a.commit(&Change::VmPut(v2)).unwrap();
            }
            _ => {}
        }
    }
    for i in 0..5 {
        let t = TokenRecord {
            id: format!("tok{i}"),
            name: format!("token-{i}"),
            role: Role::Operator,
            hash: [i as u8; 32],
            created_at: i,
        };
        a.commit(&Change::TokenPut(t)).unwrap();
    }
    a.commit(&Change::TokenDelete { id: "tok2".into() }).unwrap();
    let image = ImageRecord {
        name: "debian".into(),
        path: "/data/images/debian".into(),
        format: "qcow2".into(),
        virtual_size: 1 << 30,
        file_size: 1 << 20,
        sha256: "ab".repeat(32),
        created_at: 3,
    };
    a.commit(&Change::ImagePut(image.clone())).unwrap();
    a.commit(&Change::ImagePut(ImageRecord { name: "gone".into(), path: "/x".into(), ..image })).unwrap();
    a.commit(&Change::ImageDelete { name: "gone".into() }).unwrap();
    a.commit(&Change::NetworkPut(NetworkRecord {
        name: "lan".into(),
        kind: crate::types::NetworkKind::Nat,
        bridge: "nc-lan".into(),
        prefix: 24,
        gateway: Some("10.9.0.1".into()),
        dhcp_start: Some("10.9.0.100".into()),
        dhcp_end: Some("10.9.0.200".into()),
        vlan: None,
        created_at: 4,
    }))
    .unwrap();
    let survivor = kept[1].id;
    let mut v = kept[1].clone();
    v.cloud_init = Some(crate::types::CloudInit {
        user_data: "#cloud-config".into(),
        meta_data: None,
        network_config: None,
    });
    v.shutdown_timeout_secs = Some(30);
    a.commit(&Change::VmPut(v)).unwrap();
    for name in ["before-upgrade", "scratch"] {
        a.commit(&Change::SnapshotPut(SnapshotRecord {
            vm_id: survivor,
            name: name.into(),
            description: "d".into(),
            memory: true,
            vm_state: VmState::Running,
            created_at: 5,
        }))
        .unwrap();
    }
    a.commit(&Change::SnapshotDelete { vm_id: survivor, name: "scratch".into() }).unwrap();

    let stream: Vec<Change> = a.changes_since(0, 10_000).unwrap().into_iter().map(|r| r.change).collect();
    let b = Store::open(&tmp_db("replay-b")).unwrap();
    b.replay(&stream).unwrap();
    assert_eq!(a.vms().unwrap(), b.vms().unwrap());
    assert_eq!(a.tokens().unwrap(), b.tokens().unwrap());
    assert_eq!(a.images().unwrap(), b.images().unwrap());
    assert_eq!(a.networks().unwrap(), b.networks().unwrap());
    assert_eq!(a.snapshots().unwrap(), b.snapshots().unwrap());
    assert_eq!(b.images().unwrap().len(), 1);
    assert_eq!(b.snapshots().unwrap().len(), 1);
    assert_eq!(b.vms().unwrap().len(), 30);
    assert_eq!(b.tokens().unwrap().len(), 4);
    // The replica's own stream is the same stream, so it can feed a third.
    let again: Vec<Change> = b.changes_since(0, 10_000).unwrap().into_iter().map(|r| r.change).collect();
    assert_eq!(again, stream);
}

#[test]
fn event_seqs_are_reserved_above_the_last_run() {
    let path = tmp_db("seq");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.reserve_event_seqs(100).unwrap(), 0);
    // A run that dies without a checkpoint may have used all 100.
    assert_eq!(store.reserve_event_seqs(100).unwrap(), 100);
    store.set_event_seq(142).unwrap();
    drop(store);
    assert_eq!(Store::open(&path).unwrap().reserve_event_seqs(100).unwrap(), 142);
}
