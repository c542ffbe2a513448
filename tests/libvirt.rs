//! The libvirt layer against a real QEMU (TCG) on qemu:///system, through
//! the library's public API: a domain's lifecycle, and the tiny guest from
//! tests/guest/build-guest.sh booted once to exercise networks, DHCP,
//! cloud-init, the console, live resize, disk hotplug and snapshots.
//! Ignored by plain `cargo test` (they need libvirtd and QEMU from
//! tests/setup-host.sh); tests/run.sh runs them with `--include-ignored`.

mod common;

use common::virsh;
use novacron::hypervisor::disks;
use novacron::hypervisor::libvirt::Libvirt;
use novacron::hypervisor::xml::{domain_xml, network_xml, random_mac, DomainSpec, NetworkSpec, Nic};
use novacron::hypervisor::{
    Console, DhcpLease, DomainInfo, DomainState, Hypervisor, HypervisorError, LifecycleEvent, LifecycleKind,
};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use uuid::Uuid;

const URI: &str = "qemu:///system";
const MIB: u64 = 1024 * 1024;

fn spec(dir: &Path) -> DomainSpec {
    let uuid = Uuid::new_v4();
    DomainSpec {
        uuid,
        name: format!("nc-test-{}", uuid.simple()),
        domain_type: "qemu".into(),
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

/// Waits for a `kind` event of domain `uuid`, skipping the others (QEMU
/// reports "resumed" around a start, and other tests share libvirtd).
fn wait_for_kind(rx: &mut mpsc::UnboundedReceiver<LifecycleEvent>, uuid: Uuid, kind: LifecycleKind) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(ev) if ev.uuid == uuid && ev.kind == kind => return,
            Ok(ev) if ev.uuid == uuid => seen.push(ev.kind),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    panic!("no {kind:?} event for {uuid}; saw {seen:?}");
}

/// Real QEMU (TCG) through libvirtd (started by tests/setup-host.sh).
#[test]
#[ignore = "starts a real QEMU domain: needs libvirtd and QEMU from tests/setup-host.sh"]
fn qemu_system_lifecycle() {
    let dir: PathBuf = std::env::temp_dir().join(format!("novacron-qemu-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("root.qcow2");
    disks::create_blank(&disk, 64 * 1024 * 1024).unwrap();
    let mut s = spec(&dir);
    s.disks = vec![novacron::hypervisor::xml::DiskSource::File(disk.clone())];

    let hv = Libvirt::new("qemu:///system");
    let (tx, mut rx) = mpsc::unbounded_channel();
    hv.subscribe(tx).unwrap();
    let info = hv.info().unwrap();
    eprintln!("libvirt {} / qemu {}", info.libvirt_version, info.hypervisor_version);

    hv.define(&domain_xml(&s)).unwrap();
    // Assertions run under catch_unwind so the guest and files are
    // cleaned up before a failure is reported.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> novacron::hypervisor::Result<()> {
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Stopped));
            hv.start(s.uuid)?;
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Running));
            wait_for_kind(&mut rx, s.uuid, LifecycleKind::Started);
            let listed = find(&hv, s.uuid).unwrap();
            assert_eq!((listed.state, listed.vcpus, listed.memory_mib), (DomainState::Running, 1, 64));
            hv.suspend(s.uuid)?;
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Paused));
            hv.resume(s.uuid)?;
            hv.destroy(s.uuid)?;
            assert_eq!(hv.state(s.uuid)?, Some(DomainState::Stopped));
            wait_for_kind(&mut rx, s.uuid, LifecycleKind::Stopped);
            Ok(())
        }));
    let _ = hv.destroy(s.uuid);
    let undefined = hv.undefine(s.uuid);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(r) => r.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
    undefined.unwrap();
    assert_eq!(hv.state(s.uuid).unwrap(), None);
}

