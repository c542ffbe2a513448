//! Replicated-disk benchmark (issue 10, "Performance"): run by
//! `tests/bench/disk.sh`, never by the test suite (`test = false` in
//! Cargo.toml; it asserts nothing about time). Two real daemons in network
//! namespaces joined by veth links (tests/common/pair.rs, qemu:///system,
//! TCG), paired, and in the same run:
//!
//! 1. guest write throughput and IOPS (fio in the bench guest,
//!    tests/guest/bench-init.sh) on: a local raw file (QEMU `cache.direct`,
//!    flushes honoured) by a plain QEMU in namespace A and by libvirt;
//!    qemu-storage-daemon's vhost-user-blk export of a local raw file; our
//!    VM with replication off, async and sync; QEMU's write-blocking
//!    mirror to a qemu-storage-daemon NBD export in namespace B;
//! 2. the initial sync of a disk of random data vs a TLS 1.3 copy of the
//!    same file between the namespaces (socat/OpenSSL) and `cat`;
//! 3. async lag under a steady guest write load, and the delta resync's
//!    bytes vs the bytes written during an outage;
//! 4. planned move downtime.
//!
//! Knobs (environment): BENCH_REPS (3), BENCH_SYNC_MIB (1024), BENCH_MOVES
//! (4), BENCH_LAG_RATE (50, MiB/s), BENCH_LAG_SECS (20), BENCH_ONLY (a
//! comma list of parts: perf,sync,lag,move), BENCH_PATHS (a comma list of
//! path names of part 1), BENCH_OUT (results JSON, default
//! $NOVACRON_TEST_DIR/bench-disk.json).

#[path = "../common/mod.rs"]
mod common;

use common::disk::{get, pair_up, post, until_repl};
use common::pair::{Node, Pair};
use common::{call, Opts};
use hyper::Method;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wanted(var: &str, item: &str) -> bool {
    std::env::var(var).map(|v| v.split(',').any(|p| p.trim() == item)).unwrap_or(true)
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[bench-disk {}] {}", chrono_now(), msg.as_ref());
}

fn chrono_now() -> String {
    let out = Command::new("date").arg("-u").arg("+%H:%M:%S").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sh_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One fio job's line from the bench guest's console.
#[derive(Debug, Clone)]
struct Job {
    job: String,
    bytes: u64,
    ms: u64,
    iops: f64,
}

/// `NOVACRON-BENCH job round k=v...` lines of a console log.
fn jobs(log: &Path) -> Vec<Job> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.split("NOVACRON-BENCH ").nth(1) else { continue };
        let mut it = rest.split_whitespace();
        let (Some(job), Some(_round)) = (it.next(), it.next()) else { continue };
        let kv: BTreeMap<&str, &str> = it.filter_map(|t| t.split_once('=')).collect();
        let num = |k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok());
        if let (Some(bytes), Some(ms), Some(iops)) = (num("bytes"), num("ms"), num("iops")) {
            out.push(Job { job: job.into(), bytes: bytes as u64, ms: ms as u64, iops });
        }
    }
    out
}

fn console_has(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log).unwrap_or_default().contains(what)
}

fn wait_console(log: &Path, what: &str, secs: u64) {
    let t0 = Instant::now();
    while !console_has(log, what) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains("NOVACRON-BENCH-FAILED"), "a fio job failed:\n{text}");
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "no {what} within {secs} s in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The measured numbers of one path of part 1, per job: the rounds'
/// (ms, iops).
type PathResult = BTreeMap<String, Vec<(u64, f64)>>;

fn collect(log: &Path) -> PathResult {
    let mut r = PathResult::new();
    for j in jobs(log).into_iter().filter(|j| j.job != "prefill") {
        r.entry(j.job).or_default().push((j.ms, j.iops));
    }
    r
}

struct Bench {
    dir: PathBuf,
    /// Node B's files (its data dir, the mirror's target, the TLS copy's
    /// output): on a file system of its own when disk.sh made one.
    b_dir: PathBuf,
    guest: PathBuf,
    reps: u64,
    results: serde_json::Map<String, Value>,
}

fn cmdline(bench: &str, reps: u64) -> String {
    format!("console=ttyS0 panic=-1 quiet novacron.bench={bench} novacron.reps={reps}")
}

