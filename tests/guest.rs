//! A real QEMU guest (TCG) on qemu:///system: the tiny kernel + busybox
//! initramfs from tests/guest/build-guest.sh.

mod common;

use common::{call, error_code, virsh, wait_for, Daemon, Opts};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

/// The first test stops the system libvirtd for a while; the others of
/// this binary need it up, so they take turns.
static LIBVIRTD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn real_guest_lifecycle_survives_kill9() {
    let _turn = LIBVIRTD.lock().await;
    let mut opts = Opts::test_driver(31);
    opts.uri = "qemu:///system".into();
    let mut d = Daemon::start("guest", opts);
    let (kernel, initrd) = common::install_guest(&d.data().join("boot"));
    let c = d.admin();
    let marker = format!("m{}", std::process::id());
    let spec = json!({
        "name": format!("guest-{}", std::process::id()),
        "vcpus": 1,
        "memory_mib": 128,
        "disks": [{"size_gib": 1}],
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": format!("console=ttyS0 panic=-1 quiet novacron.marker={marker}")}
    });
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let name = vm["name"].as_str().unwrap().to_string();
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    let disk = vm["disks"][0]["path"].as_str().unwrap().to_string();

    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "running");
    let log = d.data().join("logs").join(format!("{name}.{id}.console.log"));
    let started = Instant::now();
    wait_for("the guest's marker on its serial console", 90, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains(&format!("NOVACRON-MARKER={marker}")) && text.contains("NOVACRON-DISK=vda")
    });
    eprintln!("guest booted to its marker in {:?}", started.elapsed());

    // kill -9 the daemon: the guest keeps running and is re-adopted.
    d.kill9();
    assert!(virsh(&["domstate", &name]).contains("running"), "guest died with the daemon");
    d.restart();
    let c = d.admin();
    let (_, list) = call(&c, Method::GET, "/v1/vms", None).await;
    let mine: Vec<_> =
        list["vms"].as_array().unwrap().iter().filter(|v| v["name"] == name.as_str()).collect();
    assert_eq!(mine.len(), 1, "VM duplicated or lost: {list}");
    assert_eq!(mine[0]["state"], "running");
    assert_eq!(mine[0]["managed"], true);

    // libvirtd restarts under the daemon: readiness drops, then the daemon
    // reconnects by itself and still sees the guest running.
    let down = common::stop_libvirtd();
    let deadline = Instant::now() + Duration::from_secs(20);
    while call(&c, Method::GET, "/v1/ready", None).await.0 == StatusCode::OK {
        assert!(Instant::now() < deadline, "/v1/ready stayed 200 with libvirtd down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = call(&c, Method::GET, "/v1/ready", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "not_ready"), "{v}");
    common::start_libvirtd(down);
    let deadline = Instant::now() + Duration::from_secs(30);
    while call(&c, Method::GET, "/v1/ready", None).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "the daemon did not reconnect to libvirtd");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await;
    assert_eq!(v["state"], "running", "{v}");

    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/pause"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("paused")), "{v}");
    assert!(virsh(&["domstate", &name]).contains("paused"));
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/resume"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("running")), "{v}");

    // ACPI shutdown: the guest powers itself off.
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/shutdown?wait=60"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "stopped");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(console.contains("NOVACRON-POWEROFF"), "the guest did not power off by itself");
    assert!(virsh(&["domstate", &name]).contains("shut off"));

    // A lifecycle event moves the store without any API call: start with
    // virsh behind the daemon's back, then see it reported running.
    virsh(&["start", &name]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await;
        if v["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon did not notice a start made with virsh: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (s, _) = call(&c, Method::DELETE, &format!("/v1/vms/{id}?force=true"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!std::path::Path::new(&disk).exists(), "disk not removed");
    assert!(virsh(&["domstate", &name]).contains("failed to get domain"), "domain still defined");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Records the guest printed (`NOVACRON-REC=n`), whether one failed, and done.
use common::disk::printed as printed_records;

/// Record n as the guest writes it: "NCREC <n>\n" padded to 4 KiB with zeros,
/// at byte (256 + n) * 4096.
fn check_records(disk: &std::path::Path, recs: &[u64]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).unwrap();
    let mut block = vec![0u8; 4096];
    for &n in recs {
        f.read_exact_at(&mut block, (256 + n) * 4096).unwrap();
        let mut want = format!("NCREC {n:08}\n").into_bytes();
        want.resize(4096, 0);
        assert!(block == want, "record {n} is not on {}: {:?}", disk.display(), &block[..32]);
    }
}

/// A VM whose disk the data plane serves (replication off): it boots from a
/// raw file over vhost-user, its acknowledged writes are on that file, and
/// kill -9 of the API daemon mid-writes neither fails nor stalls the guest's
/// I/O (the data plane is its own process).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn dataplane_disk_outlives_the_api_daemon() {
    let _turn = LIBVIRTD.lock().await;
    let mut opts = Opts::test_driver(32);
    opts.uri = "qemu:///system".into();
    let mut d = Daemon::start("dpguest", opts);
    let (kernel, initrd) = common::install_guest(&d.data().join("boot"));
    let c = d.admin();
    let name = format!("dpguest-{}", std::process::id());
    let records = 600;
    let spec = json!({
        "name": name,
        "vcpus": 1,
        "memory_mib": 128,
        "disks": [{"size_gib": 1}],
        "replication": {"mode": "off"},
        "boot": {"kernel": kernel, "initrd": initrd,
                 "cmdline": format!("console=ttyS0 panic=-1 quiet novacron.records={records}")}
    });
    // Shipping to a peer is refused with the reason until it exists.
    let mut sync = spec.clone();
    sync["replication"] = json!({"mode": "sync"});
    let (s, v) = call(&c, Method::POST, "/v1/vms", Some(sync)).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "unsupported"), "{v}");
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    let disk = std::path::PathBuf::from(vm["disks"][0]["path"].as_str().unwrap());
    assert_eq!(disk.extension().unwrap(), "raw", "{vm}");
    assert_eq!(vm["replication"]["mode"], "off", "{vm}");
    // What the data plane cannot do for these disks yet is refused, not half-done.
    let (s, v) =
        call(&c, Method::POST, &format!("/v1/vms/{id}/snapshots"), Some(json!({"name": "s1"}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "unsupported"), "{v}");

    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let xml = virsh(&["dumpxml", &name]);
    assert!(xml.contains("type='vhostuser'") && xml.contains("memfd"), "{xml}");
    let log = d.data().join("logs").join(format!("{name}.{id}.console.log"));
    wait_for("the guest's first records", 120, || printed_records(&log).0.len() >= 20);

    // kill -9 of the API daemon while the guest writes.
    let before = printed_records(&log).0.len();
    d.kill9();
    let killed = Instant::now();
    // The guest goes on writing with no daemon at all.
    wait_for("records written while the daemon is dead", 60, || printed_records(&log).0.len() >= before + 50);
    eprintln!(
        "{} records written in {:?} with the API daemon dead",
        printed_records(&log).0.len() - before,
        killed.elapsed()
    );
    d.restart();
    let c = d.admin();
    wait_for("all records", 300, || printed_records(&log).2);
    let (recs, failed, _) = printed_records(&log);
    assert!(!failed, "the guest saw an I/O error:\n{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(recs, (0..records).collect::<Vec<_>>(), "records missing or out of order");
    check_records(&disk, &recs);

    // The restarted daemon shows what the data plane reports.
    let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await;
    let r = &v["replication"];
    assert_eq!((r["mode"].as_str(), r["protection"].as_str()), (Some("off"), Some("unprotected")), "{v}");
    assert_eq!(r["disks"][0]["local"], "up_to_date", "{v}");
    assert_eq!(r["disks"][0]["detail"], "served, guest connected", "{v}");

    // Deleting the VM drops its export, then its file.
    let (s, v) = call(&c, Method::DELETE, &format!("/v1/vms/{id}?force=true"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert!(!disk.exists());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.data().join("dataplane.json")).unwrap()).unwrap();
    assert_eq!(cfg["disks"], json!([]), "{cfg}");
    assert!(common::kill_dataplane(&d.data()), "no data plane was running for this daemon");
}
