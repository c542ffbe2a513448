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

/// Runs the CLI against `d`'s socket with stdout on a pipe whose reader is
/// already gone, as `novacron ... | head -1` ends up once head has exited.
fn cli_closed_stdout(d: &Daemon, args: &[&str]) -> common::Run {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out =
        common::cli_command(d, args).stdout(writer).stderr(std::process::Stdio::piped()).output().unwrap();
    common::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn closed_stdout_keeps_the_exit_code_and_stays_quiet() {
    let d = Daemon::start("cli-pipe", Opts::test_driver(42));
    for i in 0..3 {
        let r = cli(&d, &["vm", "create", "--name", &format!("p{i}"), "--memory", "64"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // What each command exits with when its output is read.
    let health = cli(&d, &["health"]).code;
    assert!((0..=2).contains(&health), "health exits 0/1/2, not {health}");
    for (args, code) in [
        (&["vm", "list"][..], 0),
        (&["--json", "vm", "list"], 0),
        (&["vm", "show", "p1"], 0),
        (&["--json", "vm", "show", "nope"], 3),
        (&["health"], health),
        (&["--json", "health"], health),
        (&["status"], 0),
        (&["config", "default"], 0),
    ] {
        let r = cli_closed_stdout(&d, args);
        assert_eq!(r.code, code, "{args:?} with a closed stdout: {}", r.stderr);
        assert!(r.stderr.is_empty(), "{args:?} with a closed stdout must say nothing: {}", r.stderr);
    }

    // A stdout that fails for real (full disk) is an error, said once.
    let full = common::cli_command(&d, &["vm", "list"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("cannot write to stdout").count(), 1, "{err}");

    // The daemon's log is a file here: no terminal colour codes in it.
    let log = d.log();
    assert!(log.contains("serving"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escapes in a log that is not a terminal:\n{log}");
}

#[test]
fn invalid_values_not_found_and_tokens_on_the_socket() {
    let d = Daemon::start("cli-codes", Opts::test_driver(43));
    let r = cli(&d, &["vm", "create", "--name", "v", "--memory", "64", "--disk", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // A value refused by the daemon and one refused by the argument parser
    // are the same kind of mistake: exit 2.
    let r = cli(&d, &["vm", "disk", "attach", "v", "--size", "0"]);
    assert_eq!(r.code, 2, "--size 0: {}", r.stderr);
    assert!(r.stderr.contains("invalid_value"), "{}", r.stderr);
    assert_eq!(cli(&d, &["vm", "disk", "attach", "v", "--size", "0.2"]).code, 2, "--size 0.2");
    assert_eq!(cli(&d, &["vm", "create", "--name", "w", "--disk", "0"]).code, 2, "--disk 0");

    // Shrinking is refused in the unit the user gave.
    let r = cli(&d, &["vm", "disk", "resize", "v", "vda", "--size", "1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("vda is already 1 GiB"), "{}", r.stderr);
    assert!(!r.stderr.contains("1073741824"), "{}", r.stderr);

    // A network that does not exist is not found, like a VM or an image.
    let r = cli(&d, &["vm", "create", "--name", "w", "--memory", "64", "--network", "nope"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("network \"nope\" not found"), "{}", r.stderr);
    assert_eq!(cli(&d, &["vm", "show", "w"]).code, 3, "nothing created");

    // The subnet rule the message states is the one that is checked
    // (docs/provisioning.md: /16 to /30).
    let r = cli(&d, &["network", "create", "--name", "big", "--nat", "--subnet", "172.16.0.0/12"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("/16 to /30"), "{}", r.stderr);
    let r = cli(&d, &["network", "create", "--name", "tiny", "--nat", "--subnet", "10.99.0.0/31"]);
    assert!(r.code == 2 && r.stderr.contains("/16 to /30"), "{}", r.stderr);

    // A fingerprint that cannot be a SHA-256 is a usage error, not an
    // unreachable daemon.
    let out =
        Command::new(BIN).args(["--url", &d.url, "--fingerprint", "AB:CD", "vm", "list"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--fingerprint") && !err.contains("cannot connect"), "{err}");
    let last = if d.fingerprint.ends_with("00") { "01" } else { "00" };
    let wrong = format!("{}{last}", &d.fingerprint[..d.fingerprint.len() - 2]);
    let out =
        Command::new(BIN).args(["--url", &d.url, "--fingerprint", &wrong, "vm", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(6), "a well-formed pin that does not match: no connection");

    // A user other than root in the socket's group uses the socket with a
    // token (--token or NOVACRON_TOKEN), as over HTTPS.
    let r = cli(&d, &["token", "create", "--name", "local", "--role", "viewer"]);
    let secret = r.stdout.lines().find(|l| l.starts_with("nct_")).expect("secret printed").to_string();
    const NOBODY: u32 = 65534;
    std::os::unix::fs::chown(&d.socket, None, Some(NOBODY)).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "--socket"])
            .arg(&d.socket)
            .args(args)
            .env_remove("NOVACRON_TOKEN")
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(as_nobody(&["vm", "list"]).0, 5, "no token, not root: refused");
    let (code, out) = as_nobody(&["--token", &secret, "vm", "list"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("v "), "{out}");
    assert_eq!(as_nobody(&["--token", &secret, "vm", "start", "v"]).0, 5, "a viewer token stays a viewer");
}

/// Ends a daemon started by hand in a test, even when an assertion fails.
struct Killer(std::process::Child);

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// README's first steps: `serve --dev` (stdout not a terminal, as under
/// `| tee` or over ssh without a tty), then the CLI next to it.
#[test]
fn dev_daemon_prints_what_readme_promises() {
    use std::io::{BufRead, BufReader};
    let dir = common::scratch_dir("cli-dev");
    let addr = format!("127.0.0.44:{}", common::api_port());
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &addr, "--libvirt-uri", "test:///default"])
        .current_dir(&dir)
        .env_remove("NOVACRON_PRINT_TOKEN")
        .env_remove("JOURNAL_STREAM")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _daemon = Killer(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    while !printed.iter().any(|l: &String| l.contains("NOVACRON_SOCKET=")) {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) => printed.push(line),
            Err(_) => panic!(
                "serve --dev printed only {printed:?}; log:\n{}",
                std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
            ),
        }
    }
    let text = printed.join("\n");
    let value = |key: &str| {
        printed
            .iter()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
    };
    assert_eq!(value("API:"), format!("https://{addr}"), "{text}");
    let fingerprint = value("fingerprint:");
    let token = value("admin token:");
    assert!(token.starts_with("nct_"), "{text}");
    let data = dir.join("novacron-dev");
    let token_file = data.join("initial-admin-token");
    assert!(text.contains(&token_file.display().to_string()), "where the token file is: {text}");
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    let socket = data.join("novacron.sock");
    assert!(text.contains(&format!("export NOVACRON_SOCKET={}", socket.display())), "{text}");

    // The printed fingerprint and token work for remote use.
    let out = Command::new(BIN)
        .args([
            "--url",
            &format!("https://{addr}"),
            "--fingerprint",
            &fingerprint,
            "--token",
            &token,
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&fingerprint));

    // README's backup example, next to the dev daemon.
    let archive = dir.join("node.tar");
    let out = Command::new(BIN)
        .args(["backup", "create", "--dev"])
        .arg(&archive)
        .current_dir(&dir)
        .env("NOVACRON_SOCKET", &socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&archive).unwrap().len() > 0);
    // A data dir that is not a node's says how to name the dev daemon's.
    let out = Command::new(BIN)
        .args(["backup", "create", "--data-dir", dir.to_str().unwrap()])
        .arg(dir.join("none.tar"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--dev"), "{err}");

    // Without NOVACRON_SOCKET, the CLI says where a dev daemon's socket is.
    let out = Command::new(BIN)
        .args(["--socket", dir.join("missing.sock").to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("NOVACRON_SOCKET") && err.contains("serve --dev"), "{err}");
    drop(_daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vm shutdown --wait S` with a real TCG guest that ignores the request:
/// booted with `acpi=off`, it never sees the power button.
#[test]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
fn shutdown_wait_fails_while_the_guest_keeps_running() {
    let mut opts = Opts::test_driver(45);
    opts.uri = "qemu:///system".into();
    let d = Daemon::start("cli-shutdown", opts);
    common::install_guest(&d.data().join("boot"));
    let name = format!("deaf-{}", std::process::id());
    struct Undefine(String);
    impl Drop for Undefine {
        fn drop(&mut self) {
            common::virsh(&["destroy", &self.0]);
            common::virsh(&["undefine", &self.0]);
        }
    }
    let _cleanup = Undefine(name.clone());
    let r = cli(
        &d,
        &[
            "vm",
            "create",
            "--name",
            &name,
            "--memory",
            "128",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initramfs.gz",
            "--cmdline",
            "console=ttyS0 panic=-1 quiet acpi=off",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(cli(&d, &["vm", "start", &name]).code, 0);
    common::wait_for("the guest's init on its console", 120, || {
        cli(&d, &["vm", "console-log", &name]).stdout.contains("NOVACRON-GUEST-UP")
    });

    let r = cli(&d, &["vm", "shutdown", &name, "--wait", "3"]);
    assert_eq!(r.code, 7, "a wait that ran out is exit 7:\n{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("still running 3 s after"), "{}", r.stderr);
    assert!(r.stdout.contains("shutting_down"), "{}", r.stdout);
    let r = cli(&d, &["--json", "vm", "shutdown", &name, "--wait", "1"]);
    assert_eq!(r.code, 7, "{}{}", r.stdout, r.stderr);
    let vm: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(vm["state"], "shutting_down", "{vm}");
    assert!(common::virsh(&["domstate", &name]).contains("running"));

    // Without --wait the request is only sent: that is not a failure.
    assert_eq!(cli(&d, &["vm", "shutdown", &name]).code, 0);
    // --timeout forces it off within the wait: success.
    let r = cli(&d, &["--json", "vm", "shutdown", &name, "--wait", "60", "--timeout", "2"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let vm: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(cli(&d, &["vm", "delete", &name]).code, 0);
}
