use super::*;
use crate::hypervisor::xml::{domain_xml, DomainSpec};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const TEST_URI: &str = "test:///default";

fn spec(domain_type: &str, dir: &std::path::Path) -> DomainSpec {
    let uuid = Uuid::new_v4();
    DomainSpec {
        uuid,
        name: format!("nc-test-{}", uuid.simple()),
        domain_type: domain_type.into(),
        vcpus: 1,
        memory_mib: 64,
        disks: vec![],
        nics: vec![],
        cdrom: None,
        kernel: None,
        initrd: None,
        cmdline: None,
        serial_log: dir.join("serial.log"),
        node_id: Uuid::new_v4(),
    }
}

fn find(hv: &Libvirt, uuid: Uuid) -> Option<DomainInfo> {
    hv.list().unwrap().into_iter().find(|d| d.uuid == uuid)
}

#[test]
fn versions_and_ping() {
    let hv = Libvirt::new(TEST_URI);
    assert!(hv.ping());
    let info = hv.info().unwrap();
    assert_eq!(info.uri, TEST_URI);
    assert_eq!(info.libvirt_version.split('.').count(), 3, "{info:?}");
    assert_eq!(info.hypervisor_version.split('.').count(), 3, "{info:?}");
    assert_eq!(version_string(11_003_000), "11.3.0");
    assert_eq!(version_string(10_000_002), "10.0.2");
}

#[test]
fn unreachable_libvirt_is_unavailable_not_fatal() {
    let hv = Libvirt::new("qemu+unix:///system?socket=/nonexistent/libvirt-sock");
    assert!(!hv.ping());
    assert!(matches!(hv.list(), Err(HypervisorError::Unavailable { .. })));
    // Subscribing while down is accepted and applied on the next connect.
    let (tx, _rx) = mpsc::unbounded_channel();
    hv.subscribe(tx).unwrap();
}

#[test]
fn lifecycle_on_test_driver() {
    let hv = Libvirt::new(TEST_URI);
    let s = spec("test", &std::env::temp_dir());
    let uuid = s.uuid;
    hv.define(&domain_xml(&s)).unwrap();

    let listed = find(&hv, uuid).expect("defined domain is listed");
    assert_eq!(listed.name, s.name);
    assert_eq!(listed.state, DomainState::Stopped);
    assert_eq!(listed.vcpus, 1);
    assert_eq!(listed.memory_mib, 64);
    // The test driver's predefined domain "test" is there too.
    assert!(hv.list().unwrap().iter().any(|d| d.name == "test"));

    // Redefine keeps the UUID and updates the definition.
    hv.define(&domain_xml(&DomainSpec { memory_mib: 128, ..s.clone() })).unwrap();
    assert_eq!(find(&hv, uuid).unwrap().memory_mib, 128);

    hv.start(uuid).unwrap();
    assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
    assert!(matches!(hv.start(uuid), Err(HypervisorError::WrongState(_))));
    assert!(matches!(hv.undefine(uuid), Err(HypervisorError::WrongState(_))));
    hv.suspend(uuid).unwrap();
    assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Paused));
    hv.resume(uuid).unwrap();
    assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
    hv.reboot(uuid).unwrap();
    assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
    hv.destroy(uuid).unwrap();
    assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Stopped));
    assert!(matches!(hv.resume(uuid), Err(HypervisorError::WrongState(_))));
    assert!(matches!(hv.destroy(uuid), Err(HypervisorError::WrongState(_))));

    // The test driver powers off at once on shutdown.
    hv.start(uuid).unwrap();
    hv.shutdown(uuid).unwrap();
    assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Stopped));

    hv.undefine(uuid).unwrap();
    assert_eq!(hv.state(uuid).unwrap(), None);
    assert!(find(&hv, uuid).is_none());
}

#[test]
fn unknown_uuid_is_no_domain() {
    let hv = Libvirt::new(TEST_URI);
    let uuid = Uuid::new_v4();
    assert_eq!(hv.state(uuid).unwrap(), None);
    for r in [hv.start(uuid), hv.shutdown(uuid), hv.destroy(uuid), hv.undefine(uuid), hv.suspend(uuid)] {
        match r {
            Err(HypervisorError::NoDomain(u)) => assert_eq!(u, uuid),
            other => panic!("expected NoDomain, got {other:?}"),
        }
    }
}

