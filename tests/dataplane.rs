//! The data plane with a real TCG guest on qemu:///system: `novacron
//! dataplane --config` serves a raw file over vhost-user-blk, the guest
//! (tests/guest/dataplane-init.sh) writes numbered 4 KiB records with
//! O_DIRECT + fsync and prints each one after its write returned, and the
//! host reads the file. Also: kill -9 and SIGTERM restarts of the data plane
//! mid-stream, and a `reload` beside a running guest.

mod common;

use common::{scratch_dir, virsh, wait_for, DomainGuard, BIN};
use novacron::dataplane::{
    request, ControlRequest, ControlResponse, DataplaneConfig, DataplaneStatus, DiskExport, DiskRole,
    ReplicationMode,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

const DISK_BYTES: u64 = 64 << 20;
const GUEST_TIMEOUT: u64 = 240;

/// One guest at a time: the stall numbers mean something only on a host
/// that is not also booting the other test's guest.
static SERIAL: Mutex<()> = Mutex::new(());

struct Rig {
    dir: PathBuf,
    config_path: PathBuf,
    config: DataplaneConfig,
    log: PathBuf,
    child: Option<Child>,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let dir = scratch_dir(&format!("dp-{tag}"));
        // Sockets to QEMU's user and the control socket to a group that is
        // not root's, to see both given away (root only).
        let root = nix::unistd::geteuid().is_root();
        let owner = nix::unistd::User::from_name("libvirt-qemu")
            .ok()
            .flatten()
            .filter(|_| root)
            .map(|_| "libvirt-qemu".to_string());
        let group = nix::unistd::Group::from_name("libvirt-qemu")
            .ok()
            .flatten()
            .filter(|_| root)
            .map(|_| "libvirt-qemu".to_string());
        let config = DataplaneConfig {
            version: 1,
            node_id: Uuid::new_v4(),
            socket_dir: dir.join("vhost"),
            control_socket: dir.join("control.sock"),
            control_group: group,
            socket_owner: owner,
            listen: Vec::new(),
            tls: None,
            peer: None,
            sync_rate_bytes_per_sec: 0,
            disks: Vec::new(),
        };
        Rig {
            config_path: dir.join("dataplane.json"),
            log: dir.join("dataplane.log"),
            dir,
            config,
            child: None,
        }
    }

    /// The tiny guest's kernel, and its initramfs plus a second cpio whose
    /// /init is our writer.
    fn guest(&self) -> (PathBuf, PathBuf) {
        let (kernel, base) = common::install_guest(&self.dir.join("boot"));
        let extra = self.dir.join("extra");
        std::fs::create_dir_all(&extra).unwrap();
        let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/dataplane-init.sh");
        std::fs::copy(init, extra.join("init")).unwrap();
        let cpio = Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && echo init | cpio --quiet -o -H newc -R 0:0 | gzip -n")
            .arg("sh")
            .arg(&extra)
            .output()
            .unwrap();
        assert!(cpio.status.success(), "cpio: {}", String::from_utf8_lossy(&cpio.stderr));
        let mut initrd_bytes = std::fs::read(&base).unwrap();
        initrd_bytes.extend_from_slice(&cpio.stdout);
        let initrd = self.dir.join("boot/initramfs-dp.gz");
        std::fs::write(&initrd, initrd_bytes).unwrap();
        (kernel, initrd)
    }

    /// A sparse raw file and its export entry (replication off).
    fn add_disk(&mut self, name: &str) -> DiskExport {
        let path = self.dir.join(format!("{name}.raw"));
        std::fs::File::create(&path).unwrap().set_len(DISK_BYTES).unwrap();
        let d = DiskExport {
            vm: Uuid::new_v4(),
            device: "vda".into(),
            path,
            role: DiskRole::Primary,
            epoch: 1,
            replication: ReplicationMode::Off,
            max_lag_seconds: 0,
            size_bytes: DISK_BYTES,
            queues: 1,
            force_promote: false,
        };
        self.config.disks.push(d.clone());
        d
    }

    /// A rig serving one disk with `queues` virtqueues, started.
    fn serving_one(tag: &str, queues: u16) -> (Rig, DiskExport) {
        let mut rig = Rig::new(tag);
        rig.add_disk("a");
        rig.config.disks[0].queues = queues;
        let disk = rig.config.disks[0].clone();
        rig.start();
        (rig, disk)
    }

    fn write_config(&self) {
        self.config.write_atomic(&self.config_path).unwrap();
    }

    fn start(&mut self) {
        self.write_config();
        self.launch();
    }

    /// Starts the data plane on the config file as it is.
    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(BIN)
            .args(["dataplane", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.config.control_socket.clone();
        wait_for("the data plane's control socket", 20, || {
            request(&sock, &ControlRequest::STATUS, Duration::from_secs(2)).is_ok()
        });
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM; the exit status (within 10 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "still running 10 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn status(&self) -> DataplaneStatus {
        match request(&self.config.control_socket, &ControlRequest::STATUS, Duration::from_secs(5)).unwrap() {
            ControlResponse::Status { ok: true, status } => status,
            other => panic!("status: {other:?}"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn console(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.console.log"))
    }

    /// Starts a transient domain on `disk`'s socket, one vCPU per queue;
    /// the guest writes `n` records.
    fn boot(&self, name: &str, disk: &DiskExport, n: u32) -> DomainGuard {
        let sock = disk.socket_path(&self.config.socket_dir);
        let (kernel, initrd) = self.guest();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>{q}</vcpu>\
             <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>\
             <cmdline>console=ttyS0 panic=-1 quiet dp.n={n}</cmdline></os><features><acpi/></features>\
             <on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash><devices>\
             <disk type='vhostuser' device='disk'><driver name='qemu' type='raw' queues='{q}'/>\
             <source type='unix' path='{s}'><reconnect enabled='yes' timeout='1'/></source>\
             <target dev='vda' bus='virtio'/></disk>\
             <serial type='file'><source path='{c}'/><target port='0'/></serial></devices></domain>",
            q = disk.queues,
            k = kernel.display(),
            i = initrd.display(),
            s = sock.display(),
            c = self.console(name).display(),
        );
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let guard = DomainGuard(vec![name.to_string()]);
        let out = virsh(&["create", file.to_str().unwrap()]);
        assert!(out.contains("created"), "virsh create: {out}");
        guard
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("data plane log:\n{}", self.log());
        }
    }
}

/// The guest's lines: records (number, guest µs), failed records, done.
struct Console {
    text: String,
    records: Vec<(u32, u64)>,
    ioerrs: Vec<String>,
    done: bool,
}

fn console(path: &Path) -> Console {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut records = Vec::new();
    let mut ioerrs = Vec::new();
    for line in text.lines() {
        let line = line.trim_start_matches('\r');
        if let Some(rest) = line.strip_prefix("DP-REC ") {
            let mut f = rest.split_whitespace();
            if let (Some(Ok(n)), Some(Ok(t))) = (f.next().map(str::parse), f.next().map(str::parse)) {
                records.push((n, t));
            }
        } else if line.starts_with("DP-IOERR") || line.contains("I/O error") {
            ioerrs.push(line.to_string());
        }
    }
    let done = text.contains("DP-DONE");
    Console { text, records, ioerrs, done }
}

fn record(n: u32) -> Vec<u8> {
    let mut r = format!("{n:08}\n").repeat(4096 / 9 + 1).into_bytes();
    r.truncate(4096);
    r
}

/// Every record the guest printed is on the disk file with its exact content.
fn check_records(disk: &Path, printed: &[(u32, u64)]) {
    let file = std::fs::read(disk).unwrap();
    for &(n, _) in printed {
        let at = n as usize * 4096;
        assert!(file[at..at + 4096] == record(n)[..], "record {n} is not on the disk as written");
    }
}

/// Largest gap between consecutive printed records, in ms, and the record after it.
fn max_gap(records: &[(u32, u64)]) -> (u64, u32) {
    records.windows(2).map(|w| ((w[1].1.saturating_sub(w[0].1)) / 1000, w[1].0)).max().unwrap_or((0, 0))
}

fn wait_done(path: &Path, what: &str) -> Console {
    wait_for(what, GUEST_TIMEOUT, || console(path).done);
    console(path)
}

/// Threads (but the short-lived ones answering control requests) and
/// mappings of guest memory.
fn threads_and_memfd_maps(pid: u32) -> (usize, usize) {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() != "control")
        .count();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    (threads, maps.lines().filter(|l| l.contains("memfd:")).count())
}

#[test]
#[ignore = "boots a real TCG guest: needs root, libvirtd and QEMU from tests/setup-host.sh"]
fn guest_writes_reach_the_raw_file() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (mut rig, disk) = Rig::serving_one("write", 2);
    let st = rig.status();
    assert_eq!(st.disks.len(), 1);
    assert_eq!(st.disks[0].size_bytes, DISK_BYTES);
    let sock = st.disks[0].socket.clone().expect("export not serving");
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&sock).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        if let Some(u) = nix::unistd::User::from_name("libvirt-qemu").ok().flatten() {
            assert_eq!(meta.uid(), u.uid.as_raw(), "socket not given to QEMU's user");
        }
        let control = std::fs::metadata(&rig.config.control_socket).unwrap();
        if let Some(g) = nix::unistd::Group::from_name("libvirt-qemu").ok().flatten() {
            assert_eq!((control.uid(), control.gid()), (0, g.gid.as_raw()), "control socket owner");
            assert_eq!(control.permissions().mode() & 0o777, 0o660);
        }
    }
    let idle = threads_and_memfd_maps(rig.pid());
    assert_eq!(idle.1, 0);
    let mut busy = (0, 0);

    let n = 200;
    let name = format!("ncvh-write-{}", std::process::id());
    let started = Instant::now();
    let _dom = rig.boot(&name, &disk, n);
    wait_for("the guest's first records", GUEST_TIMEOUT, || {
        busy = threads_and_memfd_maps(rig.pid());
        !console(&rig.console(&name)).records.is_empty()
    });
    // Sanity of the measure: a connection has worker threads and maps memory.
    assert!(busy.0 > idle.0 && busy.1 > 0, "idle {idle:?}, connected {busy:?}");
    let c = wait_done(&rig.console(&name), "the guest to write its records");
    eprintln!("guest wrote {n} records in {:?}", started.elapsed());
    assert!(c.text.contains("wc=write back"), "FLUSH not offered:\n{}", c.text);
    assert!(c.text.contains("lbs=4096"), "{}", c.text);
    assert!(c.text.contains("mq=2"), "the guest does not use 2 queues:\n{}", c.text);
    assert!(c.text.contains(&format!("serial={}", disk.serial())), "{}", c.text);
    assert!(c.ioerrs.is_empty(), "I/O errors in the guest: {:?}", c.ioerrs);
    let numbers: Vec<u32> = c.records.iter().map(|r| r.0).collect();
    assert_eq!(numbers, (1..=n).collect::<Vec<_>>());
    check_records(&disk.path, &c.records);
    let (gap, at) = max_gap(&c.records);
    eprintln!("max gap between records: {gap} ms (before record {at})");

    // The guest powered off: the export listens again with nothing of the
    // connection left (worker threads joined, guest memory unmapped).
    wait_for("the disconnect", 30, || !rig.status().disks[0].connected);
    let st = rig.status();
    assert_eq!(st.disks[0].connections, 1);
    assert!(st.disks[0].writes >= u64::from(n), "{:?}", st.disks[0]);
    assert!(st.disks[0].flushes >= u64::from(n), "fsync did not reach the data plane: {:?}", st.disks[0]);
    assert_eq!(st.disks[0].errors, 0, "{:?}", st.disks[0]);
    // The writer alternates CPUs, and blk-mq gives each CPU its own queue.
    let q = &st.disks[0].per_queue;
    eprintln!("requests per queue: {q:?}");
    assert!(q.len() == 2 && q.iter().all(|&r| r >= u64::from(n) / 2), "requests per queue: {q:?}");
    wait_for("the connection's threads and mappings to go", 10, || threads_and_memfd_maps(rig.pid()) == idle);
    assert!(sock.exists(), "socket gone after the disconnect");

    // SIGTERM: exit 0, sockets removed.
    let status = rig.terminate();
    assert!(status.success(), "{status:?}\n{}", rig.log());
    assert!(!sock.exists() && !rig.config.control_socket.exists(), "sockets left after SIGTERM");
}