/// Removes everything a test made, also when it panics.
struct Cleanup {
    hv: Libvirt,
    domain: Option<Uuid>,
    network: Option<String>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(uuid) = self.domain {
            let _ = self.hv.destroy(uuid);
            if let Err(e) = self.hv.undefine(uuid) {
                if !matches!(e, HypervisorError::NoDomain(_)) {
                    eprintln!("cleanup: undefine {uuid}: {e}");
                }
            }
        }
        if let Some(net) = &self.network {
            let _ = self.hv.network_remove(net);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Collects console output and waits for text in it.
struct Output {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    seen: String,
}

impl Output {
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.seen.contains(needle) {
                return true;
            }
            match self.rx.try_recv() {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(50)),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        self.seen.contains(needle)
    }

    /// Waits for the channel to close (session ended).
    fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.rx.try_recv() {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(50)),
                Err(mpsc::error::TryRecvError::Disconnected) => return true,
            }
        }
        false
    }
}

fn console(hv: &Libvirt, uuid: Uuid) -> (Box<dyn Console>, Output) {
    let (tx, rx) = mpsc::unbounded_channel();
    let c = hv.open_console(uuid, tx).expect("open console");
    (c, Output { rx, seen: String::new() })
}

/// Runs a shell command on the guest console and waits for `expect`.
/// Arithmetic in the command keeps the terminal's echo of the input
/// from matching.
fn run(c: &dyn Console, out: &mut Output, cmd: &str, expect: &str) {
    out.seen.clear();
    c.send(format!("{cmd}\n").as_bytes()).unwrap();
    assert!(out.wait_for(expect, Duration::from_secs(20)), "no {expect:?} after {cmd:?}; got:\n{}", out.seen);
}

/// Runs one qemu-io command on a stopped guest's disk.
fn qemu_io(disk: &Path, cmd: &str) -> bool {
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(disk).output().unwrap();
    // qemu-io exits 0 even when a pattern check fails; it says so.
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
}

fn seed_iso(dir: &Path, first_line: &str) -> PathBuf {
    let src = dir.join("seed");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("user-data"), format!("{first_line}\n")).unwrap();
    std::fs::write(src.join("meta-data"), "instance-id: nc-test\n").unwrap();
    let iso = dir.join("seed.iso");
    let out = Command::new("genisoimage")
        .args(["-quiet", "-output"])
        .arg(&iso)
        .args(["-volid", "cidata", "-joliet", "-rock", "user-data", "meta-data"])
        .current_dir(&src)
        .output()
        .expect("genisoimage (apt-get install genisoimage)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    iso
}