/// A plain QEMU in namespace `ns` (or the root one) with the bench guest:
/// the same machine as the daemon's domains (pc, 1 vCPU, 512 MiB shared
/// memfd memory, TCG), the console to `log`, QMP on `qmp`.
fn qemu(ns: &str, guest: &Path, cmd: &str, log: &Path, qmp: &Path, disk: &[String], paused: bool) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
    c.args(["-machine", "pc,accel=tcg,memory-backend=mem0", "-m", "512", "-smp", "1"]);
    c.args(["-object", "memory-backend-memfd,id=mem0,size=512M,share=on"]);
    c.args(["-nodefaults", "-no-user-config", "-display", "none"]);
    c.arg("-kernel").arg(guest.join("vmlinuz")).arg("-initrd").arg(guest.join("initramfs-bench.gz"));
    c.args(["-append", cmd]);
    c.arg("-serial").arg(format!("file:{}", log.display()));
    c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c.args(disk);
    if paused {
        c.arg("-S");
    }
    c.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("qemu-system-x86_64")
}

/// A QMP session on a Unix socket.
struct Qmp {
    r: BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let t0 = Instant::now();
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(20), "QMP {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let mut q = Qmp { r: BufReader::new(s.try_clone().unwrap()), w: s };
        q.read(); // greeting
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("QMP: {line}"))
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        writeln!(self.w, "{}", json!({"execute": name, "arguments": args})).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                continue;
            }
            assert!(v.get("error").is_none(), "QMP {name}: {v}");
            return v["return"].clone();
        }
    }
}

fn raw_file(path: &Path, gib: u64) {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(gib << 30).unwrap();
}

fn file_disk(path: &Path) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=file,filename={},node-name=f0,cache.direct=on,aio=threads", path.display()),
        "-blockdev".into(),
        "driver=raw,file=f0,node-name=d0".into(),
        "-device".into(),
        "virtio-blk-pci,drive=d0".into(),
    ]
}