#[test]
#[ignore = "boots a real TCG guest: needs root, libvirtd and QEMU from tests/setup-host.sh"]
fn restarts_of_the_data_plane_lose_no_acknowledged_write() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (mut rig, disk) = Rig::serving_one("kill", 1);
    let n = 400;
    let name = format!("ncvh-kill-{}", std::process::id());
    let _dom = rig.boot(&name, &disk, n);
    let path = rig.console(&name);
    let last = || console(&path).records.last().map_or(0, |r| r.0);
    wait_for("100 records", GUEST_TIMEOUT, || last() >= 100);
    let killed = last();
    rig.kill9();
    std::thread::sleep(Duration::from_secs(1));
    let during = last();
    rig.start();
    // Then a restart as systemd does it: SIGTERM, start again at once.
    wait_for("250 records", GUEST_TIMEOUT, || last() >= 250);
    let termed = last();
    assert!(rig.terminate().success(), "{}", rig.log());
    rig.start();
    let c = wait_done(&path, "the guest to finish after the restarts");
    assert!(c.ioerrs.is_empty(), "I/O errors in the guest: {:?}", c.ioerrs);
    let numbers: Vec<u32> = c.records.iter().map(|r| r.0).collect();
    assert_eq!(numbers, (1..=n).collect::<Vec<_>>());
    check_records(&disk.path, &c.records);
    // The stalls: the largest gap among the records written around each restart.
    let stall_after = |from: u32, to: u32| {
        max_gap(&c.records.iter().copied().filter(|r| r.0 + 5 >= from && r.0 <= to + 5).collect::<Vec<_>>())
    };
    let (stall, at) = stall_after(killed, during);
    let (term_stall, term_at) = stall_after(termed, termed);
    let (overall, _) = max_gap(&c.records);
    eprintln!(
        "kill -9 after record {killed}, restart 1 s later (record {during} then): guest stall {stall} ms before \
         record {at}; SIGTERM after record {termed} and restart at once: stall {term_stall} ms before record \
         {term_at}; largest gap anywhere {overall} ms"
    );
    assert!(stall >= 900, "a 1 s outage left no gap: the kill did not hit the stream ({stall} ms)");
    assert_eq!(rig.status().disks[0].connections, 1, "the new process saw more than QEMU's reconnect");
}

