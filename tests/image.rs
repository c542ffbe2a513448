//! The appliance root filesystem boots: `image/build.sh --rootfs-only` builds
//! (or reuses) the Debian rootfs with the binary under test, `systemd-nspawn
//! -b` boots it with systemd as PID 1, the enabled `novacron.service` answers
//! `/v1/health`, and the container's journal holds the daemon's structured
//! fields. The rootfs itself is never modified: the container runs on a tmpfs
//! overlay (`--volatile=overlay`); only the seed config and the journal
//! directory are bind-mounted from a scratch dir.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// 127.0.0.88 is not used by any other test; the container shares the host's
/// network namespace (no veth, no bridge), so loopback reaches it.
const LISTEN: &str = "127.0.0.88:8443";

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
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
    let started = Instant::now();
    // Building an image must leave the host alone: package scripts run in
    // the chroot once chgrp'ed the host's /dev/kvm to the image's kvm gid.
    let kvm_before = std::fs::metadata("/dev/kvm").map(|m| (m.uid(), m.gid(), m.mode())).ok();
    // Its own OUTDIR (own base cache and rootfs): a `bash image/build.sh` run
    // in target/image must not replace the rootfs while it is booted here.
    let out = repo("target/image-test");
    let build = Command::new("bash")
        .arg(repo("image/build.sh"))
        .arg("--rootfs-only")
        .arg(&out)
        .env("NOVACRON_BIN", env!("CARGO_BIN_EXE_novacron"))
        .output()
        .expect("bash");
    assert!(
        build.status.success(),
        "image/build.sh --rootfs-only failed (run tests/setup-host.sh for debootstrap):\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    eprintln!("rootfs ready after {:?}", started.elapsed());
    let kvm_after = std::fs::metadata("/dev/kvm").map(|m| (m.uid(), m.gid(), m.mode())).ok();
    assert_eq!(kvm_before, kvm_after, "the image build changed the host's /dev/kvm");
    let rootfs = out.join("rootfs");

    let scratch = std::env::temp_dir().join(format!("novacron-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("journal")).unwrap();
    let config = scratch.join("novacron.toml");
    // The libvirt test driver: no libvirtd (and nothing touching the host's
    // network) inside the container.
    std::fs::write(
        &config,
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
        .arg(format!("--bind-ro={}:/etc/novacron/novacron.toml", config.display()))
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

    assert!(c.poweroff(), "the container did not power off within 30 s:\n{}", c.console());
    eprintln!("test done after {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&scratch);
}