/// One guest, exercising NAT network + DHCP lease, cloud-init CD-ROM,
/// console, live resize, disk hotplug and snapshots, in one boot cycle
/// to keep TCG boot time down.
#[test]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
fn qemu_guest_features() {
    let id = Uuid::new_v4();
    let short = &id.simple().to_string()[..6];
    let dir = PathBuf::from(format!("/var/tmp/novacron-hv-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (kernel, initrd) = common::install_guest(&dir.join("boot"));
    let mut cleanup = Cleanup { hv: Libvirt::new(URI), domain: None, network: None, dir: dir.clone() };
    let hv = Libvirt::new(URI);

    // A private NAT subnet that stays on this host's libvirt bridge.
    // The third octet varies so parallel runs do not collide.
    let octet = 10 + (id.as_bytes()[0] % 200);
    let net = format!("nc-test-{short}");
    let spec = NetworkSpec::Nat {
        name: net.clone(),
        bridge: format!("ncbr{short}"),
        gateway: Ipv4Addr::new(10, 213, octet, 1),
        prefix: 24,
        dhcp_start: Ipv4Addr::new(10, 213, octet, 100),
        dhcp_end: Ipv4Addr::new(10, 213, octet, 150),
    };
    cleanup.network = Some(net.clone());
    hv.network_define(&network_xml(&spec)).unwrap();
    let listed = hv.network_list().unwrap();
    let info = listed.iter().find(|n| n.name == net).expect("network listed");
    assert!(info.active);
    assert_eq!(info.bridge.as_deref(), Some(format!("ncbr{short}").as_str()));

    let root = dir.join("root.qcow2");
    disks::create_blank(&root, 64 * MIB).unwrap();
    let extra = dir.join("extra.qcow2");
    disks::create_blank(&extra, 16 * MIB).unwrap();
    let marker = format!("m{short}");
    let mac = random_mac();
    let s = DomainSpec {
        uuid: id,
        name: format!("nc-hv-{short}"),
        domain_type: "qemu".into(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![novacron::hypervisor::xml::DiskSource::File(root.clone())],
        nics: vec![Nic { network: net.clone(), mac: mac.clone() }],
        cdrom: Some(seed_iso(&dir, &format!("#cloud-config {marker}"))),
        kernel: Some(kernel),
        initrd: Some(initrd),
        cmdline: Some(format!("console=ttyS0 panic=-1 quiet novacron.marker={marker}")),
        serial_log: dir.join("serial.log"),
        node_id: Uuid::new_v4(),
    };
    hv.define(&domain_xml(&s)).unwrap();
    cleanup.domain = Some(id);

    // Console of a stopped domain.
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(matches!(hv.open_console(id, tx), Err(HypervisorError::WrongState(_))));

    let t0 = Instant::now();
    hv.start(id).unwrap();
    let (con, mut out) = console(&hv, id);
    assert!(out.wait_for("NOVACRON-GUEST-UP", Duration::from_secs(90)), "no boot:\n{}", out.seen);
    let booted = t0.elapsed();
    assert!(
        out.wait_for(&format!("NOVACRON-CIDATA=#cloud-config {marker}"), Duration::from_secs(30)),
        "{}",
        out.seen
    );
    assert!(out.wait_for("NOVACRON-IP=", Duration::from_secs(60)), "no DHCP lease:\n{}", out.seen);
    // The address may arrive split across chunks: wait for its line end.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !out.seen.split("NOVACRON-IP=").nth(1).unwrap().contains('\n') && Instant::now() < deadline {
        out.wait_for("\u{0}", Duration::from_millis(100));
    }
    let ip_line = out.seen.split("NOVACRON-IP=").nth(1).unwrap();
    let ip: String = ip_line.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    assert!(ip.starts_with(&format!("10.213.{octet}.")), "{ip}");
    eprintln!("guest up after {booted:?}, lease {ip} for {mac} after {:?}", t0.elapsed());

    // The same lease, seen by libvirt: dnsmasq's lease helper records it
    // for libvirt a moment after the guest has it (seen empty once in CI).
    let want = DhcpLease { mac: mac.clone(), ip: ip.clone() };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut leases = hv.dhcp_leases(&net).unwrap();
    while !leases.contains(&want) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        leases = hv.dhcp_leases(&net).unwrap();
    }
    assert!(leases.contains(&want), "{leases:?}");

    // Console input round trip.
    run(&*con, &mut out, "echo hello-$((40000+2))", "hello-40002");

    // Live resize: qemu-img and the guest both see the new size.
    hv.block_resize(id, "vda", 96 * MIB).unwrap();
    assert_eq!(disks::info(&root).unwrap().virtual_size, 96 * MIB);
    run(&*con, &mut out, "echo size-$(cat /sys/block/vda/size)", &format!("size-{}", 96 * MIB / 512));
    assert!(matches!(hv.block_resize(id, "vdz", MIB), Err(HypervisorError::Libvirt(_))));

    // Disk hotplug in and out.
    hv.attach_disk(id, &novacron::hypervisor::xml::DiskSource::File(extra.clone()), "vdb", true).unwrap();
    run(&*con, &mut out, "sleep 1; echo vdb-$(cat /sys/block/vdb/size)", &format!("vdb-{}", 16 * MIB / 512));
    let (live, config) = (virsh(&["dumpxml", &s.name]), virsh(&["dumpxml", "--inactive", &s.name]));
    assert!(live.contains("<target dev='vdb'") && config.contains("<target dev='vdb'"), "{live}\n{config}");
    hv.detach_disk(id, "vdb", true).unwrap();
    run(
        &*con,
        &mut out,
        "for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/block/vdb ] || break; sleep 1; done; echo gone-$((5+5))-$(ls /sys/block | grep -c vdb)",
        "gone-10-0",
    );
    let config = virsh(&["dumpxml", "--inactive", &s.name]);
    assert!(config.contains("<domain") && !config.contains("<target dev='vdb'"), "{config}");

    // Memory snapshot of the running guest: RAM state comes back.
    run(&*con, &mut out, "echo before > /tmp/m; echo w-$((1+1))", "w-2");
    assert!(matches!(hv.snapshot_create(id, "hot", "", false), Err(HypervisorError::WrongState(_))));
    let t = Instant::now();
    hv.snapshot_create(id, "hot", "running with RAM", true).unwrap();
    eprintln!("memory snapshot took {:?}", t.elapsed());
    run(&*con, &mut out, "echo after > /tmp/m; echo w-$((1+2))", "w-3");
    let t = Instant::now();
    hv.snapshot_revert(id, "hot", true).unwrap();
    eprintln!("memory revert took {:?}", t.elapsed());
    assert_eq!(hv.state(id).unwrap(), Some(DomainState::Running));
    drop(con);
    let (con, mut out) = console(&hv, id);
    run(&*con, &mut out, "echo m-$(cat /tmp/m)-$((2+2))", "m-before-4");

    // A second session takes the console over (FORCE) and the first
    // one's output channel closes.
    let (con2, mut out2) = console(&hv, id);
    assert!(out.wait_closed(Duration::from_secs(10)), "first session still open");
    assert!(con.send(b"x").is_err() || out.wait_closed(Duration::from_secs(1)));
    run(&*con2, &mut out2, "echo s-$((3+4))", "s-7");
    // Stopping the guest ends the session: the output channel closes.
    hv.destroy(id).unwrap();
    assert!(out2.wait_closed(Duration::from_secs(10)), "console still open after destroy");
    assert!(con2.send(b"x").is_err());
    drop(con2);

    // Disk snapshot of the stopped guest: disk content comes back.
    hv.snapshot_create(id, "cold", "", false).unwrap();
    assert!(qemu_io(&root, "read -P 0 0 64k"));
    assert!(qemu_io(&root, "write -P 0xab 0 64k"));
    assert!(qemu_io(&root, "read -P 0xab 0 64k"));
    hv.snapshot_revert(id, "cold", true).unwrap();
    assert_eq!(hv.state(id).unwrap(), Some(DomainState::Stopped));
    assert!(qemu_io(&root, "read -P 0 0 64k"), "disk content not restored");
    assert!(!qemu_io(&root, "read -P 0xab 0 64k"));

    let list = hv.snapshot_list(id).unwrap();
    let summary: Vec<_> = list.iter().map(|i| (i.name.as_str(), i.state, i.has_memory)).collect();
    assert_eq!(summary, [("hot", DomainState::Running, true), ("cold", DomainState::Stopped, false)]);
    assert_eq!(list[0].description, "running with RAM");

    // From stopped back to the running checkpoint.
    hv.snapshot_revert(id, "hot", true).unwrap();
    assert_eq!(hv.state(id).unwrap(), Some(DomainState::Running));
    hv.destroy(id).unwrap();
    hv.snapshot_delete(id, "cold").unwrap();
    assert_eq!(hv.snapshot_list(id).unwrap().len(), 1);

    // Everything the guest printed is in the serial log too.
    let log = std::fs::read_to_string(&s.serial_log).unwrap();
    for needle in ["NOVACRON-GUEST-UP", &format!("NOVACRON-MARKER={marker}"), "hello-40002", "m-before-4"] {
        assert!(log.contains(needle), "{needle} missing from serial log:\n{log}");
    }

    // A domain with snapshots still undefines.
    hv.undefine(id).unwrap();
    assert_eq!(hv.state(id).unwrap(), None);
    cleanup.domain = None;
    hv.network_remove(&net).unwrap();
    assert!(!hv.network_list().unwrap().iter().any(|n| n.name == net));
    assert!(matches!(hv.network_remove(&net), Err(HypervisorError::NoNetwork(_))));
    cleanup.network = None;
}