#[test]
fn bad_xml_is_a_libvirt_error() {
    let hv = Libvirt::new(TEST_URI);
    assert!(matches!(hv.define("<domain"), Err(HypervisorError::Libvirt(_))));
}

fn wait_for_event(rx: &mut mpsc::UnboundedReceiver<LifecycleEvent>, uuid: Uuid) -> LifecycleEvent {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match rx.try_recv() {
            // Other tests share the test driver; skip their events.
            Ok(ev) if ev.uuid == uuid => return ev,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    panic!("no lifecycle event for {uuid}");
}

#[test]
fn lifecycle_events() {
    let hv = Libvirt::new(TEST_URI);
    let (tx, mut rx) = mpsc::unbounded_channel();
    hv.subscribe(tx).unwrap();
    let s = spec("test", &std::env::temp_dir());
    hv.define(&domain_xml(&s)).unwrap();
    let ev = wait_for_event(&mut rx, s.uuid);
    assert_eq!((ev.name.as_str(), ev.kind), (s.name.as_str(), LifecycleKind::Defined));
    hv.start(s.uuid).unwrap();
    assert_eq!(wait_for_event(&mut rx, s.uuid).kind, LifecycleKind::Started);
    hv.suspend(s.uuid).unwrap();
    assert_eq!(wait_for_event(&mut rx, s.uuid).kind, LifecycleKind::Suspended);
    hv.resume(s.uuid).unwrap();
    assert_eq!(wait_for_event(&mut rx, s.uuid).kind, LifecycleKind::Resumed);
    hv.destroy(s.uuid).unwrap();
    assert_eq!(wait_for_event(&mut rx, s.uuid).kind, LifecycleKind::Stopped);
    hv.undefine(s.uuid).unwrap();
    assert_eq!(wait_for_event(&mut rx, s.uuid).kind, LifecycleKind::Undefined);
    assert_eq!(lifecycle_kind(99), LifecycleKind::Other(99));
}

#[test]
fn dropped_connection_is_reopened_and_events_reregistered() {
    let hv = Libvirt::new(TEST_URI);
    let (tx, mut rx) = mpsc::unbounded_channel();
    hv.subscribe(tx).unwrap();
    // A second handle keeps the in-memory test driver (and our domain)
    // alive while the client's own connection is thrown away.
    let keep = Libvirt::new(TEST_URI);
    assert!(keep.ping());
    let s = spec("test", &std::env::temp_dir());
    hv.define(&domain_xml(&s)).unwrap();
    wait_for_event(&mut rx, s.uuid);

    let generation = lock(&hv.inner).generation;
    hv.discard_connection(generation);
    assert!(lock(&hv.inner).conn.is_none());

    // The next call reconnects and re-registers the callback.
    hv.start(s.uuid).unwrap();
    assert_eq!(lock(&hv.inner).generation, generation + 1);
    assert!(lock(&hv.inner).conn.as_ref().unwrap().callback_id.is_some());
    wait_for_event(&mut rx, s.uuid);
    hv.destroy(s.uuid).unwrap();
    hv.undefine(s.uuid).unwrap();
}

#[test]
fn snapshot_xml_parsing() {
    let xml = "<domainsnapshot>\n  <name>s1</name>\n  <description>a &lt;b&gt; &amp;amp; &apos;c&quot;</description>\n  \
               <state>running</state>\n  <creationTime>1700000000</creationTime>\n  <memory snapshot='internal'/>\n  \
               <domain type='qemu'>\n    <name>vm</name>\n    <description>other</description>\n    \
               <memory unit='KiB'>131072</memory>\n  </domain>\n</domainsnapshot>\n";
    let info = parse_snapshot("s1".into(), xml);
    assert_eq!(
        info,
        SnapshotInfo {
            name: "s1".into(),
            description: "a <b> &amp; 'c\"".into(),
            created: 1_700_000_000,
            state: DomainState::Running,
            has_memory: true,
        }
    );
    let off = "<domainsnapshot><name>s2</name><state>shutoff</state><creationTime>5</creationTime>\
               <memory snapshot='no'/><domain><description>x</description></domain></domainsnapshot>";
    let info = parse_snapshot("s2".into(), off);
    assert_eq!(
        (info.state, info.has_memory, info.created, info.description.as_str()),
        (DomainState::Stopped, false, 5, "")
    );
}

#[test]
fn snapshots_on_test_driver() {
    let hv = Libvirt::new(TEST_URI);
    let s = spec("test", &std::env::temp_dir());
    let uuid = s.uuid;
    hv.define(&domain_xml(&s)).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(matches!(hv.snapshot_create(uuid, "cold", "", true), Err(HypervisorError::WrongState(_))));
        hv.snapshot_create(uuid, "cold", "stopped <one>", false).unwrap();
        hv.start(uuid).unwrap();
        assert!(matches!(hv.snapshot_create(uuid, "hot", "", false), Err(HypervisorError::WrongState(_))));
        hv.snapshot_create(uuid, "hot", "", true).unwrap();
        let list = hv.snapshot_list(uuid).unwrap();
        let summary: Vec<_> = list.iter().map(|i| (i.name.as_str(), i.state, i.has_memory)).collect();
        assert_eq!(summary, [("cold", DomainState::Stopped, false), ("hot", DomainState::Running, true)]);
        assert_eq!(list[0].description, "stopped <one>");
        assert!(list[0].created > 1_600_000_000);

        hv.snapshot_revert(uuid, "cold", true).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Stopped));
        hv.snapshot_revert(uuid, "hot", true).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), Some(DomainState::Running));
        match hv.snapshot_revert(uuid, "nope", true) {
            Err(HypervisorError::NoSnapshot(n)) => assert_eq!(n, "nope"),
            other => panic!("expected NoSnapshot, got {other:?}"),
        }
        hv.snapshot_delete(uuid, "hot").unwrap();
        assert!(matches!(hv.snapshot_delete(uuid, "hot"), Err(HypervisorError::NoSnapshot(_))));
        assert_eq!(hv.snapshot_list(uuid).unwrap().len(), 1);
        hv.destroy(uuid).unwrap();
        // Snapshot metadata does not block undefine.
        hv.undefine(uuid).unwrap();
        assert_eq!(hv.state(uuid).unwrap(), None);
    }));
    let _ = hv.destroy(uuid);
    let _ = hv.undefine(uuid);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn networks_on_test_driver() {
    use crate::hypervisor::xml::{network_xml, NetworkSpec};
    let hv = Libvirt::new(TEST_URI);
    let name = format!("nc-net-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let spec = NetworkSpec::Bridge {
        name: name.clone(),
        bridge: "br-nc-test".into(),
        vlan: None,
        openvswitch: false,
    };
    hv.network_define(&network_xml(&spec)).unwrap();
    let listed = hv.network_list().unwrap();
    let ours = listed.iter().find(|n| n.name == name).expect("defined network is listed");
    assert!(ours.active);
    assert_eq!(ours.bridge.as_deref(), Some("br-nc-test"));
    // Redefining an active network is accepted.
    hv.network_define(&network_xml(&spec)).unwrap();
    hv.network_remove(&name).unwrap();
    assert!(!hv.network_list().unwrap().iter().any(|n| n.name == name));
    for r in [hv.network_remove(&name), hv.dhcp_leases(&name).map(drop)] {
        match r {
            Err(HypervisorError::NoNetwork(n)) => assert_eq!(n, name),
            other => panic!("expected NoNetwork, got {other:?}"),
        }
    }
}

#[test]
fn console_of_stopped_domain_is_wrong_state() {
    let hv = Libvirt::new(TEST_URI);
    let s = spec("test", &std::env::temp_dir());
    hv.define(&domain_xml(&s)).unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let r = hv.open_console(s.uuid, tx);
    hv.undefine(s.uuid).unwrap();
    assert!(matches!(r, Err(HypervisorError::WrongState(_))), "{:?}", r.map(drop));
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(matches!(hv.open_console(Uuid::new_v4(), tx), Err(HypervisorError::NoDomain(_))));
}
