//! The CLI as scripts use it: real binary, real daemon, exit codes and
//! `--json` output.

mod common;

use common::{cli, Daemon, Opts, BIN};
use serde_json::Value;
use std::process::Command;

#[test]
fn cli_commands_and_exit_codes() {
    let d = Daemon::start("cli", Opts::test_driver(41));

    let r = cli(&d, &["status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains(&d.fingerprint), "status must print the fingerprint:\n{}", r.stdout);

    // An overlay disk on a base image from images/.
    let base = d.data().join("images").join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let r = cli(
        &d,
        &[
            "--json",
            "vm",
            "create",
            "--name",
            "app",
            "--memory",
            "64",
            "--disk",
            "2",
            "--disk",
            "image:base.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let vm: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(vm["disks"][1]["size_bytes"], 64 * 1024 * 1024);
    let overlay = vm["disks"][1]["path"].as_str().unwrap();
    let info = Command::new("qemu-img").args(["info", "--output=json", "-U", overlay]).output().unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"].as_str(), Some(base.to_str().unwrap()), "{info}");

    let r = cli(&d, &["vm", "list"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.starts_with("NAME") && r.stdout.contains("app") && r.stdout.contains("stopped"),
        "{}",
        r.stdout
    );

    assert_eq!(cli(&d, &["vm", "start", "app"]).code, 0);
    let r = cli(&d, &["vm", "start", "app"]);
    assert_eq!(r.code, 4, "wrong state is exit 4: {}", r.stderr);
    assert!(r.stderr.contains("wrong_state"), "{}", r.stderr);
    let r = cli(&d, &["--json", "vm", "delete", "app"]);
    assert_eq!(r.code, 4);
    let err: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(err["error"]["code"], "wrong_state");
    assert_eq!(cli(&d, &["vm", "show", "nope"]).code, 3, "not found is exit 3");
    assert_eq!(cli(&d, &["vm", "delete", "app", "--force"]).code, 0);
    assert!(!std::path::Path::new(overlay).exists());
    assert!(base.exists(), "deleting a VM must never delete its base image");

    let r = cli(&d, &["token", "create", "--name", "robot", "--role", "viewer"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let secret = r.stdout.lines().find(|l| l.starts_with("nct_")).expect("secret printed").to_string();
    let r = cli(&d, &["token", "list"]);
    assert!(r.stdout.contains("robot") && !r.stdout.contains(&secret[10..]), "{}", r.stdout);

    // Remote use with the token: viewer may list, not create.
    let remote = |token: &str, args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--url", &d.url, "--token", token, "--fingerprint", &d.fingerprint])
            .args(args)
            .output()
            .unwrap();
        out.status.code().unwrap_or(-1)
    };
    assert_eq!(remote(&secret, &["vm", "list"]), 0);
    assert_eq!(remote(&secret, &["vm", "create", "--name", "x", "--memory", "64"]), 5);
    assert_eq!(remote("nct_bad_token", &["vm", "list"]), 5);
    assert_eq!(cli(&d, &["token", "revoke", "robot"]).code, 0);
    assert_eq!(remote(&secret, &["vm", "list"]), 5, "revoked token still works");

    let gone = Command::new(BIN).args(["--socket", "/nonexistent.sock", "vm", "list"]).output().unwrap();
    assert_eq!(gone.status.code(), Some(6), "unreachable daemon is exit 6");
    let usage = Command::new(BIN).args(["vm", "create"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let no_trust = Command::new(BIN)
        .args(["--url", &d.url, "vm", "list"])
        .env_remove("NOVACRON_FINGERPRINT")
        .output()
        .unwrap();
    assert_eq!(no_trust.status.code(), Some(2), "remote use without a pin must refuse");
}

#[test]
fn config_check() {
    let dir = common::scratch_dir("config");
    let good = dir.join("good.toml");
    let out = Command::new(BIN).args(["config", "default"]).output().unwrap();
    std::fs::write(&good, &out.stdout).unwrap();
    assert!(Command::new(BIN).args(["config", "check"]).arg(&good).status().unwrap().success());
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[api]\nlisten_on = []\n").unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_on"));
    let _ = std::fs::remove_dir_all(dir);
}
