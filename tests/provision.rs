//! Guest provisioning: images, cloud-init, networks, snapshots, console,
//! events. Fast tests run on libvirt's test driver; the real-guest test
//! boots the tiny TCG guest on qemu:///system.

mod common;

use common::{call, error_code, virsh, Daemon, Opts, Ws};
use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// PUT an image with curl over the local socket. Big files are streamed
/// (`-T`); small ones are sent with `--data-binary`, which, unlike `-T`,
/// never rewrites the URL (hostile names stay as they are).
fn curl_upload(d: &Daemon, name: &str, file: &Path, extra: &[&str]) -> (u16, Value) {
    let big = std::fs::metadata(file).unwrap().len() > 1 << 20;
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--path-as-is", "-w", "\n%{http_code}", "--unix-socket"]).arg(&d.socket).args([
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
    ]);
    if big {
        cmd.arg("-T").arg(file);
    } else {
        cmd.arg("--data-binary").arg(format!("@{}", file.display()));
    }
    let out = cmd.args(extra).arg(format!("http://localhost/v1/images/{name}")).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn image_upload_is_streamed_and_checked() {
    let d = Daemon::start("images", Opts::test_driver(51));
    let c = d.admin();
    let dir = d.dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();

    // 1 GiB sparse file: the daemon's RSS must stay flat during the upload.
    let big = dir.join("big.raw");
    std::fs::File::create(&big).unwrap().set_len(1 << 30).unwrap();
    let pid = d.pid();
    let before = vm_rss_kib(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(vm_rss_kib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let started = Instant::now();
    let (code, v) = curl_upload(&d, "big", &big, &[]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert_eq!(code, 201, "{v}");
    assert_eq!((v["format"].as_str(), v["virtual_size"].as_u64()), (Some("raw"), Some(1 << 30)));
    eprintln!("1 GiB upload in {:?}; VmRSS {before} kB before, {peak} kB peak", started.elapsed());
    assert!(peak < before + 16 * 1024, "RSS grew by {} kB during the upload", peak - before);

    // A qcow2 with a checksum that matches.
    let q = dir.join("base.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("64M")
        .status()
        .unwrap()
        .success());
    let sha = String::from_utf8(Command::new("sha256sum").arg(&q).output().unwrap().stdout).unwrap();
    let sha = sha.split_whitespace().next().unwrap().to_string();
    let (code, v) = curl_upload(&d, "base", &q, &["-H", &format!("X-Checksum-Sha256: {sha}")]);
    assert_eq!(code, 201, "{v}");
    assert_eq!((v["format"].as_str(), v["sha256"].as_str()), (Some("qcow2"), Some(sha.as_str())));

    // The CLI: upload with progress lines (stderr is not a terminal here)
    // and import from the configured import folder.
    let small = dir.join("small.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&small)
        .arg("32M")
        .status()
        .unwrap()
        .success());
    let r = common::cli(&d, &["image", "upload", "cli-up", small.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("100%"), "no progress reported: {}", r.stderr);
    let import_dir = d.dir.join("import");
    std::fs::create_dir_all(&import_dir).unwrap();
    std::fs::copy(&small, import_dir.join("preloaded.qcow2")).unwrap();
    let r = common::cli(
        &d,
        &["image", "import", "preloaded", "--path", import_dir.join("preloaded.qcow2").to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let r = common::cli(&d, &["image", "list"]);
    assert!(r.stdout.contains("cli-up") && r.stdout.contains("preloaded"), "{}", r.stdout);
    let r = common::cli(&d, &["image", "upload", "cli-up", small.to_str().unwrap()]);
    assert_eq!(r.code, 4, "a taken name is a conflict: {}", r.stderr);
    for n in ["cli-up", "preloaded"] {
        assert_eq!(common::cli(&d, &["image", "delete", n]).code, 0);
    }

    // Disks from it: an overlay and a full copy.
    let spec = json!({"name": "app", "vcpus": 1, "memory_mib": 64,
                      "disks": [{"image": "base"}, {"image": "base", "copy": true}]});
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["disks"][0]["image"].as_str().map(|p| p.ends_with("/images/base")), Some(true));
    assert!(vm["disks"][1]["image"].is_null(), "a copy does not depend on the image");
    let (s, v) = call(&c, Method::DELETE, "/v1/images/base", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "in_use"), "{v}");
    let (_, img) = call(&c, Method::GET, "/v1/images/base", None).await;
    assert_eq!(img["used_by"], json!(["app"]));

    // Grow the stopped VM's disk offline; shrinking is refused.
    let (s, v) = call(&c, Method::POST, "/v1/vms/app/disks/vda/resize", Some(json!({"size_gib": 1}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["disks"][0]["size_bytes"], 1u64 << 30);
    let (s, v) = call(&c, Method::POST, "/v1/vms/app/disks/vda/resize", Some(json!({"size_gib": 1}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-U", vm["disks"][0]["path"].as_str().unwrap()])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 1u64 << 30);

    // Clone as overlays: both VMs keep working on their own overlays.
    let (s, clone) = call(&c, Method::POST, "/v1/vms/app/clone", Some(json!({"name": "app2"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{clone}");
    assert_ne!(clone["id"], vm["id"]);
    assert_eq!(call(&c, Method::POST, "/v1/vms/app2/start", None).await.0, StatusCode::OK);
    assert_eq!(call(&c, Method::POST, "/v1/vms/app/start", None).await.0, StatusCode::OK);
    let (s, v) = call(&c, Method::POST, "/v1/vms/app/clone", Some(json!({"name": "app3"}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "wrong_state"), "a running VM is not cloned");
    for n in ["app", "app2"] {
        assert_eq!(
            call(&c, Method::DELETE, &format!("/v1/vms/{n}?force=true"), None).await.0,
            StatusCode::NO_CONTENT
        );
    }
    let bases: Vec<_> = std::fs::read_dir(d.data().join("disks/bases")).unwrap().collect();
    assert!(bases.is_empty(), "frozen clone bases left behind");
    assert_eq!(call(&c, Method::DELETE, "/v1/images/base", None).await.0, StatusCode::NO_CONTENT);
    assert!(!d.data().join("images/base").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_provisioning_requests_change_nothing() {
    let d = Daemon::start("hostile3", Opts::test_driver(52));
    let c = d.admin();
    let dir = d.dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let state = || async {
        let (_, a) = call(&c, Method::GET, "/v1/images", None).await;
        let (_, b) = call(&c, Method::GET, "/v1/vms", None).await;
        let (_, n) = call(&c, Method::GET, "/v1/networks", None).await;
        let files: Vec<String> = std::fs::read_dir(d.data().join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        (a, b, n, files)
    };
    assert_eq!(
        call(&c, Method::POST, "/v1/vms", Some(json!({"name": "vm", "vcpus": 1, "memory_mib": 64}))).await.0,
        StatusCode::CREATED
    );
    let before = state().await;

    let qimg = |args: &[&str]| assert!(Command::new("qemu-img").args(args).status().unwrap().success());
    let base = dir.join("b.qcow2");
    qimg(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
    let backing = dir.join("backing.qcow2");
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        backing.to_str().unwrap(),
    ]);
    let json_backing = dir.join("json.qcow2");
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        "json:{\"file.filename\":\"/etc/shadow\"}",
        json_backing.to_str().unwrap(),
        "16M",
    ]);
    let data_file = dir.join("datafile.qcow2");
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", dir.join("x.data").display()),
        data_file.to_str().unwrap(),
        "16M",
    ]);
    let small = dir.join("small.raw");
    std::fs::write(&small, vec![1u8; 4096]).unwrap();

    for (what, name, file, extra, status, code) in [
        ("backing file", "evil1", &backing, vec![], 400, "invalid_image"),
        ("json: backing", "evil2", &json_backing, vec![], 400, "invalid_image"),
        ("external data file", "evil3", &data_file, vec![], 400, "invalid_image"),
        (
            "checksum mismatch",
            "evil4",
            &small,
            vec!["-H".to_string(), format!("X-Checksum-Sha256: {}", "0".repeat(64))],
            400,
            "checksum_mismatch",
        ),
        (
            "bad checksum header",
            "evil5",
            &small,
            vec!["-H".to_string(), "X-Checksum-Sha256: xyz".to_string()],
            400,
            "invalid_value",
        ),
        ("name traversal", "..", &small, vec![], 400, "invalid_value"),
        ("name with dots", "a..b", &small, vec![], 400, "invalid_value"),
        ("name encoded slash", "a%2Fb", &small, vec![], 400, "invalid_value"),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (s, v) = curl_upload(&d, name, file, &extra);
        assert_eq!((s, error_code(&v)), (status, code), "{what}: {v}");
        assert_eq!(state().await, before, "{what} changed something");
    }
    // Wrong content type on an upload.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"])
        .arg(&d.socket)
        .args([
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "{}",
            "http://localhost/v1/images/x",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "415");

    // A truncated upload: the connection closes before Content-Length bytes.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        s.write_all(b"PUT /v1/images/cut HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n").await.unwrap();
        s.write_all(&[0u8; 5000]).await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(state().await, before, "a truncated upload left something behind");

    let vm = |extra: Value| {
        let mut v = json!({"name": "x", "vcpus": 1, "memory_mib": 64});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    let cases: Vec<(&str, Method, &str, Value, u16, &str)> = vec![
        (
            "cloud-init too big",
            Method::POST,
            "/v1/vms",
            vm(json!({"cloud_init": {"user_data": "x".repeat(70_000)}})),
            400,
            "invalid_value",
        ),
        (
            "cloud-init unknown field",
            Method::POST,
            "/v1/vms",
            vm(json!({"cloud_init": {"user_data": "a", "vendor_data": "b"}})),
            400,
            "invalid_value",
        ),
        ("unknown network", Method::POST, "/v1/vms", vm(json!({"network": "nope"})), 404, "not_found"),
        (
            "image not registered",
            Method::POST,
            "/v1/vms",
            vm(json!({"disks": [{"image": "../state.db"}]})),
            400,
            "invalid_value",
        ),
        (
            "copy of a blank disk",
            Method::POST,
            "/v1/vms",
            vm(json!({"disks": [{"size_gib": 1, "copy": true}]})),
            400,
            "invalid_value",
        ),
        (
            "snapshot name traversal",
            Method::POST,
            "/v1/vms/vm/snapshots",
            json!({"name": "../x"}),
            400,
            "invalid_value",
        ),
        (
            "snapshot with memory of a stopped VM",
            Method::POST,
            "/v1/vms/vm/snapshots",
            json!({"name": "s", "memory": true}),
            400,
            "invalid_value",
        ),
        (
            "revert unknown snapshot",
            Method::POST,
            "/v1/vms/vm/snapshots/nope/revert",
            Value::Null,
            404,
            "not_found",
        ),
        (
            "import outside import dirs",
            Method::POST,
            "/v1/images",
            json!({"name": "i", "path": "/etc/shadow"}),
            400,
            "invalid_value",
        ),
        (
            "network bad subnet",
            Method::POST,
            "/v1/networks",
            json!({"name": "n", "kind": "nat", "subnet": "10.1.2.3/24"}),
            400,
            "invalid_value",
        ),
        (
            "network no subnet",
            Method::POST,
            "/v1/networks",
            json!({"name": "n", "kind": "nat"}),
            400,
            "invalid_value",
        ),
        (
            "network gateway outside",
            Method::POST,
            "/v1/networks",
            json!({"name": "n", "kind": "nat", "subnet": "10.99.0.0/24", "gateway": "10.98.0.1"}),
            400,
            "invalid_value",
        ),
        (
            "network too large",
            Method::POST,
            "/v1/networks",
            json!({"name": "n", "kind": "nat", "subnet": "10.0.0.0/8"}),
            400,
            "invalid_value",
        ),
        (
            "bridge that does not exist",
            Method::POST,
            "/v1/networks",
            json!({"name": "n", "kind": "bridge", "bridge": "nobr0"}),
            400,
            "invalid_value",
        ),
        (
            "bridge with a subnet",
            Method::POST,
            "/v1/networks",
            json!({"name": "n", "kind": "bridge", "bridge": "br0", "subnet": "10.0.0.0/24"}),
            400,
            "invalid_value",
        ),
        (
            "console log with a bad size",
            Method::GET,
            "/v1/vms/vm/console/log?bytes=x",
            Value::Null,
            400,
            "invalid_query",
        ),
        (
            "resize unknown disk",
            Method::POST,
            "/v1/vms/vm/disks/vdz/resize",
            json!({"size_gib": 2}),
            404,
            "not_found",
        ),
        ("detach unknown disk", Method::DELETE, "/v1/vms/vm/disks/vdz", Value::Null, 404, "not_found"),
    ];
    for (what, method, path, body, status, code) in cases {
        let body = if body.is_null() { None } else { Some(body) };
        let (s, v) = call(&c, method, path, body).await;
        assert_eq!((s.as_u16(), error_code(&v)), (status, code), "{what}: {v}");
        assert_eq!(state().await, before, "{what} changed something");
    }
    // Overlapping NAT networks: the second is refused.
    let (s, v) = call(
        &c,
        Method::POST,
        "/v1/networks",
        Some(json!({"name": "n1", "kind": "nat", "subnet": "10.214.0.0/24"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["gateway"], "10.214.0.1");
    let (s, v) = call(
        &c,
        Method::POST,
        "/v1/networks",
        Some(json!({"name": "n2", "kind": "nat", "subnet": "10.214.0.128/25"})),
    )
    .await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "subnet_overlap"), "{v}");
    assert_eq!(call(&c, Method::DELETE, "/v1/networks/n1", None).await.0, StatusCode::NO_CONTENT);
    // The console of a stopped VM is a clear 409, not an upgrade.
    let ws = websocket(&d, "/v1/vms/vm/console").await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::CONFLICT);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(error_code(&body), "wrong_state");
        }
        other => panic!("console of a stopped VM: {:?}", other.map(|_| ())),
    }
}

/// Opens a WebSocket over HTTPS with the admin token.
async fn websocket(d: &Daemon, path: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    common::websocket(d, path, &d.admin).await
}

/// Types `cmd` into the console and collects output until `until` shows.
async fn console_run(ws: &mut Ws, cmd: &str, until: &str) -> String {
    ws.send(Message::Binary(format!("{cmd}\n").into_bytes().into())).await.unwrap();
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.contains(until) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Text(t)))) => out.push_str(&t),
            Ok(Some(Ok(_))) => {}
            other => panic!("console ended waiting for {until:?} after {cmd:?}: {other:?}; got {out:?}"),
        }
    }
    out
}

/// Deletes a test's host interface even when an assertion fails.
struct DelLink(String);

impl Drop for DelLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// Removes the test's domain and network even when an assertion fails.
struct Cleanup(String, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        virsh(&["destroy", &self.0]);
        virsh(&["undefine", &self.0, "--snapshots-metadata"]);
        virsh(&["net-destroy", &self.1]);
        virsh(&["net-undefine", &self.1]);
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn real_guest_cloud_init_nat_console_snapshot() {
    let mut opts = Opts::test_driver(53);
    opts.uri = "qemu:///system".into();
    let d = Daemon::start("provision", opts);
    let c = d.admin();
    let (kernel, initrd) = common::install_guest(&d.data().join("boot"));
    let tag = std::process::id();
    let (vm_name, net) = (format!("prov-{tag}"), format!("ncnet{}", tag % 10_000));
    let _cleanup = Cleanup(vm_name.clone(), net.clone());
    let octet = 100 + tag % 100;
    let subnet = format!("10.215.{octet}.0/24");
    let (s, v) =
        call(&c, Method::POST, "/v1/networks", Some(json!({"name": net, "kind": "nat", "subnet": subnet})))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    let marker = format!("cidata-marker-{tag}");
    let spec = json!({
        "name": vm_name, "vcpus": 1, "memory_mib": 128, "network": net,
        "disks": [{"size_gib": 1}],
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 panic=-1 quiet"},
        "cloud_init": {"user_data": format!("#{marker}\nruncmd: []\n")}
    });
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let mac = vm["nics"][0]["mac"].as_str().unwrap().to_string();
    assert!(vm["cloud_init"].as_bool().unwrap());

    // A disk-only snapshot of the fresh, stopped VM.
    let (s, v) =
        call(&c, Method::POST, &format!("/v1/vms/{id}/snapshots"), Some(json!({"name": "clean"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    assert_eq!(call(&c, Method::POST, &format!("/v1/vms/{id}/start"), None).await.0, StatusCode::OK);
    // The guest mounts its cidata CD-ROM and prints the user-data's first
    // line; read through the console API.
    let log_path = format!("/v1/vms/{id}/console/log");
    let deadline = Instant::now() + Duration::from_secs(90);
    let ip = loop {
        let (_, bytes) = c.request(Method::GET, &log_path, None).await.unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        // The line can follow the shell's prompt: look for the tag anywhere.
        let ip = text
            .lines()
            .find_map(|l| l.split("NOVACRON-IP=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string);
        if text.contains(&format!("NOVACRON-CIDATA=#{marker}")) {
            if let Some(ip) = ip {
                break ip;
            }
        }
        assert!(Instant::now() < deadline, "no cidata marker and DHCP address on the console:\n{text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(ip.starts_with(&format!("10.215.{octet}.")), "address {ip} outside {subnet}");
    // The API reports the same address for the NIC.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await;
        if v["nics"][0]["ip"] == ip.as_str() {
            assert_eq!(v["nics"][0]["mac"], mac.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "API shows {} for the NIC, the guest has {ip}", v["nics"][0]);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Console round trip over the WebSocket: the answer is computed by the
    // guest's shell, so the echo of what we typed cannot fake it.
    let mut ws = websocket(&d, &format!("/v1/vms/{id}/console")).await.expect("console");
    let started = Instant::now();
    console_run(&mut ws, "echo $((40000+2))", "40002").await;
    eprintln!("console round trip: {:?}", started.elapsed());
    // Write a marker block to the disk from inside the guest.
    let out = console_run(
        &mut ws,
        "echo NCMARK-$((7*6)) > /dev/vda; sync; head -c 9 /dev/vda; echo; echo W-$((1+1))",
        "W-2",
    )
    .await;
    assert!(out.contains("NCMARK-42"), "marker not written: {out:?}");
    drop(ws);

    assert_eq!(call(&c, Method::POST, &format!("/v1/vms/{id}/stop"), None).await.0, StatusCode::OK);
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/snapshots/clean/revert"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "stopped");
    assert_eq!(call(&c, Method::POST, &format!("/v1/vms/{id}/start"), None).await.0, StatusCode::OK);
    let mut ws = websocket(&d, &format!("/v1/vms/{id}/console")).await.expect("console");
    // Wait for the shell to be up, then read the disk's first bytes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, bytes) = c.request(Method::GET, &log_path, None).await.unwrap();
        if String::from_utf8_lossy(&bytes).matches("NOVACRON-GUEST-UP").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "guest did not boot again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = console_run(&mut ws, "head -c 9 /dev/vda | od -c | head -1; echo R-$((2+3))", "R-5").await;
    assert!(!out.contains("N   C   M   A   R   K"), "the revert did not restore the disk: {out:?}");

    // Live disk changes, checked from inside the guest.
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/disks"), Some(json!({"size_gib": 1}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["disks"][1]["device"], "vdb");
    let (s, v) =
        call(&c, Method::POST, &format!("/v1/vms/{id}/disks/vda/resize"), Some(json!({"size_gib": 2}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // PCI hot-plug takes the TCG guest a moment: ask until it shows.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out =
            console_run(&mut ws, "cat /sys/block/vdb/size /sys/block/vda/size; echo S-$((3+4))", "S-7").await;
        if out.contains("2097152") && out.contains("4194304") {
            break;
        }
        assert!(Instant::now() < deadline, "guest does not see the new sizes: {out:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (s, v) = call(&c, Method::DELETE, &format!("/v1/vms/{id}/disks/vdb"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 1);

    // A memory snapshot of the running guest: revert resumes it with the
    // guest's RAM as it was (a shell variable set before the snapshot).
    console_run(&mut ws, "export NCV=before; echo V-$((5+5))", "V-10").await;
    let (s, v) = call(
        &c,
        Method::POST,
        &format!("/v1/vms/{id}/snapshots"),
        Some(json!({"name": "live", "memory": true})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["vm_state"], "running");
    console_run(&mut ws, "export NCV=after; echo V-$((6+6))", "V-12").await;
    drop(ws);
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/snapshots/live/revert"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("running")), "{v}");
    let mut ws = websocket(&d, &format!("/v1/vms/{id}/console")).await.expect("console");
    let out = console_run(&mut ws, "echo NCV=$NCV-$((7+7))", "-14").await;
    assert!(out.contains("NCV=before-14"), "memory was not restored: {out:?}");
    drop(ws);
    assert_eq!(
        call(&c, Method::DELETE, &format!("/v1/vms/{id}/snapshots/live"), None).await.0,
        StatusCode::NO_CONTENT
    );

    // The CLI's console with a pipe for stdin (what scripts do): it types
    // the input, shows the guest's answer and leaves.
    let out = Command::new(common::BIN)
        .args(["--socket"])
        .arg(&d.socket)
        .args(["vm", "console", &id])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"echo CLI-$((20+3))\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "vm console failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CLI-23"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A snapshot without memory of the running guest (QEMU saves the
    // memory anyway, and it says so): revert restores the disks only and
    // leaves the VM stopped.
    let (s, v) =
        call(&c, Method::POST, &format!("/v1/vms/{id}/snapshots"), Some(json!({"name": "disks"}))).await;
    assert_eq!((s, v["memory"].as_bool()), (StatusCode::CREATED, Some(true)), "{v}");
    assert_eq!(v["restores_memory"], false, "{v}");
    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/snapshots/disks/revert"), None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("stopped")), "{v}");
    assert!(virsh(&["domstate", &vm_name]).contains("shut off"));
    assert_eq!(
        call(&c, Method::DELETE, &format!("/v1/vms/{id}/snapshots/disks"), None).await.0,
        StatusCode::NO_CONTENT
    );

    let (_, snaps) = call(&c, Method::GET, &format!("/v1/vms/{id}/snapshots"), None).await;
    assert_eq!(snaps["snapshots"][0]["name"], "clean");
    assert_eq!(
        call(&c, Method::DELETE, &format!("/v1/vms/{id}/snapshots/clean"), None).await.0,
        StatusCode::NO_CONTENT
    );
    let (s, v) = call(&c, Method::DELETE, &format!("/v1/networks/{net}"), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "in_use"));
    assert_eq!(
        call(&c, Method::DELETE, &format!("/v1/vms/{id}?force=true"), None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&c, Method::DELETE, &format!("/v1/networks/{net}"), None).await.0,
        StatusCode::NO_CONTENT
    );
}

/// Events arrive in order with sequence numbers and resume after
/// Last-Event-ID.
#[tokio::test(flavor = "multi_thread")]
async fn events_stream_and_resume() {
    let d = Daemon::start("events", Opts::test_driver(54));
    let c = d.admin();
    assert_eq!(
        call(&c, Method::POST, "/v1/vms", Some(json!({"name": "e", "vcpus": 1, "memory_mib": 64}))).await.0,
        StatusCode::CREATED
    );
    assert_eq!(call(&c, Method::POST, "/v1/vms/e/start", None).await.0, StatusCode::OK);
    let read = |after: u64| common::read_events(&d, after);
    let all = read(0);
    let ids: Vec<u64> = all.lines().filter_map(|l| l.strip_prefix("id: ")?.parse().ok()).collect();
    assert!(ids.len() >= 4, "too few events: {all}");
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "sequence has gaps: {ids:?}");
    assert!(all.contains("event: operation.started") && all.contains("event: operation.finished"));
    assert!(all.contains("event: vm.state") && all.contains("\"state\":\"running\""), "{all}");
    let resumed = read(ids[ids.len() - 2]);
    let again: Vec<u64> = resumed.lines().filter_map(|l| l.strip_prefix("id: ")?.parse().ok()).collect();
    assert_eq!(again, vec![ids[ids.len() - 1]], "resume must start right after Last-Event-ID");
}

/// A NAT network may not shadow a network this host already routes to.
#[tokio::test(flavor = "multi_thread")]
async fn nat_network_never_shadows_a_host_route() {
    // A route of our own, on an empty bridge (no traffic leaves it), so
    // the test does not depend on what networks this host happens to have.
    let dev = format!("ncrt{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap().success();
    assert!(ip(&["link", "add", &dev, "type", "bridge"]), "cannot create a test bridge");
    let _del = DelLink(dev.clone());
    assert!(ip(&["addr", "add", "10.217.40.1/24", "dev", &dev]) && ip(&["link", "set", &dev, "up"]));
    let d = Daemon::start("routes", Opts::test_driver(55));
    for subnet in ["10.217.40.0/24", "10.217.0.0/16", "10.217.40.128/25"] {
        let (s, v) = call(
            &d.admin(),
            Method::POST,
            "/v1/networks",
            Some(json!({"name": "n", "kind": "nat", "subnet": subnet})),
        )
        .await;
        assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "subnet_overlap"), "{subnet}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(&dev), "{v}");
    }
    let (s, v) = call(
        &d.admin(),
        Method::POST,
        "/v1/networks",
        Some(json!({"name": "n", "kind": "nat", "subnet": "10.217.41.0/24"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "a neighbouring subnet is fine: {v}");
}

/// Bridge networks join an existing host bridge; a VLAN tag is refused when
/// the bridge cannot enforce it.
#[tokio::test(flavor = "multi_thread")]
async fn bridge_network_on_a_host_bridge() {
    let br = format!("ncbr{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap().success();
    assert!(ip(&["link", "add", &br, "type", "bridge"]), "cannot create a test bridge");
    let _del = DelLink(br.clone());
    let d = Daemon::start("bridge", Opts::test_driver(56));
    let c = d.admin();
    let filtering = std::fs::read_to_string(format!("/sys/class/net/{br}/bridge/vlan_filtering"))
        .map(|v| v.trim() == "1")
        .unwrap_or(false);
    let (s, v) = call(
        &c,
        Method::POST,
        "/v1/networks",
        Some(json!({"name": "shop", "kind": "bridge", "bridge": br, "vlan": 20})),
    )
    .await;
    if filtering {
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(call(&c, Method::DELETE, "/v1/networks/shop", None).await.0, StatusCode::NO_CONTENT);
    } else {
        assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("vlan_filtering"), "{v}");
    }
    let (s, v) =
        call(&c, Method::POST, "/v1/networks", Some(json!({"name": "shop", "kind": "bridge", "bridge": br})))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!((v["kind"].as_str(), v["bridge"].as_str()), (Some("bridge"), Some(br.as_str())));
    let spec = json!({"name": "till", "vcpus": 1, "memory_mib": 64, "network": "shop"});
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let mac = vm["nics"][0]["mac"].as_str().unwrap();
    assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
    // The MAC survives a restart of the VM (it is part of the stored spec).
    assert_eq!(call(&c, Method::POST, "/v1/vms/till/start", None).await.0, StatusCode::OK);
    assert_eq!(call(&c, Method::POST, "/v1/vms/till/stop", None).await.0, StatusCode::OK);
    assert_eq!(call(&c, Method::POST, "/v1/vms/till/start", None).await.0, StatusCode::OK);
    assert_eq!(call(&c, Method::GET, "/v1/vms/till", None).await.1["nics"][0]["mac"], mac);
    let (s, v) = call(&c, Method::POST, "/v1/vms/till/clone", Some(json!({"name": "till2"}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "wrong_state"));
    assert_eq!(call(&c, Method::POST, "/v1/vms/till/stop", None).await.0, StatusCode::OK);
    let (s, clone) =
        call(&c, Method::POST, "/v1/vms/till/clone", Some(json!({"name": "till2", "copy": true}))).await;
    assert_eq!(s, StatusCode::CREATED, "{clone}");
    assert_ne!(clone["nics"][0]["mac"], mac, "a clone needs its own MAC");
    assert_eq!(clone["nics"][0]["network"], "shop");
}
