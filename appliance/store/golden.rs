//! Golden bytes of every [`Change`] variant in [`CHANGE_FORMAT`] 4, and
//! of formats 3 and 2, which must still decode.
//!
//! postcard encodes by field order and variant index: an edit to the wire
//! types (or to a conversion) silently changes what the peer and the disk
//! read. These fixed inputs must keep encoding to exactly these bytes; if
//! one fails, the edit changed the format: revert it, or define format 5
//! (new constant, a frozen decoder for 4, new golden bytes).

use super::changes::{CHANGE_FORMAT, CHANGE_FORMAT_V1, CHANGE_FORMAT_V2, CHANGE_FORMAT_V3};
use super::*;
use crate::types::{BootSpec, CloudInit, Nic};

fn id(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn vm() -> VmRecord {
    VmRecord {
        id: id(1),
        name: "web".into(),
        vcpus: 2,
        memory_mib: 512,
        disks: vec![Disk {
            device: "vda".into(),
            path: "/d/a".into(),
            size_bytes: 1 << 30,
            image: Some("/i/b".into()),
        }],
        boot: Some(BootSpec { kernel: "/b/k".into(), initrd: None, cmdline: Some("c".into()) }),
        nics: vec![Nic { network: "lan".into(), mac: "52:54:00:00:00:01".into() }],
        cloud_init: Some(CloudInit {
            user_data: "u".into(),
            meta_data: None,
            network_config: Some("n".into()),
        }),
        shutdown_timeout_secs: Some(30),
        autostart: true,
        owner_node: id(2),
        epoch: 3,
        state: VmState::Running,
        created_at: 1_700_000_000_000,
        updated_at: -1,
        replication: None,
        autostart_priority: 0,
    }
}

/// One fixed change per variant in format 4: format 3's cases with the
/// version byte 4, and the VM carrying an `autostart_priority`.
fn cases() -> Vec<(Change, String)> {
    let mut cases: Vec<(Change, String)> =
        cases_v3().into_iter().map(|(c, hex)| (c, format!("04{}", &hex[2..]))).collect();
    let Change::VmPut(v3) = cases[0].0.clone() else { unreachable!() };
    let vm = VmRecord { autostart_priority: -300, ..v3 };
    // Format 3's VM bytes, then -300 (zigzag 599: d704).
    cases[0] = (Change::VmPut(vm), format!("04{}d704", &cases_v3()[0].1[2..]));
    cases
}

/// Format 3 (frozen): format 2's cases with the version byte 3, and the VM
/// carrying a `replication`. VMs of format 3 decode with
/// `autostart_priority: 0`.
fn cases_v3() -> Vec<(Change, String)> {
    let mut cases: Vec<(Change, String)> =
        cases_v2().into_iter().map(|(c, hex)| (c, format!("03{}", &hex[2..]))).collect();
    let vm = VmRecord {
        replication: Some(crate::types::ReplicationSpec {
            mode: crate::types::ReplicationMode::Async,
            max_lag_seconds: 300,
        }),
        ..vm()
    };
    // Format 2's VM bytes, then Some (01), Async (01), 300 (ac02).
    cases[0] = (Change::VmPut(vm), format!("03{}0101ac02", &cases_v2()[0].1[2..]));
    cases
}

/// Format 2 (frozen): one fixed change per variant, in variant order, with
/// its bytes. VMs of format 2 decode with `replication: None`.
fn cases_v2() -> Vec<(Change, &'static str)> {
    vec![
        (Change::VmPut(vm()), "02001001010101010101010101010101010101037765620280040103766461042f642f61808080800401042f692f6201042f622f6b0001016301036c616e1135323a35343a30303a30303a30303a30310101750001016e011e011002020202020202020202020202020202030180a0abfef96201"),
        (Change::VmState { id: id(1), state: VmState::ShuttingDown, at: 7 }, "02011001010101010101010101010101010101030e"),
        (Change::VmDelete { id: id(1) }, "02021001010101010101010101010101010101"),
        (
            Change::TokenPut(TokenRecord {
                id: "0123456789abcdef".into(),
                name: "admin".into(),
                role: Role::Admin,
                hash: [0xab; 32],
                created_at: 5,
            }),
            "020310303132333435363738396162636465660561646d696e02abababababababababababababababababababababababababababababababab0a",
        ),
        (Change::TokenDelete { id: "0123456789abcdef".into() }, "02041030313233343536373839616263646566"),
        (
            Change::ImagePut(ImageRecord {
                name: "deb".into(),
                path: "/i/deb".into(),
                format: "qcow2".into(),
                virtual_size: 1 << 31,
                file_size: 300,
                sha256: "ff".into(),
                created_at: 9,
            }),
            "020503646562062f692f6465620571636f77328080808008ac0202666612",
        ),
        (Change::ImageDelete { name: "deb".into() }, "020603646562"),
        (
            Change::NetworkPut(NetworkRecord {
                name: "lan".into(),
                kind: NetworkKind::Bridge,
                bridge: "br0".into(),
                prefix: 24,
                gateway: Some("10.0.0.1".into()),
                dhcp_start: None,
                dhcp_end: None,
                vlan: Some(300),
                created_at: 11,
            }),
            "0207036c616e010362723018010831302e302e302e31000001ac0216",
        ),
        (Change::NetworkDelete { name: "lan".into() }, "0208036c616e"),
        (
            Change::SnapshotPut(SnapshotRecord {
                vm_id: id(1),
                name: "s".into(),
                description: "d".into(),
                memory: true,
                vm_state: VmState::Paused,
                created_at: 13,
            }),
            "020910010101010101010101010101010101010173016401021a",
        ),
        (Change::SnapshotDelete { vm_id: id(1), name: "s".into() }, "020a10010101010101010101010101010101010173"),
    ]
}

#[test]
fn every_variant_encodes_to_its_golden_bytes() {
    assert_eq!(CHANGE_FORMAT, 4);
    let cases = cases();
    // A new variant needs a golden case too.
    assert_eq!(cases.len(), 11);
    let mut wrong = Vec::new();
    for (change, golden) in &cases {
        let bytes = change.encode();
        if hex::encode(&bytes) != *golden {
            wrong.push(format!("{change:?}\n  got {}\n want {golden}", hex::encode(&bytes)));
        }
        assert_eq!(Change::decode(&bytes).as_ref(), Ok(change));
    }
    assert!(wrong.is_empty(), "encoding changed:\n{}", wrong.join("\n"));
}

/// Format 3 rows decode with the frozen `wire_v3` types, their VMs at
/// priority 0.
#[test]
fn format_3_rows_still_decode() {
    for (change, golden) in cases_v3() {
        let old = hex::decode(&golden).unwrap();
        assert_eq!(old[0], CHANGE_FORMAT_V3);
        assert_eq!(Change::decode(&old), Ok(change));
    }
    // Format 4's VM bytes are not format 3's.
    let v4 = hex::decode(&cases()[0].1).unwrap();
    assert!(Change::decode(&[&[CHANGE_FORMAT_V3], &v4[1..]].concat()).is_err());
}

/// Format 1 rows (the first release) had format 2's layout: both decode,
/// with the frozen types, to the same change.
#[test]
fn format_1_and_2_rows_still_decode() {
    for (change, golden) in cases_v2() {
        let mut old = hex::decode(golden).unwrap();
        assert_eq!(old[0], CHANGE_FORMAT_V2);
        assert_eq!(Change::decode(&old).as_ref(), Ok(&change));
        old[0] = CHANGE_FORMAT_V1;
        assert_eq!(Change::decode(&old), Ok(change));
    }
    // Format 3's VM bytes are not format 2's.
    let v3 = hex::decode(&cases_v3()[0].1).unwrap();
    assert!(Change::decode(&[&[CHANGE_FORMAT_V2], &v3[1..]].concat()).is_err());
    // A record is exactly one change; other versions are refused.
    let mut long = Change::VmDelete { id: id(1) }.encode();
    long.push(0);
    assert!(Change::decode(&long).unwrap_err().contains("after the change"));
    assert!(Change::decode(&[5, 2]).unwrap_err().contains("version 5"));
    assert!(Change::decode(&[]).is_err());
}
