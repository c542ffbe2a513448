//! A real QEMU guest (TCG) on qemu:///system: the tiny kernel + busybox
//! initramfs from tests/guest/build-guest.sh.

mod common;

use common::{call, error_code, virsh, wait_for, Daemon, Opts};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn real_guest_lifecycle_survives_kill9() {
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
    common::stop_libvirtd();
    let deadline = Instant::now() + Duration::from_secs(20);
    while call(&c, Method::GET, "/v1/ready", None).await.0 == StatusCode::OK {
        assert!(Instant::now() < deadline, "/v1/ready stayed 200 with libvirtd down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = call(&c, Method::GET, "/v1/ready", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "not_ready"), "{v}");
    common::start_libvirtd();
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