#[test]
#[ignore = "boots a real TCG guest: needs root, libvirtd and QEMU from tests/setup-host.sh"]
fn reload_adds_and_removes_exports_beside_a_running_guest() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new("reload");
    let a = rig.add_disk("a");
    let b = rig.add_disk("b");
    rig.start();
    let sock_b = b.socket_path(&rig.config.socket_dir);
    assert!(sock_b.exists());
    let n = 300;
    let name = format!("ncvh-reload-{}", std::process::id());
    let _dom = rig.boot(&name, &a, n);
    let path = rig.console(&name);
    wait_for("50 records", GUEST_TIMEOUT, || console(&path).records.len() >= 50);

    // b removed, c added, d added with a file that does not exist.
    rig.config.disks.retain(|d| d.vm != b.vm);
    let c_disk = rig.add_disk("c");
    let mut d_disk = c_disk.clone();
    d_disk.vm = Uuid::new_v4();
    d_disk.path = rig.dir.join("missing.raw");
    rig.config.disks.push(d_disk.clone());
    rig.write_config();
    let at = console(&path).records.last().unwrap().0;
    let summary = match request(&rig.config.control_socket, &ControlRequest::RELOAD, Duration::from_secs(10))
        .unwrap()
    {
        ControlResponse::Reload { ok: true, reload } => reload,
        other => panic!("reload: {other:?}"),
    };
    assert_eq!(summary.unchanged, vec![a.name()]);
    assert_eq!(summary.stopped, vec![b.name()]);
    let mut started = summary.started.clone();
    started.sort();
    let mut want = vec![c_disk.name(), d_disk.name()];
    want.sort();
    assert_eq!(started, want);
    assert!(!sock_b.exists(), "removed export's socket still there");
    let st = rig.status();
    let by = |vm: Uuid| st.disks.iter().find(|d| d.vm == vm).unwrap().clone();
    assert!(by(c_disk.vm).socket.as_deref().is_some_and(Path::exists), "{:?}", by(c_disk.vm));
    let d = by(d_disk.vm);
    assert!(
        d.socket.is_none() && d.last_error.as_deref().is_some_and(|e| e.contains("missing.raw")),
        "{d:?}"
    );

    // A bad config is refused as a whole and changes nothing.
    std::fs::write(&rig.config_path, r#"{"version": 9}"#).unwrap();
    match request(&rig.config.control_socket, &ControlRequest::RELOAD, Duration::from_secs(10)).unwrap() {
        ControlResponse::Error { error } => assert!(error.message.contains("version 9"), "{error:?}"),
        other => panic!("bad config accepted: {other:?}"),
    }
    assert_eq!(rig.status().disks.len(), 3);

    let c = wait_done(&path, "the guest to finish");
    assert!(c.ioerrs.is_empty(), "I/O errors in the guest: {:?}", c.ioerrs);
    assert_eq!(c.records.len(), n as usize);
    check_records(&a.path, &c.records);
    let around: Vec<_> = c.records.iter().copied().filter(|r| r.0 + 5 >= at && r.0 <= at + 20).collect();
    let (gap, _) = max_gap(&around);
    let (overall, _) = max_gap(&c.records);
    eprintln!("reload after record {at}: largest gap around it {gap} ms, anywhere {overall} ms");
    let st = rig.status();
    let a_now = st.disks.iter().find(|d| d.vm == a.vm).unwrap();
    assert_eq!(a_now.connections, 1, "the running guest was reconnected: {a_now:?}");
    assert_eq!(a_now.errors, 0, "{a_now:?}");
}

