//! The systemd integration: the units pass `systemd-analyze verify`, the
//! daemon's unit rates "OK" in `systemd-analyze security`, sysusers.d and
//! tmpfiles.d entries apply, SIGHUP reloads the configuration without
//! touching guests, and SIGTERM stops only the daemon.

mod common;

use common::{call, Daemon, Opts, BIN};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Highest `systemd-analyze security` exposure accepted ("OK" is < 4.0;
/// the appliance promises 2.5 or better).
const MAX_EXPOSURE: f64 = 2.5;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn systemd_analyze(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("systemd-analyze is missing: run tests/setup-host.sh (package systemd)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Copies of the units with `/usr/bin/novacron` pointing at the binary
/// under test (verify checks that every Exec*= binary exists).
fn unit_copies(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("novacron-units-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for unit in UNITS {
        let text = std::fs::read_to_string(repo("systemd").join(unit)).unwrap();
        let text = text.replace("/usr/bin/novacron ", &format!("{BIN} "));
        let text = text.replace("/usr/bin/novacron\n", &format!("{BIN}\n"));
        std::fs::write(dir.join(unit), text).unwrap();
    }
    dir
}

/// Every unit in systemd/.
const UNITS: [&str; 10] = [
    "novacron.service",
    "novacron-dataplane.service",
    "novacron-dataplane.path",
    "novacron-setup.service",
    "novacron-firstboot.service",
    "novacron-update.path",
    "novacron-update.service",
    "novacron-reboot.path",
    "novacron-reboot.service",
    "novacron-boot-check.service",
];

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = unit_copies("verify");
    let listed: Vec<String> = std::fs::read_dir(repo("systemd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".service") || n.ends_with(".path"))
        .collect();
    for n in &listed {
        assert!(UNITS.contains(&n.as_str()), "{n} is not in UNITS");
    }
    let mut args = vec!["verify"];
    args.extend(UNITS);
    let (ok, out) = systemd_analyze(&args, &dir);
    assert!(ok, "systemd-analyze verify failed:\n{out}");
    // verify exits 0 on some warnings; none are acceptable here.
    assert!(out.trim().is_empty(), "systemd-analyze verify complained:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn service_exposure_is_ok() {
    let dir = unit_copies("security");
    let (ok, out) = systemd_analyze(&["security", "--offline=yes", "--no-pager", "novacron.service"], &dir);
    assert!(ok, "systemd-analyze security failed:\n{out}");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for novacron.service:"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    eprintln!("{line}");
    assert!(score <= MAX_EXPOSURE, "exposure {score} > {MAX_EXPOSURE}:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The unit's text; fails unless it has each of `lines`.
fn unit_with(name: &str, lines: &[&str]) -> String {
    let unit = std::fs::read_to_string(repo("systemd").join(name)).unwrap();
    for line in lines {
        assert!(unit.lines().any(|x| x.trim() == *line), "{name} lacks {line:?}");
    }
    unit
}

#[test]
fn service_keeps_guests_and_runs_unprivileged() {
    let unit = unit_with(
        "novacron.service",
        &[
            "Type=notify",
            "KillMode=mixed",
            "User=novacron",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
        ],
    );
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
    assert!(unit.lines().any(|l| l.starts_with("SystemCallFilter=@system-service")));
    // KillMode=control-group or process would be wrong in both directions.
    assert!(!unit.lines().any(|l| l.starts_with("KillMode=") && l.trim() != "KillMode=mixed"));
}

#[test]
fn dataplane_outlives_the_api_daemon() {
    let unit = unit_with(
        "novacron-dataplane.service",
        &[
            "Type=notify",
            "Restart=always",
            "StartLimitIntervalSec=0",
            "ExecStart=/usr/bin/novacron dataplane --config /var/lib/novacron/dataplane.json",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ],
    );
    // Tied to the API daemon, a restart of it would stall every guest disk.
    for tie in ["PartOf=", "BindsTo=", "Requisite=", "Requires="] {
        assert!(!unit.lines().any(|l| l.starts_with(tie)), "novacron-dataplane.service has {tie}");
    }
    // The disks live under /var/lib/novacron: it must stay writable.
    assert!(!unit.lines().any(|l| l == "ProtectSystem=strict" || l.starts_with("ReadOnlyPaths=")));
    // It replicates over TCP to the peer's data plane and logs to journald.
    assert!(!unit.lines().any(|l| l == "PrivateNetwork=yes"), "a private network cuts replication");
    assert!(unit.lines().any(|l| l == "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"));
    unit_with("novacron-dataplane.path", &["PathExists=/var/lib/novacron/dataplane.json"]);
}

#[test]
fn sysusers_and_tmpfiles_apply() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = std::env::temp_dir().join(format!("novacron-sysroot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let st = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg(repo("systemd/sysusers.d/novacron.conf"))
        .status()
        .expect("systemd-sysusers");
    assert!(st.success());
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd.lines().find(|l| l.starts_with("novacron:")).expect("user novacron");
    assert!(user.ends_with(":/var/lib/novacron:/usr/sbin/nologin"), "{user}");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    for g in ["libvirt", "kvm", "libvirt-qemu"] {
        let line = group.lines().find(|l| l.starts_with(&format!("{g}:"))).unwrap();
        assert!(line.rsplit(':').next().unwrap().split(',').any(|m| m == "novacron"), "{line}");
    }
    let st = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.display()))
        .arg("--create")
        .arg(repo("systemd/tmpfiles.d/novacron.conf"))
        .status()
        .expect("systemd-tmpfiles");
    assert!(st.success());
    for (dir, mode) in [
        ("var/lib/novacron", 0o711),
        ("var/lib/novacron/disks", 0o711),
        ("var/lib/novacron/boot", 0o755),
        ("var/lib/novacron/images", 0o711),
        ("var/lib/novacron/tls", 0o700),
        ("run/novacron", 0o750),
        ("etc/novacron", 0o750),
    ] {
        let meta = std::fs::metadata(root.join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir}");
        if dir != "etc/novacron" && nix::unistd::geteuid().is_root() {
            assert_eq!(meta.uid(), uid, "{dir} owner");
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

fn signal(d: &Daemon, sig: &str) {
    assert!(Command::new("kill").args([sig, &d.pid().to_string()]).status().unwrap().success());
}

fn is_alive(pid: u32) -> bool {
    // A dead child stays a zombie until reaped: look at its state too.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

fn wait_for_log(d: &Daemon, what: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if d.log().matches(what).count() >= count {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no {what:?} (x{count}) in the log:\n{}", d.log());
}

async fn burst(d: &Daemon, n: usize) -> usize {
    let c = d.admin();
    let mut limited = 0;
    for _ in 0..n {
        let (s, _) = call(&c, Method::GET, "/v1/vms", None).await;
        assert!(s == StatusCode::OK || s == StatusCode::TOO_MANY_REQUESTS, "{s}");
        limited += usize::from(s == StatusCode::TOO_MANY_REQUESTS);
    }
    limited
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_config_and_keeps_guests() {
    let d = Daemon::start("reload", Opts::test_driver(71));
    let pid = d.pid();
    let c = d.admin();
    let (s, v) = call(
        &c,
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "keep", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = call(&c, Method::POST, "/v1/vms/keep/start", None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("running")), "{v}");
    assert_eq!(burst(&d, 20).await, 0, "rate limiting starts off");

    // Rate limit 5/s, log level down to info, and a listen address (which
    // needs a restart: warned about, not applied).
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let new = cfg
        .replace("rate_limit_per_sec = 0\n", "rate_limit_per_sec = 5\n")
        .replace("rate_limit_burst = 0\n", "rate_limit_burst = 5\n")
        .replace("level = \"info,novacron=debug\"", "level = \"info\"")
        .replace(&format!(":{}\"]", common::api_port()), &format!(":{}\"]", common::api_port() + 1));
    assert_ne!(cfg, new);
    std::fs::write(&d.config, &new).unwrap();
    signal(&d, "-HUP");
    wait_for_log(&d, "configuration reloaded", 1);
    let log = d.log();
    assert!(log.contains("api.listen"), "restart-only change not named:\n{log}");
    let debug_lines = d.log().matches("DEBUG").count();

    let limited = burst(&d, 30).await;
    assert!(limited >= 5, "only {limited} of 30 requests were limited at 5/s");
    assert_eq!(d.log().matches("DEBUG").count(), debug_lines, "log level not applied");
    assert!(is_alive(pid), "daemon died");
    assert_eq!(d.pid(), pid);
    let (s, v) = call(&d.local(), Method::GET, "/v1/vms/keep", None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("running")), "{v}");
    assert_eq!(d.log().matches(" serving").count(), 1, "the daemon restarted:\n{}", d.log());

    // A broken file is logged and ignored: the old limits stay.
    std::fs::write(&d.config, new.replace("[hypervisor]", "[hypervisor]\nno_such_key = 1")).unwrap();
    signal(&d, "-HUP");
    wait_for_log(&d, "configuration not reloaded", 1);
    assert!(is_alive(pid), "daemon died on a bad config");
    let (s, v) = call(&d.local(), Method::GET, "/v1/vms/keep", None).await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("running")), "{v}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(burst(&d, 30).await >= 5, "the old limits no longer apply");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_only_the_daemon() {
    let mut d = Daemon::start("sigterm", Opts::test_driver(72));
    let c = d.admin();
    let (s, v) = call(
        &c,
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "stay", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = call(&c, Method::POST, "/v1/vms/stay/start", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let before = d.log().len();
    let started = Instant::now();
    let status = d.terminate(Duration::from_secs(5)).expect("daemon still running 5 s after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let tail = d.log()[before..].to_string();
    assert!(tail.contains("guests keep running"), "{tail}");
    // Nothing on the way out touched a domain.
    for op in ["vm.stop", "vm.shutdown", "destroy"] {
        assert!(!tail.contains(op), "{op} during shutdown:\n{tail}");
    }
}
