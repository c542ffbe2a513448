use super::changes::{CHANGE_FORMAT, CHANGE_FORMAT_V1};
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
        replication: None,
        autostart_priority: 0,
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
    let before = store.stream(0, 100).unwrap().len();
    let err = store.commit(&Change::VmPut(vm("a", node))).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(store.vms().unwrap().len(), 1);
    assert_eq!(store.stream(0, 100).unwrap().len(), before);
    let missing = Change::VmDelete { id: Uuid::new_v4() };
    assert!(matches!(store.commit(&missing), Err(StoreError::NotFound(_))));
}

/// Replaying the change stream of one store on an empty one reproduces its
/// state exactly.
#[test]
fn replay_reproduces_state() {
    let a = Store::open(&tmp_db("replay-a")).unwrap();
    let node = a.node_id();
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

    let rows = a.stream(0, 10_000).unwrap();
    assert!(rows.iter().all(|r| r.origin == node && r.origin_seq == r.seq), "dense local numbering");
    let stream: Vec<Change> = rows.iter().map(|r| r.change.clone()).collect();
    // The peer applies the stream as the other node's changes.
    let b = Store::open(&tmp_db("replay-b")).unwrap();
    for r in &rows {
        let applied = b.apply_remote(node, r.origin_seq as u64, &r.change).unwrap();
        assert!(matches!(applied, Applied::Applied(_)), "{applied:?}");
    }
    assert_eq!(a.vms().unwrap(), b.vms().unwrap());
    assert_eq!(a.tokens().unwrap(), b.tokens().unwrap());
    assert_eq!(a.images().unwrap(), b.images().unwrap());
    assert_eq!(a.networks().unwrap(), b.networks().unwrap());
    assert_eq!(a.snapshots().unwrap(), b.snapshots().unwrap());
    assert_eq!(b.images().unwrap().len(), 1);
    assert_eq!(b.snapshots().unwrap().len(), 1);
    assert_eq!(b.vms().unwrap().len(), 30);
    assert_eq!(b.tokens().unwrap().len(), 4);
    // The replica keeps the changes with their origin and numbers.
    let again = b.stream(0, 10_000).unwrap();
    assert_eq!(again.iter().map(|r| r.change.clone()).collect::<Vec<_>>(), stream);
    assert!(again.iter().zip(&rows).all(|(x, y)| x.origin == node && x.origin_seq == y.origin_seq));
    // ... and never offers them back (no echo).
    assert_eq!(b.changes_since(0, 100).unwrap(), Tail::Changes(Vec::new()));
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

fn token(id: &str, name: &str, created_at: i64) -> TokenRecord {
    TokenRecord { id: id.into(), name: name.into(), role: Role::Admin, hash: [7; 32], created_at }
}

/// Everything `to` has not applied yet of `from`'s own changes.
fn sync(from: &Store, to: &Store) -> usize {
    let mark = to.applied_mark(from.node_id()).unwrap();
    let Tail::Changes(tail) = from.changes_since(mark, 10_000).unwrap() else { panic!("reseed") };
    for c in &tail {
        let change = Change::decode(&c.bytes).unwrap();
        to.apply_remote(from.node_id(), c.seq, &change).unwrap();
    }
    tail.len()
}

type State = (Vec<VmRecord>, Vec<TokenRecord>, Vec<ImageRecord>, Vec<NetworkRecord>, Vec<SnapshotRecord>);

/// Everything a peer can see of a store's replicated state.
fn state(s: &Store) -> State {
    (
        s.vms().unwrap(),
        s.tokens().unwrap(),
        s.images().unwrap(),
        s.networks().unwrap(),
        s.snapshots().unwrap(),
    )
}

/// A store made by the first release: migration 1 only, a VM and a token
/// in the state tables and format-1 rows in the change stream.
#[test]
fn first_release_store_migrates_and_keeps_working() {
    let path = tmp_db("release1");
    let node = Uuid::new_v4();
    let v = vm("old", node);
    let t = token("0011223344556677", "admin", 3);
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(migrations::MIGRATIONS[0].1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO node (id, uuid, name, created_at) VALUES (1, ?1, 'n1', 0)",
            [node.to_string()],
        )
        .unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        for change in [Change::VmPut(v.clone()), Change::TokenPut(t.clone())] {
            // The state tables as release 1 wrote them (same SQL, same blobs).
            // Release 1 had no `replication` (migration 6) nor
            // `autostart_priority` (migration 7) column; the row is written
            // with today's SQL and the columns dropped again.
            tx.execute_batch(
                "ALTER TABLE vms ADD COLUMN replication BLOB;
                 ALTER TABLE vms ADD COLUMN autostart_priority INTEGER NOT NULL DEFAULT 0;",
            )
            .unwrap();
            apply(&tx, node, &change).unwrap();
            tx.execute_batch(
                "ALTER TABLE vms DROP COLUMN replication; ALTER TABLE vms DROP COLUMN autostart_priority;",
            )
            .unwrap();
            let mut v1 = change.encode();
            v1[0] = CHANGE_FORMAT_V1;
            if matches!(change, Change::VmPut(_)) {
                // Format 4 appended `autostart_priority` (here 0: one 0
                // byte), format 3 `replication` (here None: one 0 byte).
                assert_eq!((v1.pop(), v1.pop()), (Some(0), Some(0)));
            }
            tx.execute("INSERT INTO changes (at, payload) VALUES (1, ?1)", [v1]).unwrap();
        }
        tx.commit().unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), migrations::MIGRATIONS.last().unwrap().0);
    assert_eq!(store.node_id(), node);
    assert_eq!(store.node_identity("other").unwrap().name, "n1");
    assert_eq!(store.vms().unwrap(), vec![v.clone()]);
    assert_eq!(store.tokens().unwrap(), vec![t.clone()]);
    let rows = store.stream(0, 10).unwrap();
    assert_eq!(rows.iter().map(|r| (r.origin, r.origin_seq)).collect::<Vec<_>>(), [(node, 1), (node, 2)]);
    // The feed offers the old rows in the current format.
    let Tail::Changes(feed) = store.changes_since(0, 10).unwrap() else { panic!() };
    assert!(feed.iter().all(|c| c.bytes[0] == CHANGE_FORMAT));
    assert_eq!(Change::decode(&feed[0].bytes).unwrap(), Change::VmPut(v.clone()));
    // New changes continue the numbering.
    assert_eq!(store.last_seq().unwrap(), 2);
    assert_eq!(store.commit(&Change::VmState { id: v.id, state: VmState::Running, at: 9 }).unwrap(), 3);
    assert_eq!(store.vms().unwrap()[0].state, VmState::Running);
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.last_seq().unwrap(), 3);
    assert_eq!(store.snapshot().unwrap().seq, 3);
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