fn wait_exit(child: &mut Child, what: &str, secs: u64) {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            say(format!("{what}: killed after {secs} s"));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Bench {
    fn path_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("ncb-{name}"))
    }

    fn record(&mut self, path: &str, r: PathResult) {
        say(format!("{path}: {r:?}"));
        let v: serde_json::Map<String, Value> = r.into_iter().map(|(k, rounds)| (k, json!(rounds))).collect();
        self.results.entry("perf").or_insert_with(|| json!({}))[path] = Value::Object(v);
        self.save();
    }

    fn save(&self) {
        let out = std::env::var("BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|_| self.dir.parent().unwrap().join("bench-disk.json"));
        std::fs::write(&out, serde_json::to_string_pretty(&self.results).unwrap()).unwrap();
    }

    /// (a) a local raw file, plain QEMU in namespace A.
    fn local_qemu(&mut self, pair: &Pair) {
        let (disk, log, qmp) =
            (self.path_file("local.raw"), self.path_file("local.log"), self.path_file("local.qmp"));
        raw_file(&disk, 1);
        let _ = std::fs::remove_file(&log);
        let mut q = qemu(
            &pair.a.ns.name,
            &self.guest,
            &cmdline("perf", self.reps),
            &log,
            &qmp,
            &file_disk(&disk),
            false,
        );
        wait_console(&log, "NOVACRON-BENCH-DONE", 900);
        wait_exit(&mut q, "qemu (local)", 30);
        self.record("local-qemu", collect(&log));
    }

    /// (a') the same through libvirt: a transient domain like the daemon's
    /// (tests its XML's machine), its disk a raw file with cache='none'.
    fn local_libvirt(&mut self) {
        let (disk, log) = (self.path_file("local-virsh.raw"), self.path_file("local-virsh.log"));
        raw_file(&disk, 1);
        let _ = std::fs::remove_file(&log);
        let name = format!("ncb-local-{}", std::process::id());
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>\
             <cmdline>{c}</cmdline></os><features><acpi/></features><on_poweroff>destroy</on_poweroff>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>\
             <source file='{d}'/><target dev='vda' bus='virtio'/></disk>\
             <serial type='file'><source path='{l}'/><target port='0'/></serial><memballoon model='none'/></devices></domain>",
            k = self.guest.join("vmlinuz").display(),
            i = self.guest.join("initramfs-bench.gz").display(),
            c = cmdline("perf", self.reps),
            d = disk.display(),
            l = log.display(),
        );
        let x = self.path_file("local-virsh.xml");
        std::fs::write(&x, xml).unwrap();
        let _guard = common::DomainGuard(vec![name.clone()]);
        sh_ok(Command::new("virsh").args(["-c", "qemu:///system", "create"]).arg(&x));
        wait_console(&log, "NOVACRON-BENCH-DONE", 900);
        self.record("local-libvirt", collect(&log));
    }

    /// (b) qemu-storage-daemon's vhost-user-blk export of a local raw file.
    fn vhost_qsd(&mut self, pair: &Pair) {
        let (disk, log, qmp, sock) = (
            self.path_file("qsd.raw"),
            self.path_file("qsd.log"),
            self.path_file("qsd.qmp"),
            self.path_file("qsd.sock"),
        );
        raw_file(&disk, 1);
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&sock);
        let qsd = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={},cache.direct=on,aio=threads", disk.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ))
            .spawn()
            .expect("qemu-storage-daemon");
        common::wait_for("the vhost-user socket", 20, || sock.exists());
        let dev = vec![
            "-chardev".into(),
            format!("socket,id=c0,path={}", sock.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=c0".into(),
        ];
        let mut q = qemu(&pair.a.ns.name, &self.guest, &cmdline("perf", self.reps), &log, &qmp, &dev, false);
        wait_console(&log, "NOVACRON-BENCH-DONE", 900);
        wait_exit(&mut q, "qemu (vhost-user)", 30);
        kill(qsd);
        self.record("vhost-user-qsd", collect(&log));
    }

    /// (f) QEMU's write-blocking mirror of a local raw file to a
    /// qemu-storage-daemon NBD export in namespace B, over the veth; the
    /// guest runs once the job is ready (it starts paused).
    fn qemu_mirror(&mut self, pair: &Pair) {
        let (disk, target, log, qmp) = (
            self.path_file("mirror-src.raw"),
            self.b_dir.join("ncb-mirror-dst.raw"),
            self.path_file("mirror.log"),
            self.path_file("mirror.qmp"),
        );
        raw_file(&disk, 1);
        raw_file(&target, 1);
        let _ = std::fs::remove_file(&log);
        let host = pair.b.addrs[0].to_string();
        let port = (common::api_port() + 9).to_string();
        let qsd = pair
            .b
            .ns
            .command("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=t0,filename={},cache.direct=on,aio=threads",
                target.display()
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=inet,addr.host={host},addr.port={port}"))
            .arg("--export")
            .arg("type=nbd,id=e0,node-name=t0,name=ncb,writable=on")
            .spawn()
            .expect("qemu-storage-daemon (nbd)");
        std::thread::sleep(Duration::from_millis(500));
        // -no-shutdown: QEMU (and QMP) outlive the guest's power-off, so
        // the job can be checked after the last fio run.
        let mut args = file_disk(&disk);
        args.push("-no-shutdown".into());
        let mut q = qemu(&pair.a.ns.name, &self.guest, &cmdline("perf", self.reps), &log, &qmp, &args, true);
        let mut m = Qmp::connect(&qmp);
        m.cmd(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "m0", "export": "ncb",
                   "server": {"type": "inet", "host": host, "port": port}}),
        );
        m.cmd(
            "blockdev-mirror",
            json!({"job-id": "mir", "device": "d0", "target": "m0", "sync": "full",
                   "copy-mode": "write-blocking"}),
        );
        let t0 = Instant::now();
        loop {
            let jobs = m.cmd("query-block-jobs", json!({}));
            if jobs[0]["ready"] == true {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "mirror not ready: {jobs}");
            std::thread::sleep(Duration::from_millis(100));
        }
        say(format!("mirror ready after {:?}; guest resumed", t0.elapsed()));
        m.cmd("cont", json!({}));
        wait_console(&log, "NOVACRON-BENCH-DONE", 900);
        // Still mirroring to the end (an error would have ended the job).
        let jobs = m.cmd("query-block-jobs", json!({}));
        say(format!("mirror job at the end: {jobs}"));
        assert_eq!(jobs[0]["ready"], true, "{jobs}");
        let _ = writeln!(m.w, "{}", json!({"execute": "quit"}));
        drop(m);
        wait_exit(&mut q, "qemu (mirror)", 30);
        kill(qsd);
        self.record("qemu-mirror-nbd", collect(&log));
    }

    /// (c)-(e) our VM on A with `mode`: created, its (sparse) disk synced,
    /// booted, deleted.
    async fn ours(&mut self, pair: &Pair, mode: &str) {
        let name = format!("ncb-{mode}-{}", std::process::id());
        let _guard = common::DomainGuard(vec![name.clone()]);
        let boot = pair.a.daemon.data().join("boot");
        let spec = json!({
            "name": name, "vcpus": 1, "memory_mib": 512, "disks": [{"size_gib": 1}],
            "replication": {"mode": mode},
            "boot": {"kernel": boot.join("vmlinuz"), "initrd": boot.join("initramfs-bench.gz"),
                     "cmdline": cmdline("perf", self.reps)}
        });
        let vm = post(&pair.a, "/v1/vms", spec).await;
        let id = vm["id"].as_str().unwrap().to_string();
        if mode != "off" {
            until_repl(&pair.a, &id, "initial sync", 120, |r| r["disks"][0]["peer"] == "up_to_date").await;
        }
        post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
        let log = pair.a.daemon.data().join("logs").join(format!("{name}.{id}.console.log"));
        wait_console(&log, "NOVACRON-BENCH-DONE", 900);
        let v = get(&pair.a, &format!("/v1/vms/{id}")).await;
        say(format!("{mode}: replication at the end: {}", v["replication"]));
        let m = metrics(&pair.a, &id).await;
        say(format!("{mode}: metrics of the disk: {m:?}"));
        self.results.entry("metrics").or_insert_with(|| json!({}))[mode] = json!(m);
        self.record(&format!("ours-{mode}"), collect(&log));
        delete_vm(&pair.a, &id).await;
    }
}

