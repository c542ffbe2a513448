//! Backup and restore of a node: back up while the daemon runs, wipe the
//! data dir, restore, start again: every VM and token is back.

mod common;

use common::{call, Daemon, Opts};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::process::Command;

/// The CLI with the daemon's config file, as `backup` reads it.
fn cli(d: &Daemon, args: &[&str]) -> common::Run {
    let config = d.config.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--config", config.as_str()]);
    common::cli(d, &all)
}

fn names(v: &Value, list: &str) -> Vec<String> {
    let mut n: Vec<String> =
        v[list].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect();
    n.sort();
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_wipe_restore() {
    let mut d = Daemon::start("backup", Opts::test_driver(61));
    let admin = d.admin();
    for name in ["b1", "b2", "b3"] {
        let spec = json!({"name": name, "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}]});
        let (s, v) = call(&admin, Method::POST, "/v1/vms", Some(spec)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, v) = call(&admin, Method::POST, "/v1/vms/b2/start", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) =
        call(&admin, Method::POST, "/v1/tokens", Some(json!({"name": "ops", "role": "operator"}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let ops_secret = v["secret"].as_str().unwrap().to_string();
    let (_, vms_before) = call(&admin, Method::GET, "/v1/vms", None).await;
    let (_, tokens_before) = call(&admin, Method::GET, "/v1/tokens", None).await;

    let archive = d.dir.join("node.tar");
    let archive_s = archive.to_str().unwrap();
    // A running guest's disk is not copied without pausing it.
    let r = cli(&d, &["backup", "create", "--include-disks", archive_s]);
    assert_eq!(r.code, 4, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("b2"), "{}", r.stderr);
    assert!(!archive.exists());

    // Online: the daemon keeps running; b2 is paused for the copy only.
    let r = cli(&d, &["backup", "create", "--include-disks", "--pause-running", archive_s]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let (_, b2) = call(&admin, Method::GET, "/v1/vms/b2", None).await;
    assert_eq!(b2["state"], "running", "b2 is resumed after the copy");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&archive).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the archive holds the TLS key");
    assert!(d.data().join("last-backup").is_file());
    let (_, metrics) = call(&admin, Method::GET, "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(!metrics.contains("novacron_last_backup_timestamp_seconds 0\n"), "{metrics}");

    // The manifest lists every file with its checksum.
    let list = Command::new("tar").arg("-tf").arg(&archive).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for f in ["manifest.json", "state.db", "config/novacron.toml", "tls/key.pem", "tls/cert.pem"] {
        assert!(list.lines().any(|l| l == f), "{f} missing from:\n{list}");
    }
    assert_eq!(list.lines().filter(|l| l.starts_with("disks/")).count(), 3, "{list}");

    // Not over a data dir in use, nor under a running daemon.
    let r = cli(&d, &["backup", "restore", archive_s]);
    assert_eq!(r.code, 4, "{}{}", r.stdout, r.stderr);

    d.kill9();
    let r = cli(&d, &["backup", "restore", archive_s]);
    assert_eq!(r.code, 4, "restore over a non-empty data dir: {}{}", r.stdout, r.stderr);
    std::fs::remove_dir_all(d.data()).unwrap();

    // A damaged archive is refused before anything is written.
    let bad = d.dir.join("bad.tar");
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes.windows(8).position(|w| w == b"SQLite f").expect("database in the archive") + 200;
    bytes[at] ^= 0xff;
    std::fs::write(&bad, &bytes).unwrap();
    let r = cli(&d, &["backup", "restore", bad.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("checksum"), "{}", r.stderr);
    assert!(!d.data().join("state.db").exists());

    let r = cli(&d, &["backup", "restore", archive_s]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let db = d.data().join("state.db");
    assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(d.data().join("tls/key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
    }

    d.restart();
    // The same certificate (the pinned fingerprint still matches) and the
    // same admin token.
    let admin = d.admin();
    let (s, vms_after) = call(&admin, Method::GET, "/v1/vms", None).await;
    assert_eq!(s, StatusCode::OK, "{vms_after}");
    assert_eq!(names(&vms_after, "vms"), names(&vms_before, "vms"));
    let ids = |v: &Value| {
        let mut ids: Vec<String> =
            v["vms"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&vms_after), ids(&vms_before));
    let (_, tokens_after) = call(&admin, Method::GET, "/v1/tokens", None).await;
    assert_eq!(tokens_after, tokens_before);
    let ops = d.https(Some(&ops_secret));
    let (s, _) = call(&ops, Method::GET, "/v1/vms/b1", None).await;
    assert_eq!(s, StatusCode::OK, "the operator token authenticates after the restore");
    for vm in vms_before["vms"].as_array().unwrap() {
        for disk in vm["disks"].as_array().unwrap() {
            let p = disk["path"].as_str().unwrap();
            assert!(std::path::Path::new(p).is_file(), "disk {p} restored");
        }
    }
}

/// `novacron health --json` over the socket: (exit code, the `files` check).
/// The `files` check and the exit code it alone calls for. The command's own
/// exit code follows the worst check, and the `disk` check reads the real
/// host (a test machine filled by builds warns), so that is asserted apart.
fn files_check(d: &Daemon) -> (i32, Value) {
    let r = common::cli(d, &["health", "--json"]);
    let report: Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("{}{}", r.stdout, r.stderr));
    let code = |s: &Value| match s.as_str() {
        Some("ok") => 0,
        Some("warning") => 1,
        Some("critical") => 2,
        _ => panic!("unknown status {s} in {report}"),
    };
    assert_eq!(r.code, code(&report["status"]), "the exit code follows the worst check: {report}");
    let check = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "files").cloned();
    let check = check.unwrap_or_else(|| panic!("no files check in {report}"));
    (code(&check["status"]), check)
}

/// A restore into another data dir (another node) brings the paths along:
/// disks, base images, kernels and image files all point into the new data
/// dir, not at the old node's. Health then notices files that go missing.
#[tokio::test(flavor = "multi_thread")]
async fn restore_elsewhere_rewrites_paths_and_health_sees_missing_files() {
    let mut from = Daemon::start("backup-from", Opts::test_driver(63));
    let c = from.admin();
    let import = from.dir.join("import");
    std::fs::create_dir_all(&import).unwrap();
    for img in ["base", "spare"] {
        let file = import.join(format!("{img}.qcow2"));
        let st =
            Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&file).arg("64M").status();
        assert!(st.unwrap().success());
        let body = json!({"name": img, "path": file});
        let (s, v) = call(&c, Method::POST, "/v1/images", Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    std::fs::write(from.data().join("boot/vmlinuz-test"), b"not booted on the test driver").unwrap();
    let spec = json!({"name": "r1", "vcpus": 1, "memory_mib": 64,
        "disks": [{"image": "base"}, {"size_gib": 1}], "boot": {"kernel": "vmlinuz-test"}});
    let (s, v) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let archive = from.dir.join("node.tar");
    let r = cli(&from, &["backup", "create", "--include-disks", archive.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // The other node: a fresh daemon, stopped, its data dir emptied.
    let mut to = Daemon::start("backup-to", Opts::test_driver(64));
    to.kill9();
    std::fs::remove_dir_all(to.data()).unwrap();
    let r = cli(&to, &["backup", "restore", archive.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(&format!("now point into {}", to.data().display())), "{}", r.stdout);
    // The old node is gone.
    from.kill9();
    std::fs::remove_dir_all(from.data()).unwrap();

    to.restart();
    let local = to.local();
    let (s, vm) = call(&local, Method::GET, "/v1/vms/r1", None).await;
    assert_eq!(s, StatusCode::OK, "{vm}");
    let inside = |p: &Value| p.as_str().is_some_and(|p| p.starts_with(&to.data().display().to_string()));
    for d in vm["disks"].as_array().unwrap() {
        assert!(inside(&d["path"]), "{vm}");
        assert!(std::path::Path::new(d["path"].as_str().unwrap()).is_file(), "{vm}");
    }
    assert!(inside(&vm["disks"][0]["image"]), "{vm}");
    assert!(inside(&vm["boot"]["kernel"]), "{vm}");
    let (code, files) = files_check(&to);
    assert_eq!((code, files["status"].as_str()), (0, Some("ok")), "{files}");
    let (s, v) = call(&local, Method::POST, "/v1/vms/r1/start", None).await;
    assert_eq!(s, StatusCode::OK, "the restored VM starts: {v}");
    assert_eq!(call(&local, Method::POST, "/v1/vms/r1/stop", None).await.0, StatusCode::OK);

    // An image file gone: a warning; a VM's disk gone: critical.
    std::fs::remove_file(to.data().join("images/spare")).unwrap();
    let (code, files) = files_check(&to);
    assert_eq!((code, files["status"].as_str()), (1, Some("warning")), "{files}");
    assert!(files["message"].as_str().unwrap().contains("image spare"), "{files}");
    std::fs::remove_file(vm["disks"][1]["path"].as_str().unwrap()).unwrap();
    let (code, files) = files_check(&to);
    assert_eq!((code, files["status"].as_str()), (2, Some("critical")), "{files}");
    assert!(files["message"].as_str().unwrap().contains("VM r1 disk vdb"), "{files}");
}