/// Without a guest (plain `cargo test`): one process per control socket,
/// and errors at start are clear and end the process with 1.
#[test]
fn a_second_instance_and_a_bad_config_are_refused() {
    let mut rig = Rig::new("once");
    rig.add_disk("a");
    rig.start();
    // The exit code and stderr of a run that must end by itself.
    let run = |config: &Path| {
        let mut child = Command::new(BIN)
            .args(["dataplane", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("`dataplane --config {}` still running after 10 s", config.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&rig.config_path);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another data plane holds"), "{err}");
    let st = rig.status();
    assert_eq!(st.pid, rig.pid());
    assert!(
        st.disks[0].socket.as_deref().is_some_and(Path::exists),
        "the second instance took the socket: {st:?}"
    );

    let bad = rig.dir.join("v2.json");
    std::fs::write(&bad, r#"{"version": 2, "whatever": true}"#).unwrap();
    let (code, err) = run(&bad);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("version 2 is not supported"), "{err}");
    let (code, err) = run(&rig.dir.join("missing.json"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.json"), "{err}");
}

/// The API daemon writes the config unprivileged: this root process then
/// serves only files that belong to the config's owner, and refuses a
/// config others could have written.
#[test]
#[ignore = "needs root: gives files to another user"]
fn an_unprivileged_config_may_only_name_its_owners_files() {
    use std::os::unix::fs::PermissionsExt;
    let mut rig = Rig::new("owner");
    let mine = rig.add_disk("mine");
    let roots = rig.add_disk("roots");
    let nobody = 65534;
    std::os::unix::fs::chown(&mine.path, Some(nobody), None).unwrap();
    rig.write_config();
    std::os::unix::fs::chown(&rig.config_path, Some(nobody), None).unwrap();
    rig.launch();
    let st = rig.status();
    let by = |vm: Uuid| st.disks.iter().find(|d| d.vm == vm).unwrap().clone();
    assert!(by(mine.vm).socket.is_some(), "{:?}", by(mine.vm));
    let refused = by(roots.vm);
    assert!(refused.socket.is_none(), "{refused:?}");
    let why = refused.last_error.unwrap_or_default();
    assert!(why.contains("belongs to uid 0") && why.contains("uid 65534"), "{why}");

    std::fs::set_permissions(&rig.config_path, std::fs::Permissions::from_mode(0o620)).unwrap();
    match request(&rig.config.control_socket, &ControlRequest::RELOAD, Duration::from_secs(10)).unwrap() {
        ControlResponse::Error { error } => assert!(error.message.contains("writable by group"), "{error:?}"),
        other => panic!("a group-writable config was accepted: {other:?}"),
    }
    assert!(
        rig.status().disks.iter().any(|d| d.vm == mine.vm && d.socket.is_some()),
        "reload failure stopped exports"
    );
}
