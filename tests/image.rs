//! The appliance image boots, seeds itself, updates and rolls back.
//!
//! `rootfs_boots_in_nspawn_and_serves_health` (quick): `image/build.sh
//! --rootfs-only` builds (or reuses) the Debian rootfs with the binary under
//! test and `systemd-nspawn -b` boots it with systemd as PID 1: the seed on
//! a stand-in ESP is applied, the enabled `novacron.service` answers
//! `/v1/health`, and the container's journal holds the daemon's structured
//! fields. The rootfs runs on a tmpfs overlay (`--volatile=overlay`).
//!
//! `raw_image_boots_updates_and_rolls_back` (the real thing): the flashable
//! raw image boots under QEMU (TCG) with OVMF (UEFI) and systemd-boot, a
//! seed written onto its ESP is honoured, the first-boot banner shows on the
//! serial console, an A/B update to a second build boots slot B and is
//! marked good, and a deliberately broken build rolls back by itself, with
//! a running guest shut down and started again around each reboot.
//!
//! Both share one build directory (one package cache) and run one at a time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The image tests build into the same directory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// 127.0.0.88 is not used by any other test; the container shares the host's
/// network namespace (no veth, no bridge), so loopback reaches it.
const LISTEN: &str = "127.0.0.88:8443";

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Build output shared by the image tests (its own base cache, so a manual
/// `bash image/build.sh` into target/image never replaces what is booted).
fn out_dir() -> PathBuf {
    repo("target/image-test")
}

/// Runs image/build.sh with the binary under test unless `envs` says otherwise.
fn build(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(repo("image/build.sh"))
        .args(args)
        .arg(out_dir())
        .env("NOVACRON_BIN", env!("CARGO_BIN_EXE_novacron"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("bash");
    assert!(
        out.status.success(),
        "image/build.sh {args:?} failed (run tests/setup-host.sh for debootstrap & co):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Container {
    child: Child,
    scratch: PathBuf,
}

impl Container {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.scratch.join("console.log")).unwrap_or_default()
    }

    /// SIGTERM makes nspawn ask the container's systemd for an orderly
    /// shutdown; SIGKILL if it does not finish in time.
    fn poweroff(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.running() {
            self.poweroff();
        }
    }
}

fn journal(dir: &Path) -> String {
    let out = Command::new("journalctl")
        .arg("-D")
        .arg(dir)
        .args(["-u", "novacron.service", "-o", "json", "--no-pager"])
        .output()
        .expect("journalctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn health() -> Option<String> {
    let out = Command::new("curl")
        .args(["-ksS", "--max-time", "3", "-w", "\n%{http_code}"])
        .arg(format!("https://{LISTEN}/v1/health"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.trim_end().ends_with("\n200").then_some(text)
}

#[test]
fn rootfs_boots_in_nspawn_and_serves_health() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    // Building an image must leave the host alone: package scripts run in
    // the chroot once chgrp'ed the host's /dev/kvm to the image's kvm gid.
    let kvm_before = std::fs::metadata("/dev/kvm").map(|m| (m.uid(), m.gid(), m.mode())).ok();
    build(&["--rootfs-only"], &[]);
    eprintln!("rootfs ready after {:?}", started.elapsed());
    let kvm_after = std::fs::metadata("/dev/kvm").map(|m| (m.uid(), m.gid(), m.mode())).ok();
    assert_eq!(kvm_before, kvm_after, "the image build changed the host's /dev/kvm");
    let rootfs = out_dir().join("rootfs");

    let scratch = std::env::temp_dir().join(format!("novacron-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("journal")).unwrap();
    // A stand-in for the ESP with a seed, bound on /efi: novacron-setup
    // applies it like on the appliance. The libvirt test driver: no
    // libvirtd (and nothing touching the host's network) in the container.
    let esp = scratch.join("esp");
    std::fs::create_dir_all(esp.join("seed")).unwrap();
    std::fs::write(
        esp.join("seed/novacron.toml"),
        format!(
            "data_dir = \"/var/lib/novacron\"\n\n[api]\nlisten = [\"{LISTEN}\"]\n\n\
             [hypervisor]\nuri = \"test:///default\"\ndomain_type = \"qemu\"\n\n\
             [log]\nlevel = \"info\"\ntarget = \"journald\"\n"
        ),
    )
    .unwrap();
    let console = std::fs::File::create(scratch.join("console.log")).unwrap();
    let child = Command::new("systemd-nspawn")
        .arg("-D")
        .arg(&rootfs)
        .args(["--keep-unit", "--register=no", "--volatile=overlay", "--console=read-only", "--quiet"])
        .arg(format!("--machine=novacron-image-{}", std::process::id()))
        .arg(format!("--bind={}:/efi", esp.display()))
        .arg(format!("--bind={}:/var/log/journal", scratch.join("journal").display()))
        .arg("-b")
        .arg("--")
        // Arguments for the container's systemd: keep libvirt's daemons down,
        // they are not needed with test:///default.
        .args([
            "systemd.mask=libvirtd.service",
            "systemd.mask=libvirtd.socket",
            "systemd.mask=libvirtd-ro.socket",
            "systemd.mask=libvirtd-admin.socket",
            "systemd.mask=virtlogd.socket",
            "systemd.mask=virtlockd.socket",
            "systemd.mask=libvirt-guests.service",
            // /efi is the bind mount above, not the image's ESP.
            "systemd.mask=efi.automount",
        ])
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .spawn()
        .expect("systemd-nspawn is missing: run tests/setup-host.sh (package systemd-container)");
    let mut c = Container { child, scratch: scratch.clone() };

    let deadline = Instant::now() + Duration::from_secs(90);
    let body = loop {
        if let Some(body) = health() {
            break body;
        }
        assert!(c.running(), "the container exited before the API answered:\n{}", c.console());
        assert!(
            Instant::now() < deadline,
            "no 200 from https://{LISTEN}/v1/health within 90 s\nconsole:\n{}\njournal:\n{}",
            c.console(),
            journal(&scratch.join("journal"))
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("health 200 after {:?}: {}", started.elapsed(), body.lines().next().unwrap_or(""));

    // journald writes the container's journal to the bind-mounted directory.
    let deadline = Instant::now() + Duration::from_secs(20);
    let j = loop {
        let j = journal(&scratch.join("journal"));
        if j.contains("\"SYSLOG_IDENTIFIER\":\"novacron\"") && j.contains("NODE_ID") {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "journalctl -u novacron -o json lacks SYSLOG_IDENTIFIER=novacron / NODE_ID:\n{j}\nconsole:\n{}",
            c.console()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(j.contains("\"_SYSTEMD_UNIT\":\"novacron.service\""), "{j}");
    assert!(
        esp.join("seed.applied/novacron.toml").exists() && !esp.join("seed").exists(),
        "novacron-setup did not take the seed:\n{}",
        c.console()
    );

    assert!(c.poweroff(), "the container did not power off within 30 s:\n{}", c.console());
    eprintln!("test done after {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&scratch);
}

// ---- the raw image under QEMU + OVMF --------------------------------------

/// Host ports forwarded into the VM (QEMU user networking, `restrict=on`:
/// the guest reaches nothing but these forwards).
const API_PORT: u16 = 18943;
const SSH_PORT: u16 = 18922;
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// How long a trial boot may take to bring the daemon up in the test builds
/// (the image default is 300 s; a good boot here needs about 30 s).
const BOOT_TIMEOUT: &str = "90";

struct Machine {
    child: Child,
    dir: PathBuf,
}

impl Machine {
    fn boot(dir: &Path) -> Machine {
        let console = dir.join("console.log");
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-m", "2048", "-smp", "2", "-nographic"])
            .args(["-drive", &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}")])
            .args(["-drive", &format!("if=pflash,format=raw,file={}", dir.join("vars.fd").display())])
            .args(["-drive", &format!("if=virtio,format=raw,cache=unsafe,file={}", dir.join("disk.raw").display())])
            .args([
                "-netdev",
                &format!(
                    "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{API_PORT}-:8443,hostfwd=tcp:127.0.0.1:{SSH_PORT}-:22"
                ),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .args(["-serial", &format!("file:{}", console.display())])
            .args(["-monitor", "none", "-display", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 (tests/setup-host.sh installs it)");
        Machine { child, dir: dir.to_path_buf() }
    }

    fn console(&self) -> String {
        let raw = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&raw).replace('\r', "")
    }

    fn tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `f` gives a value, failing with the console's end.
    fn wait<T>(&mut self, what: &str, secs: u64, mut f: impl FnMut(&Machine) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(self.running(), "QEMU exited while waiting for {what}:\n{}", self.tail());
            assert!(Instant::now() < deadline, "no {what} within {secs} s; console:\n{}", self.tail());
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn ssh(&self, cmd: &str) -> String {
        let out = Command::new("ssh")
            .args(["-q", "-i"])
            .arg(self.dir.join("key"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
            ])
            .args(["-o", "ConnectTimeout=10", "-p", &SSH_PORT.to_string(), "root@127.0.0.1", cmd])
            .output()
            .expect("ssh");
        assert!(out.status.success(), "ssh {cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CLI against the VM's API, pinned to the certificate it announced.
fn novacron(token: &str, fingerprint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_novacron"))
        .args([
            "--url",
            &format!("https://127.0.0.1:{API_PORT}"),
            "--token",
            token,
            "--fingerprint",
            fingerprint,
        ])
        .args(args)
        .output()
        .expect("novacron")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `novacron update status --json`, or None while the API is away.
fn update_view(token: &str, fp: &str) -> Option<serde_json::Value> {
    let o = novacron(token, fp, &["--json", "update", "status"]);
    serde_json::from_slice(&o.stdout).ok()
}

fn vm_state(token: &str, fp: &str, name: &str) -> Option<String> {
    let o = novacron(token, fp, &["--json", "vm", "show", name]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v["state"].as_str().map(String::from)
}

/// The value after `label` in the first-boot banner on the console.
fn banner_value(console: &str, label: &str) -> Option<String> {
    let banner = console.split("NovaCron Edge is ready").nth(1)?;
    let line = banner.lines().find(|l| l.contains(label))?;
    line.split(label).nth(1)?.split_whitespace().next().map(String::from)
}

#[test]
fn raw_image_boots_updates_and_rolls_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let v1 = env!("CARGO_PKG_VERSION");
    let (v2, v3) = (format!("{v1}.2"), format!("{v1}.3"));
    let scratch = std::env::temp_dir().join(format!("novacron-raw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();

    // ---- three builds: the image, a good update, a broken update -------------
    // zstd level 1: the compressed copy is not what this test looks at.
    let printed = build(&[], &[("NOVACRON_BOOT_TIMEOUT", BOOT_TIMEOUT), ("ZSTD_LEVEL", "1")]);
    eprintln!("{printed}");
    build(&["--bundle-only"], &[("IMAGE_VERSION", &v2), ("NOVACRON_BOOT_TIMEOUT", BOOT_TIMEOUT)]);
    // Broken: the daemon exits at once. `config default` (used by the build
    // itself) still works on the build host.
    let broken = scratch.join("broken-novacron");
    std::fs::write(
        &broken,
        format!(
            "#!/bin/sh\ncase \"$1\" in config) exec {} \"$@\" ;; esac\n\
             echo 'novacron: deliberately broken build' >&2\nexit 3\n",
            env!("CARGO_BIN_EXE_novacron")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    build(
        &["--bundle-only"],
        &[
            ("IMAGE_VERSION", &v3),
            ("NOVACRON_BOOT_TIMEOUT", BOOT_TIMEOUT),
            ("NOVACRON_BIN", broken.to_str().unwrap()),
        ],
    );
    let out = out_dir();
    let bundle = |v: &str| out.join(format!("novacron-update-{v}-x86_64.tar"));
    eprintln!("builds done after {:?}", started.elapsed());

    // ---- the "flashed" disk: the image on an 8 GiB disk, a seed on its ESP ----
    let disk = scratch.join("disk.raw");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(out.join(format!("novacron-appliance-{v1}-x86_64.raw")))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 << 30).unwrap();
    std::fs::copy(OVMF_VARS, scratch.join("vars.fd")).expect("OVMF (package ovmf, tests/setup-host.sh)");
    let parts = Command::new("partx").args(["-g", "-o", "START,NAME"]).arg(&disk).output().unwrap();
    let esp_start: u64 = String::from_utf8_lossy(&parts.stdout)
        .lines()
        .find(|l| l.trim_end().ends_with(" esp"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("an esp partition");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(scratch.join("key"))
        .status()
        .unwrap();
    assert!(keygen.success());
    let seed = scratch.join("seed");
    std::fs::create_dir_all(seed.join("network")).unwrap();
    std::fs::write(
        seed.join("novacron.toml"),
        "[node]\nname = \"edge-test\"\n\n[hypervisor]\ndomain_type = \"qemu\"\n",
    )
    .unwrap();
    std::fs::copy(scratch.join("key.pub"), seed.join("authorized_keys")).unwrap();
    std::fs::write(
        seed.join("network/10-test.network"),
        "[Match]\nName=en*\n\n[Network]\nDHCP=yes\nAddress=10.0.2.99/24\nDNS=192.0.2.53\n",
    )
    .unwrap();
    let mcopy = Command::new("mcopy")
        .args(["-s", "-i", &format!("{}@@{}", disk.display(), esp_start * 512)])
        .arg(&seed)
        .arg("::seed")
        .status()
        .expect("mcopy (mtools)");
    assert!(mcopy.success());

    // ---- first boot -------------------------------------------------------------
    let mut m = Machine::boot(&scratch);
    let (token, fp) = m.wait("first-boot banner", 600, |m| {
        let c = m.console();
        Some((banner_value(&c, "admin token:")?, banner_value(&c, "fingerprint:")?))
    });
    eprintln!("first boot: banner after {:?}", started.elapsed());
    // One URL per address: DHCP's and the seeded network file's static one.
    let console = m.console();
    let banner = console.split("NovaCron Edge is ready").nth(1).unwrap();
    for url in ["https://10.0.2.15:8443", "https://10.0.2.99:8443"] {
        assert!(banner.contains(&format!("API:          {url}")), "{url} missing from the banner:\n{banner}");
    }
    // The token and the pinned fingerprint work; the seeded config is in use.
    let status = novacron(&token, &fp, &["--json", "status"]);
    assert!(status.status.success(), "{}", text(&status));
    let host: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(host["host"]["node_name"], "edge-test", "{host}");
    assert_eq!(host["host"]["domain_type"], "qemu", "{host}");
    assert_eq!(host["host"]["libvirt_connected"], true, "libvirtd runs in the image: {host}");
    let wrong_pin = format!("{}00", "00:".repeat(31));
    assert!(!novacron(&token, &wrong_pin, &["status"]).status.success(), "another certificate is refused");
    let view = update_view(&token, &fp).expect("update status");
    assert_eq!(
        (view["appliance"].as_bool(), view["booted_slot"].as_str()),
        (Some(true), Some("a")),
        "{view}"
    );
    assert_eq!(view["booted_version"], v1);

    // DNS comes from the seeded network file (or DHCP) through resolved's
    // stub, never from the build host's resolver. (192.0.2.53 is a
    // documentation address; nothing here queries it.)
    let dns = m.ssh("grep ^nameserver /etc/resolv.conf; resolvectl dns");
    assert!(dns.starts_with("nameserver 127.0.0.53") && dns.contains("192.0.2.53"), "{dns}");
    let facts = m.ssh(
        "hostname; df -B1M --output=size /var | tail -n1; ip -br addr; ls /efi; ls /efi/loader/entries; \
         systemctl list-units --failed --no-legend --plain; echo END",
    );
    let lines: Vec<&str> = facts.lines().collect();
    assert_eq!(lines[0], "edge-test", "host name from the seed: {facts}");
    let var_mib: u64 = lines[1].trim().parse().unwrap();
    assert!(var_mib > 4000, "the data partition grew to the disk ({var_mib} MiB): {facts}");
    assert!(facts.contains("10.0.2.99/24"), "seeded network file applied: {facts}");
    assert!(facts.contains("seed.applied") && !facts.lines().any(|l| l == "seed"), "{facts}");
    let failed = facts.split("novacron-a.conf").nth(1).unwrap_or("");
    assert_eq!(failed.trim(), "END", "failed units or unexpected boot entries: {facts}");
    let journal = m.ssh("journalctl -u novacron.service -o json --no-pager");
    assert!(
        journal.contains("\"SYSLOG_IDENTIFIER\":\"novacron\"") && journal.contains("\"NODE_ID\""),
        "{journal}"
    );
    assert!(m.ssh("journalctl -u novacron-firstboot -o cat --no-pager").contains(&token));
    assert!(!m.ssh("ls /var/lib/novacron").contains("initial-admin-token"), "shown once, then removed");

    // Refused bundles change nothing: a wrong checksum, and junk with the
    // right one.
    let junk = scratch.join("junk.tar");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let wrong =
        novacron(&token, &fp, &["update", "apply", "--sha256", &"ab".repeat(32), junk.to_str().unwrap()]);
    assert!(!wrong.status.success() && text(&wrong).contains("checksum_mismatch"), "{}", text(&wrong));
    let sum = Command::new("sha256sum").arg(&junk).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap().to_string();
    let bad = novacron(&token, &fp, &["update", "apply", "--sha256", &sum, junk.to_str().unwrap()]);
    assert!(!bad.status.success() && text(&bad).contains("invalid_bundle"), "{}", text(&bad));
    assert_eq!(update_view(&token, &fp).unwrap()["update"], serde_json::Value::Null);

    // A guest that ignores ACPI (no OS on its disk): shut down at the update
    // by force after its 5 s limit, and started again after the reboot.
    for args in [
        &["vm", "create", "--name", "g1", "--memory", "64", "--disk", "1"][..],
        &["vm", "edit", "g1", "--shutdown-timeout", "5"],
        &["vm", "start", "g1"],
    ] {
        let o = novacron(&token, &fp, args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    assert_eq!(vm_state(&token, &fp, "g1").as_deref(), Some("running"));

    // ---- A/B update to the second build ---------------------------------------
    let t = Instant::now();
    let apply = novacron(&token, &fp, &["update", "apply", bundle(&v2).to_str().unwrap()]);
    assert!(apply.status.success(), "{}", text(&apply));
    assert!(text(&apply).contains("rebooting"), "{}", text(&apply));
    eprintln!("update to {v2}: verified, installed, guests down after {:?}", t.elapsed());
    let view = m.wait("the update's outcome", 600, |_| {
        update_view(&token, &fp)
            .filter(|v| v["update"]["state"] != "rebooting" && v["update"]["state"] != "stopping_guests")
    });
    eprintln!("update to {v2}: back after {:?}", t.elapsed());
    assert_eq!(view["update"]["state"], "succeeded", "{view}");
    assert_eq!(
        (view["booted_slot"].as_str(), view["booted_version"].as_str()),
        (Some("b"), Some(v2.as_str()))
    );
    let st = m.wait("g1 running again", 120, |_| vm_state(&token, &fp, "g1").filter(|s| s == "running"));
    assert_eq!(st, "running");
    // systemd-bless-boot removed the counter once the daemon was ready.
    let entries = m.wait("slot B blessed", 120, |m| {
        Some(m.ssh("ls /efi/loader/entries")).filter(|e| e.contains("novacron-b.conf"))
    });
    assert!(!entries.contains('+'), "{entries}");

    // ---- a broken build rolls back by itself ------------------------------------
    let t = Instant::now();
    let apply = novacron(&token, &fp, &["update", "apply", "--tries", "1", bundle(&v3).to_str().unwrap()]);
    assert!(apply.status.success(), "{}", text(&apply));
    let view = m.wait("the rollback", 900, |_| {
        update_view(&token, &fp)
            .filter(|v| v["update"]["version"] == v3.as_str() && v["update"]["state"] != "rebooting")
    });
    eprintln!("broken update {v3}: back after {:?}", t.elapsed());
    assert_eq!(view["update"]["state"], "rolled_back", "{view}");
    assert_eq!(
        (view["booted_slot"].as_str(), view["booted_version"].as_str()),
        (Some("b"), Some(v2.as_str()))
    );
    assert!(m.console().contains("is not ready after"), "the boot check rebooted the broken slot");
    let st = m.wait("g1 running after the rollback", 120, |_| {
        vm_state(&token, &fp, "g1").filter(|s| s == "running")
    });
    assert_eq!(st, "running");
    let status = novacron(&token, &fp, &["update", "status"]);
    assert_eq!(status.status.code(), Some(1), "a rolled-back update is reported: {}", text(&status));
    let entries = m.ssh("ls /efi/loader/entries");
    assert!(entries.contains("novacron-a+0-1.conf") && entries.contains("novacron-b.conf"), "{entries}");

    drop(m);
    eprintln!("test done after {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&scratch);
}