/// The `novacron_disk_replica_*` samples of VM `id` in A's `/metrics`.
async fn metrics(n: &Node, id: &str) -> Vec<String> {
    let (_, body) = call(&n.local(), Method::GET, "/metrics", None).await;
    body.as_str()
        .unwrap_or("")
        .lines()
        .filter(|l| {
            l.contains(&format!("vm_id=\"{id}\"")) && l.starts_with("novacron_disk_replica_write_wait")
        })
        .map(String::from)
        .collect()
}

async fn delete_vm(n: &Node, id: &str) {
    let t0 = Instant::now();
    loop {
        let v = get(n, &format!("/v1/vms/{id}")).await;
        if v["state"] != "running" {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = call(&n.local(), Method::POST, &format!("/v1/vms/{id}/stop"), None).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, v) = call(&n.local(), Method::DELETE, &format!("/v1/vms/{id}"), None).await;
    assert!(s.is_success(), "DELETE {id}: {s} {v}");
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

/// Seconds `cmd` took (it must succeed).
fn timed(cmd: &mut Command) -> f64 {
    let t0 = Instant::now();
    sh_ok(cmd);
    t0.elapsed().as_secs_f64()
}

/// Part 2: a disk of `mib` MiB of random data (an image's raw copy),
/// synced to B; against a TLS 1.3 copy of the same file from A's namespace
/// to B's (socat with OpenSSL at both ends, B writing it to a file and
/// fdatasync) and `cat`.
async fn initial_sync(b: &mut Bench, pair: &Pair, mib: u64) {
    let import = pair.a.daemon.dir.join("import");
    std::fs::create_dir_all(&import).unwrap();
    let file = import.join("ncb-random.raw");
    say(format!("writing {mib} MiB of random data"));
    sh_ok(
        Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none"])
            .arg(format!("count={mib}"))
            .arg(format!("of={}", file.display())),
    );
    let bytes = mib << 20;
    let mut r = serde_json::Map::new();
    r.insert("bytes".into(), json!(bytes));
    let cat: Vec<f64> = (0..3)
        .map(|_| timed(Command::new("sh").arg("-c").arg(format!("cat '{}' > /dev/null", file.display()))))
        .collect();
    let dd: Vec<f64> = (0..3)
        .map(|_| {
            timed(Command::new("dd").arg(format!("if={}", file.display())).args([
                "of=/dev/null",
                "bs=1M",
                "iflag=direct",
                "status=none",
            ]))
        })
        .collect();
    say(format!("cat: {cat:?} s; dd iflag=direct: {dd:?} s"));
    r.insert("cat_s".into(), json!(cat));
    r.insert("dd_direct_s".into(), json!(dd));

    // TLS 1.3 copy A -> B.
    let certs = b.dir.join("ncb-tls");
    std::fs::create_dir_all(&certs).unwrap();
    let (cert, key) = (certs.join("cert.pem"), certs.join("key.pem"));
    common::self_signed_cert(&cert, &key, "ncb", 1);
    let host = pair.b.addrs[0].to_string();
    let port = common::api_port() + 8;
    let out = b.b_dir.join("ncb-tls.out");
    let mut tls = Vec::new();
    for round in 0..3 {
        let _ = std::fs::remove_file(&out);
        let mut rx = pair
            .b
            .ns
            .command("sh")
            .arg("-c")
            .arg(format!(
                "socat -u OPENSSL-LISTEN:{port},bind={host},reuseaddr,cert={c},key={k},verify=0,openssl-min-proto-version=TLS1.3 - \
                 | dd of={o} bs=1M iflag=fullblock conv=fdatasync status=none",
                c = cert.display(),
                k = key.display(),
                o = out.display()
            ))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        let tx = pair
            .a
            .ns
            .command("socat")
            .arg("-u")
            .arg(format!("FILE:{}", file.display()))
            .arg(format!("OPENSSL:{host}:{port},verify=0,openssl-min-proto-version=TLS1.3"))
            .output()
            .unwrap();
        assert!(tx.status.success(), "socat sender: {}", String::from_utf8_lossy(&tx.stderr));
        assert!(rx.wait().unwrap().success(), "socat receiver");
        let s = t0.elapsed().as_secs_f64();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), bytes, "TLS copy size");
        say(format!("TLS copy {round}: {s:.3} s, {:.1} MiB/s", mib as f64 / s));
        tls.push(s);
    }
    let _ = std::fs::remove_file(&out);
    r.insert("tls_s".into(), json!(tls));

    // The image on both nodes first (B copies images itself), so that its
    // copy does not share the link with the disk sync.
    post(&pair.a, "/v1/images", json!({"name": "ncbrandom", "path": file})).await;
    let t0 = Instant::now();
    loop {
        let (s, v) = call(&pair.b.local(), Method::GET, "/v1/images/ncbrandom", None).await;
        if s.is_success() && v["file"] == "present" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "image not on B: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(format!("image present on B after {:?}", t0.elapsed()));
    let mut syncs = Vec::new();
    for round in 0..3 {
        let name = format!("ncb-sync{round}-{}", std::process::id());
        let _guard = common::DomainGuard(vec![name.clone()]);
        let vm = post(
            &pair.a,
            "/v1/vms",
            json!({"name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"image": "ncbrandom"}],
                   "replication": {"mode": "sync"}}),
        )
        .await;
        let id = vm["id"].as_str().unwrap().to_string();
        let t0 = Instant::now();
        let mut peak = 0f64;
        loop {
            let v = get(&pair.a, &format!("/v1/vms/{id}")).await;
            let d = &v["replication"]["disks"][0];
            if let Some(rate) = d["sync"]["rate_bytes_per_sec"].as_f64() {
                peak = peak.max(rate);
            }
            if d["peer"] == "up_to_date" {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(600), "sync: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let polled = t0.elapsed().as_secs_f64();
        // The data plane's own account: bytes and seconds of the full sync.
        let dp = std::fs::read_to_string(pair.a.daemon.data().join("logs/dataplane.log")).unwrap();
        let line = dp
            .lines()
            .rev()
            .find(|l| l.contains(&format!("VM_ID={id}")) && l.contains("sync to the peer done"))
            .unwrap_or_else(|| panic!("no sync done line for {id}:\n{dp}"))
            .to_string();
        let field = |k: &str| -> Option<f64> {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(&format!("{k}=")))
                .map(|v| v.trim_matches('"'))
                .and_then(|v| v.parse().ok())
        };
        let (sb, ss) = (field("BYTES").unwrap_or(f64::NAN), field("seconds").unwrap_or(f64::NAN));
        say(format!("initial sync {round}: {sb} bytes in {ss} s (data plane), polled {polled:.2} s, peak rate {peak:.0} B/s; {line}"));
        syncs.push(json!({"bytes": sb, "seconds": ss, "polled_s": polled, "peak_rate": peak}));
        delete_vm(&pair.a, &id).await;
    }
    r.insert("syncs".into(), json!(syncs));
    b.results.insert("sync".into(), Value::Object(r));
    b.save();
    let _ = std::fs::remove_file(&file);
}

/// Part 3: an async VM writing `rate` MiB/s for `secs` s (lag sampled every
/// 250 ms), then an outage: both links cut, 64 MiB written, links back,
/// the delta resync's bytes.
async fn lag_and_outage(b: &mut Bench, pair: &Pair, rate: u64, secs: u64) {
    let name = format!("ncb-lag-{}", std::process::id());
    let _guard = common::DomainGuard(vec![name.clone()]);
    let boot = pair.a.daemon.data().join("boot");
    let cmd = format!(
        "console=ttyS0 panic=-1 quiet novacron.bench=lag,outage novacron.rate={rate} novacron.secs={secs}"
    );
    let vm = post(
        &pair.a,
        "/v1/vms",
        json!({"name": name, "vcpus": 1, "memory_mib": 512, "disks": [{"size_gib": 1}],
               "replication": {"mode": "async", "max_lag_seconds": 30},
               "boot": {"kernel": boot.join("vmlinuz"), "initrd": boot.join("initramfs-bench.gz"), "cmdline": cmd}}),
    )
    .await;
    let id = vm["id"].as_str().unwrap().to_string();
    until_repl(&pair.a, &id, "initial sync", 120, |r| r["disks"][0]["peer"] == "up_to_date").await;
    post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
    let log = pair.a.daemon.data().join("logs").join(format!("{name}.{id}.console.log"));
    wait_console(&log, "NOVACRON-BENCH-LAG-START", 300);
    let (mut lag_s, mut lag_b) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    while !console_has(&log, "NOVACRON-BENCH-LAG-END") {
        let v = get(&pair.a, &format!("/v1/vms/{id}")).await;
        let d = &v["replication"]["disks"][0];
        lag_s.push(d["lag_seconds"].as_f64().unwrap_or(f64::NAN));
        lag_b.push(d["lag_bytes"].as_f64().unwrap_or(f64::NAN));
        assert!(t0.elapsed() < Duration::from_secs(secs + 120), "lag phase did not end");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let lag_job = jobs(&log).into_iter().find(|j| j.job == "lag");
    let max = |v: &[f64]| v.iter().cloned().fold(0f64, f64::max);
    say(format!(
        "lag: {} samples, median {:.3} s / {:.0} B, max {:.3} s / {:.0} B; guest wrote {:?}",
        lag_s.len(),
        median(&lag_s),
        median(&lag_b),
        max(&lag_s),
        max(&lag_b),
        lag_job
    ));
    let mut r = serde_json::Map::new();
    r.insert("rate_mib".into(), json!(rate));
    r.insert("lag_seconds".into(), json!(lag_s));
    r.insert("lag_bytes".into(), json!(lag_b));
    if let Some(j) = lag_job {
        r.insert("guest_bytes".into(), json!(j.bytes));
        r.insert("guest_ms".into(), json!(j.ms));
    }

    wait_console(&log, "NOVACRON-BENCH-OUTAGE-READY", 120);
    let settled =
        until_repl(&pair.a, &id, "caught up before the outage", 60, |r| r["disks"][0]["lag_bytes"] == 0)
            .await;
    let before = settled["replication"]["disks"][0]["sync_bytes_total"].as_u64().unwrap();
    pair.cut(0);
    pair.cut(1);
    let cut = Instant::now();
    say(format!("links cut {:?} after OUTAGE-READY (the guest waits 10 s)", cut.elapsed()));
    wait_console(&log, "NOVACRON-BENCH-OUTAGE-WRITTEN", 120);
    // Restored before the data plane gave the link up (its ack timeout),
    // TCP would deliver the backlog and no resync would run: wait for it.
    let down =
        until_repl(&pair.a, &id, "the link given up", 60, |r| r["disks"][0]["connected"] == false).await;
    say(format!("before the restore: {}", down["replication"]));
    let dirty = down["replication"]["disks"][0]["dirty_bytes"].as_u64();
    pair.restore(0);
    pair.restore(1);
    let t1 = Instant::now();
    let back = until_repl(&pair.a, &id, "delta resync", 120, |r| {
        r["disks"][0]["peer"] == "up_to_date" && r["disks"][0]["connected"] == true
    })
    .await;
    let after = back["replication"]["disks"][0]["sync_bytes_total"].as_u64().unwrap();
    let written = jobs(&log).into_iter().find(|j| j.job == "outage").map(|j| j.bytes);
    say(format!(
        "outage: {:?} down; guest wrote {written:?} bytes; dirty {dirty:?}; resync sent {} bytes, up to date {:?} after the restore",
        t1.duration_since(cut),
        after - before,
        t1.elapsed()
    ));
    r.insert("outage_written".into(), json!(written));
    r.insert("outage_dirty".into(), json!(dirty));
    r.insert("resync_bytes".into(), json!(after - before));
    r.insert("resync_s".into(), json!(t1.elapsed().as_secs_f64()));
    b.results.insert("lag".into(), Value::Object(r));
    b.save();
    delete_vm(&pair.a, &id).await;
}

/// Part 4: the tiny guest (sync) moved A -> B -> A ... `n` times.
async fn moves(b: &mut Bench, pair: &Pair, n: u64) {
    let name = format!("ncb-move-{}", std::process::id());
    let _guard = common::DomainGuard(vec![name.clone()]);
    let boot = pair.a.daemon.data().join("boot");
    let vm = post(
        &pair.a,
        "/v1/vms",
        json!({"name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"size_gib": 1}],
               "replication": {"mode": "sync"}, "shutdown_timeout_secs": 10,
               "boot": {"kernel": boot.join("vmlinuz"), "initrd": boot.join("initramfs.gz"),
                        "cmdline": "console=ttyS0 panic=-1 quiet"}}),
    )
    .await;
    let id = vm["id"].as_str().unwrap().to_string();
    until_repl(&pair.a, &id, "initial sync", 120, |r| r["disks"][0]["peer"] == "up_to_date").await;
    post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
    let mut runs = Vec::new();
    let nodes = [&pair.a, &pair.b];
    for i in 0..n as usize {
        let (from, to) = (nodes[i % 2], nodes[(i + 1) % 2]);
        let log = from.daemon.data().join("logs").join(format!("{name}.{id}.console.log"));
        // Booted (the power button works) and protected.
        common::wait_for("the guest up", 180, || {
            std::fs::read_to_string(&log).unwrap_or_default().matches("NOVACRON-GUEST-UP").count() > i / 2
        });
        until_repl(from, &id, "protected", 60, |r| r["protection"] == "protected").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t0 = Instant::now();
        let m = post(from, &format!("/v1/vms/{id}/move"), json!(null)).await;
        let took = t0.elapsed().as_secs_f64();
        say(format!("move {i}: {m} ({took:.3} s for the call)"));
        runs.push(json!({"shutdown_ms": m["shutdown_ms"], "downtime_ms": m["downtime_ms"], "call_s": took,
                         "started": m["started"]}));
        let v = get(to, &format!("/v1/vms/{id}")).await;
        assert_eq!(v["state"], "running", "{v}");
    }
    b.results.insert("moves".into(), json!(runs));
    b.save();
    let last = nodes[n as usize % 2];
    delete_vm(last, &id).await;
}

fn fmt_ms_range(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    format!("{:.0} ({:.0}-{:.0})", median(v), lo, hi)
}

/// The markdown table of part 1 (medians, ranges, ratios to local-qemu).
fn perf_table(results: &Value) -> String {
    let perf = &results["perf"];
    let Some(paths) = perf.as_object() else { return String::new() };
    let get = |p: &str, job: &str, i: usize| -> Vec<f64> {
        perf[p][job].as_array().map(|a| a.iter().filter_map(|r| r[i].as_f64()).collect()).unwrap_or_default()
    };
    // What a VM gets without us (docs/performance.md): the local file
    // under libvirt, `cache='none'`.
    let base = |job: &str, i: usize| median(&get("local-libvirt", job, i));
    let mut t = String::from(
        "| path | 1 MiB x 128 + fsync, ms | ratio | 4 KiB QD1 IOPS | ratio | 4 KiB QD32 IOPS | ratio |\n|---|---|---|---|---|---|---|\n",
    );
    for p in paths.keys() {
        let seq = get(p, "seq1m", 0);
        let q1 = get(p, "rand4k-qd1", 1);
        let q32 = get(p, "rand4k-qd32", 1);
        t.push_str(&format!(
            "| {p} | {} | {:.2} | {} | {:.2} | {} | {:.2} |\n",
            fmt_ms_range(&seq),
            base("seq1m", 0) / median(&seq),
            fmt_ms_range(&q1),
            median(&q1) / base("rand4k-qd1", 1),
            fmt_ms_range(&q32),
            median(&q32) / base("rand4k-qd32", 1),
        ));
    }
    t
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let started = Instant::now();
    let reps = env_or("BENCH_REPS", 3);
    let base = PathBuf::from(std::env::var("NOVACRON_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let dir = base.join(format!("ncb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let guest = PathBuf::from(
        std::env::var("NOVACRON_GUEST_DIR").unwrap_or_else(|_| "/var/tmp/novacron-guest".into()),
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-guest.sh");
    sh_ok(Command::new("bash").arg(&script).arg("--bench").arg(&guest));
    // BENCH_B_DIR (disk.sh): B's own file system. Sharing one ext4 with A
    // is not what two hosts do: A's metadata fdatasync then waited for B's
    // buffered replica data in the same journal commit (50-156 ms a time).
    let b_dir = match std::env::var_os("BENCH_B_DIR") {
        Some(d) => PathBuf::from(d).join(format!("ncb-b-{}", std::process::id())),
        None => dir.clone(),
    };
    std::fs::create_dir_all(&b_dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&b_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut b = Bench {
        dir: dir.clone(),
        b_dir: b_dir.clone(),
        guest: guest.clone(),
        reps,
        results: serde_json::Map::new(),
    };
    b.results.insert("started".into(), json!(chrono_now()));
    let uname = sh_ok(Command::new("uname").arg("-r"));
    let qv = sh_ok(Command::new("qemu-system-x86_64").arg("--version"));
    b.results.insert("host".into(), json!({"kernel": uname.trim(), "qemu": qv.lines().next(), "nproc": sh_ok(&mut Command::new("nproc")).trim()}));

    let separate = b_dir != dir;
    if separate {
        std::fs::create_dir_all(b_dir.join("node")).unwrap();
        std::fs::set_permissions(b_dir.join("node"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    b.results.insert("b_own_fs".into(), json!(separate));
    let pair = Pair::start("ncb", |node| Opts {
        extra: "[dataplane]\nsync_rate_mib = 0\n".into(),
        data_dir: (node == "b" && separate).then(|| b_dir.join("node")),
        ..Opts::qemu(1)
    });
    pair_up(&pair).await;
    for n in [&pair.a, &pair.b] {
        let boot = n.daemon.data().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        for f in ["vmlinuz", "initramfs.gz", "initramfs-bench.gz"] {
            std::fs::copy(guest.join(f), boot.join(f)).unwrap();
        }
    }
    say(format!("paired: A {} B {}", pair.a.ns.name, pair.b.ns.name));

    if wanted("BENCH_ONLY", "perf") {
        // Interleaved (local first and last): drift across the run shows.
        let paths = [
            "local-qemu",
            "ours-off",
            "ours-async",
            "ours-sync",
            "qemu-mirror-nbd",
            "vhost-user-qsd",
            "local-libvirt",
        ];
        for p in paths {
            if !wanted("BENCH_PATHS", p) {
                continue;
            }
            say(format!("part 1: {p}"));
            match p {
                "local-qemu" => b.local_qemu(&pair),
                "local-libvirt" => b.local_libvirt(),
                "vhost-user-qsd" => b.vhost_qsd(&pair),
                "qemu-mirror-nbd" => b.qemu_mirror(&pair),
                "ours-off" => b.ours(&pair, "off").await,
                "ours-async" => b.ours(&pair, "async").await,
                "ours-sync" => b.ours(&pair, "sync").await,
                _ => unreachable!(),
            }
        }
    }
    if wanted("BENCH_ONLY", "sync") {
        say("part 2: initial sync");
        initial_sync(&mut b, &pair, env_or("BENCH_SYNC_MIB", 1024)).await;
    }
    if wanted("BENCH_ONLY", "lag") {
        say("part 3: async lag and outage");
        lag_and_outage(&mut b, &pair, env_or("BENCH_LAG_RATE", 50), env_or("BENCH_LAG_SECS", 20)).await;
    }
    if wanted("BENCH_ONLY", "move") {
        say("part 4: planned moves");
        moves(&mut b, &pair, env_or("BENCH_MOVES", 4)).await;
    }
    b.results.insert("seconds".into(), json!(started.elapsed().as_secs()));
    b.save();
    let results = Value::Object(b.results.clone());
    println!("{}", perf_table(&results));
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
    say(format!("done in {:?}", started.elapsed()));
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
}