/// Item 2: resending a batch (after a reconnect, a crash before the ack)
/// changes nothing; a skipped number is refused instead of applied.
#[test]
fn replaying_a_batch_twice_changes_nothing() {
    let a = Store::open(&tmp_db("idem-a")).unwrap();
    let b = Store::open(&tmp_db("idem-b")).unwrap();
    let v = vm("web", a.node_id());
    a.commit(&Change::VmPut(v.clone())).unwrap();
    a.commit(&Change::VmState { id: v.id, state: VmState::Running, at: 5 }).unwrap();
    a.commit(&Change::TokenPut(token("aaaa000000000001", "ops", 4))).unwrap();
    a.commit(&Change::TokenDelete { id: "aaaa000000000001".into() }).unwrap();
    a.commit(&Change::VmDelete { id: v.id }).unwrap();
    a.commit(&Change::VmPut(vm("db", a.node_id()))).unwrap();
    let Tail::Changes(batch) = a.changes_since(0, 100).unwrap() else { panic!() };
    assert_eq!(batch.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    let apply_all = |b: &Store| -> Vec<Applied> {
        batch
            .iter()
            .map(|c| b.apply_remote(a.node_id(), c.seq, &Change::decode(&c.bytes).unwrap()).unwrap())
            .collect()
    };
    assert!(apply_all(&b).iter().all(|r| matches!(r, Applied::Applied(_))));
    let (after_once, rows_once) = (state(&b), b.stream(0, 100).unwrap());
    assert!(apply_all(&b).iter().all(|r| *r == Applied::Duplicate));
    assert_eq!(state(&b), after_once);
    assert_eq!(b.stream(0, 100).unwrap(), rows_once);
    assert_eq!(b.applied_mark(a.node_id()).unwrap(), 6);
    assert_eq!(state(&b).0, state(&a).0);
    // Deleting or updating what is gone is a no-op, not an error.
    let gone = Uuid::new_v4();
    for (seq, c) in [
        (7, Change::VmDelete { id: gone }),
        (8, Change::VmState { id: gone, state: VmState::Running, at: 1 }),
        (9, Change::TokenDelete { id: "nope".into() }),
        (10, Change::ImageDelete { name: "nope".into() }),
        (11, Change::NetworkDelete { name: "nope".into() }),
        (12, Change::SnapshotDelete { vm_id: gone, name: "s".into() }),
    ] {
        assert_eq!(b.apply_remote(a.node_id(), seq, &c).unwrap(), Applied::Applied(vec![]), "{c:?}");
    }
    // A gap (13 missing) is refused and applies nothing.
    let err = b.apply_remote(a.node_id(), 14, &Change::VmPut(vm("late", a.node_id()))).unwrap_err();
    assert!(matches!(err, StoreError::Gap { expected: 13, got: 14, .. }), "{err}");
    assert_eq!(b.vms().unwrap().len(), 1);
    // A change of our own never comes back in.
    assert_eq!(b.apply_remote(b.node_id(), 1, &Change::VmDelete { id: gone }).unwrap(), Applied::Duplicate);
}

/// Item 1: observed state is the owner's to report.
#[test]
fn only_the_owner_writes_observed_state() {
    let a = Store::open(&tmp_db("own-a")).unwrap();
    let b = Store::open(&tmp_db("own-b")).unwrap();
    let mine = vm("on-a", a.node_id());
    a.commit(&Change::VmPut(mine.clone())).unwrap();
    a.commit(&Change::VmState { id: mine.id, state: VmState::Running, at: 2 }).unwrap();
    sync(&a, &b);
    // B shows what A reported, and cannot record a state of its own for it.
    assert_eq!(b.vms().unwrap()[0].state, VmState::Running);
    let err = b.commit(&Change::VmState { id: mine.id, state: VmState::Missing, at: 3 }).unwrap_err();
    assert!(matches!(err, StoreError::NotOwner(_)), "{err}");
    assert_eq!(b.vms().unwrap()[0].state, VmState::Running);
    // A state report for A's VM from B (not its owner) is ignored on A, and
    // B's stale copy of A's definition does not overwrite A's record.
    let mut stale = mine.clone();
    stale.vcpus = 9;
    stale.state = VmState::Stopped;
    assert_eq!(
        a.apply_remote(b.node_id(), 1, &Change::VmState { id: mine.id, state: VmState::Missing, at: 4 })
            .unwrap(),
        Applied::Applied(vec![])
    );
    assert_eq!(
        a.apply_remote(b.node_id(), 2, &Change::VmPut(stale.clone())).unwrap(),
        Applied::Applied(vec![])
    );
    assert_eq!(
        a.apply_remote(b.node_id(), 3, &Change::VmDelete { id: mine.id }).unwrap(),
        Applied::Applied(vec![])
    );
    let on_a = a.vms().unwrap();
    assert_eq!((on_a[0].vcpus, on_a[0].state), (1, VmState::Running));
    // A handover (the peer puts the VM with this node as owner at a higher
    // epoch) applies, keeping the state observed here.
    let mut handed = stale;
    handed.epoch = 5;
    a.apply_remote(b.node_id(), 4, &Change::VmPut(handed)).unwrap();
    let on_a = a.vms().unwrap();
    assert_eq!((on_a[0].vcpus, on_a[0].epoch, on_a[0].state), (9, 5, VmState::Running));
}

/// Item 3: a new peer starts from a snapshot plus the tail after it.
#[test]
fn a_new_peer_is_seeded_from_snapshot_and_tail() {
    let a = Store::open(&tmp_db("seed-a")).unwrap();
    let b = Store::open(&tmp_db("seed-b")).unwrap();
    for i in 0..20 {
        let v = vm(&format!("vm-{i}"), a.node_id());
        a.commit(&Change::VmPut(v.clone())).unwrap();
        if i % 2 == 0 {
            a.commit(&Change::VmDelete { id: v.id }).unwrap();
        }
    }
    a.commit(&Change::TokenPut(token("aaaa000000000001", "ops", 4))).unwrap();
    let keep = a.vms().unwrap()[0].clone();
    a.commit(&Change::SnapshotPut(SnapshotRecord {
        vm_id: keep.id,
        name: "s".into(),
        description: String::new(),
        memory: false,
        vm_state: VmState::Stopped,
        created_at: 1,
    }))
    .unwrap();
    let snap = a.snapshot().unwrap();
    assert_eq!(snap.seq, a.last_seq().unwrap() as u64);
    // Smaller than the history: 10 VMs + 1 token + 1 snapshot.
    assert_eq!(snap.changes.len(), 12);
    // Changes committed after the snapshot come with the tail.
    a.commit(&Change::VmState { id: keep.id, state: VmState::Running, at: 8 }).unwrap();
    let decoded: Vec<Change> = snap.changes.iter().map(|c| Change::decode(c).unwrap()).collect();
    assert!(matches!(b.apply_snapshot(a.node_id(), snap.seq, &decoded).unwrap(), Applied::Applied(_)));
    assert_eq!(b.applied_mark(a.node_id()).unwrap(), snap.seq);
    assert_eq!(sync(&a, &b), 1);
    assert_eq!(state(&a), state(&b));
}

/// Item 3: acknowledged changes are pruned; a peer behind the pruned point
/// is told to re-seed.
#[test]
fn acknowledged_changes_are_pruned_and_a_late_peer_reseeds() {
    let a = Store::open(&tmp_db("prune-a")).unwrap();
    let peer = Uuid::new_v4();
    let r = Retention { keep_ms: 3_600_000, keep_rows: 100, max_rows: 1000 };
    let v = vm("busy", a.node_id());
    a.commit(&Change::VmPut(v.clone())).unwrap();
    let count = |s: &Store| s.stream(0, usize::MAX).unwrap().len();
    // Many changes, committed 100 per transaction to keep the test fast.
    let burst = |n: i64| -> Vec<Change> {
        (0..n)
            .map(|i| Change::VmState {
                id: v.id,
                state: if i % 2 == 0 { VmState::Running } else { VmState::Stopped },
                at: i,
            })
            .collect()
    };
    for _ in 0..30 {
        a.replay(&burst(100)).unwrap();
        // The peer is 50 behind; rows are young (keep_ms does not apply).
        a.record_peer_ack(peer, a.last_seq().unwrap() as u64 - 50).unwrap();
        a.prune(now_ms(), &r).unwrap();
        assert!(count(&a) <= 150, "{} rows kept", count(&a));
    }
    assert_eq!(a.last_seq().unwrap(), 3001);
    // Acknowledged and older than keep_ms: all but the unacknowledged go.
    a.record_peer_ack(peer, 2990).unwrap();
    a.prune(now_ms() + 3_600_001, &r).unwrap();
    assert_eq!(count(&a), 11);
    let Tail::Changes(tail) = a.changes_since(2990, 100).unwrap() else { panic!() };
    assert_eq!(tail.len(), 11);
    assert_eq!(a.changes_since(5, 100).unwrap(), Tail::Reseed { pruned_through: 2990 });
    // Unacknowledged rows stay up to max_rows, then the peer must re-seed.
    for _ in 0..15 {
        a.replay(&burst(100)).unwrap();
    }
    a.prune(now_ms(), &r).unwrap();
    assert_eq!(count(&a), 1000);
    assert!(matches!(a.changes_since(2990, 100).unwrap(), Tail::Reseed { .. }));
    assert_eq!(a.last_seq().unwrap(), 4501);
}

/// Item 4: both nodes made an `admin` token (and an `ops` VM) while apart.
/// Whatever order each applies the other's changes in, both end with the
/// same records: the older keeps the name, the other is renamed with its
/// id's first 6 hex digits, and both are reported.
#[test]
fn name_conflicts_resolve_identically_on_both_nodes() {
    let a = Store::open(&tmp_db("names-a")).unwrap();
    let b = Store::open(&tmp_db("names-b")).unwrap();
    a.commit(&Change::TokenPut(token("aaaa000000000001", "admin", 10))).unwrap();
    b.commit(&Change::TokenPut(token("bbbb000000000002", "admin", 20))).unwrap();
    let mut va = vm("ops", a.node_id());
    va.created_at = 50;
    let mut vb = vm("ops", b.node_id());
    vb.created_at = 40;
    a.commit(&Change::VmPut(va.clone())).unwrap();
    b.commit(&Change::VmPut(vb.clone())).unwrap();
    // The same network made on both (same definition): one record.
    let net = |created_at| NetworkRecord {
        name: "lan".into(),
        kind: crate::types::NetworkKind::Nat,
        bridge: "nc-lan".into(),
        prefix: 24,
        gateway: Some("10.9.0.1".into()),
        dhcp_start: None,
        dhcp_end: None,
        vlan: None,
        created_at,
    };
    a.commit(&Change::NetworkPut(net(7))).unwrap();
    b.commit(&Change::NetworkPut(net(3))).unwrap();
    // An image name used for different content on each.
    let img = |sha: &str, created_at| ImageRecord {
        name: "deb".into(),
        path: format!("/data/images/deb-{sha}"),
        format: "qcow2".into(),
        virtual_size: 1,
        file_size: 1,
        sha256: sha.repeat(32),
        created_at,
    };
    a.commit(&Change::ImagePut(img("a1", 1))).unwrap();
    b.commit(&Change::ImagePut(img("b2", 1))).unwrap();
    sync(&a, &b);
    sync(&b, &a);
    assert_eq!(state(&a), state(&b));
    let names = |s: &Store| s.tokens().unwrap().into_iter().map(|t| (t.name, t.id)).collect::<Vec<_>>();
    assert_eq!(
        names(&a),
        [
            ("admin".to_string(), "aaaa000000000001".to_string()),
            ("admin-bbbb00".into(), "bbbb000000000002".into())
        ]
    );
    let vms: Vec<_> = a.vms().unwrap().into_iter().map(|v| (v.name, v.id)).collect();
    let loser = format!("ops-{}", &va.id.simple().to_string()[..6]);
    assert_eq!(vms, [("ops".to_string(), vb.id), (loser, va.id)]);
    assert_eq!(a.networks().unwrap().len(), 1);
    assert_eq!(a.networks().unwrap()[0].created_at, 3);
    let imgs: Vec<_> = a.images().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(imgs, ["deb", "deb-b2b2b2"]);
    for s in [&a, &b] {
        let mut c: Vec<_> = s.conflicts(10).unwrap().into_iter().map(|c| (c.kind, c.outcome)).collect();
        c.sort();
        assert_eq!(
            c,
            [
                ("image".to_string(), "renamed to deb-b2b2b2".to_string()),
                ("token".into(), "renamed to admin-bbbb00".into()),
                ("vm".into(), format!("renamed to ops-{}", &va.id.simple().to_string()[..6])),
            ]
        );
    }
    // Resending the same changes does not rename again or report again.
    sync(&a, &b);
    assert_eq!(b.conflicts(10).unwrap().len(), 3);
}

/// A batch is one transaction: an overlapping resend applies only what is
/// new, and a gap anywhere applies nothing of it.
#[test]
fn batches_apply_all_or_nothing() {
    let a = Store::open(&tmp_db("batch-a")).unwrap();
    let b = Store::open(&tmp_db("batch-b")).unwrap();
    for i in 0..6 {
        a.commit(&Change::TokenPut(token(&format!("aaaa00000000000{i}"), &format!("t{i}"), i))).unwrap();
    }
    let Tail::Changes(tail) = a.changes_since(0, 100).unwrap() else { panic!() };
    let batch: Vec<(u64, Change)> = tail.iter().map(|c| (c.seq, Change::decode(&c.bytes).unwrap())).collect();
    let first = b.apply_remote_batch(a.node_id(), &batch[..4]).unwrap();
    assert!(first.iter().all(|r| matches!(r, Applied::Applied(v) if v.len() == 1)));
    // Resent from 3: 3 and 4 are duplicates, 5 and 6 are new.
    let again = b.apply_remote_batch(a.node_id(), &batch[2..]).unwrap();
    assert_eq!(again.iter().filter(|r| **r == Applied::Duplicate).count(), 2);
    assert_eq!(b.tokens().unwrap(), a.tokens().unwrap());
    // A batch with a hole: 8 is missing, so 7 is not applied either.
    let c = Store::open(&tmp_db("batch-c")).unwrap();
    let holey = [batch[0].clone(), (3, batch[2].1.clone())];
    assert!(matches!(c.apply_remote_batch(a.node_id(), &holey), Err(StoreError::Gap { expected: 2, .. })));
    assert_eq!((c.tokens().unwrap().len(), c.applied_mark(a.node_id()).unwrap()), (0, 0));
}

#[test]
#[ignore = "a measurement, not a check: prints rates for docs/performance.md"]
fn measure_apply_rate() {
    let a = Store::open(&tmp_db("rate-a")).unwrap();
    let v = vm("busy", a.node_id());
    a.commit(&Change::VmPut(v.clone())).unwrap();
    let burst: Vec<Change> = (0..2000)
        .map(|i| Change::VmState {
            id: v.id,
            state: if i % 2 == 0 { VmState::Running } else { VmState::Stopped },
            at: i,
        })
        .collect();
    a.replay(&burst).unwrap();
    let Tail::Changes(tail) = a.changes_since(0, 10_000).unwrap() else { panic!() };
    let all: Vec<(u64, Change)> = tail.iter().map(|c| (c.seq, Change::decode(&c.bytes).unwrap())).collect();
    let b = Store::open(&tmp_db("rate-b")).unwrap();
    let t = std::time::Instant::now();
    for (seq, c) in &all[..500] {
        b.apply_remote(a.node_id(), *seq, c).unwrap();
    }
    let single = 500.0 / t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for chunk in all[500..].chunks(100) {
        b.apply_remote_batch(a.node_id(), chunk).unwrap();
    }
    let batched = (all.len() - 500) as f64 / t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for _ in 0..500 {
        a.commit(&Change::VmState { id: v.id, state: VmState::Running, at: 1 }).unwrap();
        a.commit(&Change::VmState { id: v.id, state: VmState::Stopped, at: 1 }).unwrap();
    }
    let local = 1000.0 / t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let Tail::Changes(t2) = a.changes_since(0, 10_000).unwrap() else { panic!() };
    let feed = t2.len() as f64 / t.elapsed().as_secs_f64();
    println!("apply_remote one per tx: {single:.0}/s; batches of 100: {batched:.0}/s; local commit: {local:.0}/s; changes_since read: {feed:.0} rows/s");
}

/// `autostart_priority` (migration 7, change format 4) survives a reopen
/// and reaches the peer in the change feed and the snapshot.
#[test]
fn autostart_priority_is_stored_and_replicated() {
    let path = tmp_db("prio");
    let store = Store::open(&path).unwrap();
    let v = VmRecord { autostart_priority: -300, ..vm("prio", store.node_id()) };
    store.commit(&Change::VmPut(v.clone())).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.vms().unwrap(), vec![v.clone()]);
    let Tail::Changes(feed) = store.changes_since(0, 10).unwrap() else { panic!() };
    assert_eq!(Change::decode(&feed[0].bytes).unwrap(), Change::VmPut(v.clone()));
    let peer = Store::open(&tmp_db("prio-peer")).unwrap();
    let snap = store.snapshot().unwrap();
    let decoded: Vec<Change> = snap.changes.iter().map(|c| Change::decode(c).unwrap()).collect();
    assert!(matches!(peer.apply_snapshot(store.node_id(), snap.seq, &decoded).unwrap(), Applied::Applied(_)));
    assert_eq!(peer.vms().unwrap(), vec![v]);
}
