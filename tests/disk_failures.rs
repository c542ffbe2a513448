//! Failures of replicated VM disks between two real daemons in network
//! namespaces (tests/common/pair.rs): what the peer's replica holds after
//! the primary host dies (sync: every acknowledged record; async: a prefix
//! within the lag limit), a death in the middle of a delta resync (the
//! pre-resync image comes back), and hostile frames from a peer holding
//! the paired certificate against the real data plane (refused, nothing
//! written).

mod common;

use common::disk::{get, pair_up, post, sha256, until_repl};
use common::pair::{Node, Pair};
use common::Opts;
use novacron::cluster::disk_frame::{
    split, DiskMsg, DiskRef, RejectReason, DISK_WIRE_VERSION, MAX_CHUNK, MAX_DISK_FRAME,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// The data plane's config on `n` (dataplane.json, written by its daemon).
fn dataplane_config(n: &Node) -> Value {
    let p = n.daemon.data().join("dataplane.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn dataplane_log(n: &Node) -> String {
    std::fs::read_to_string(n.daemon.data().join("logs").join("dataplane.log")).unwrap_or_default()
}

/// A client that speaks the data planes' protocol with whatever
/// certificate it is given: the peer gone rogue.
struct Rogue {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

/// What the other side did with a frame.
#[derive(Debug)]
enum Answer {
    Msg(DiskMsg),
    /// It closed the connection (or reset it): why, as the client saw it.
    Closed(#[allow(dead_code)] String),
    /// Nothing within the wait.
    Silent,
}

impl Rogue {
    async fn connect(addr: std::net::SocketAddr, tls: Arc<rustls::ClientConfig>) -> std::io::Result<Rogue> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
        Ok(Rogue { stream, buf: Vec::new() })
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn send(&mut self, msg: &DiskMsg) -> std::io::Result<()> {
        self.send_raw(&msg.encode()).await
    }

    async fn answer(&mut self, wait: Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match split(&self.buf, usize::MAX >> 1) {
                Ok(Some((msg, used))) => {
                    self.buf.drain(..used);
                    return Answer::Msg(msg);
                }
                Ok(None) => {}
                Err(e) => panic!("undecodable answer: {e}"),
            }
            let mut chunk = [0u8; 16 << 10];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Answer::Silent,
                Ok(Ok(0)) => return Answer::Closed("eof".into()),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Answer::Closed(e.to_string()),
            }
        }
    }

    /// Connects and says Hello as `node_id`; the answer to it.
    async fn hello(
        addr: std::net::SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        node_id: Uuid,
    ) -> (Option<Rogue>, Answer) {
        let mut r = match Rogue::connect(addr, tls).await {
            Ok(r) => r,
            Err(e) => return (None, Answer::Closed(e.to_string())),
        };
        if let Err(e) = r.send(&DiskMsg::Hello { wire: DISK_WIRE_VERSION as u32, node_id }).await {
            return (None, Answer::Closed(e.to_string()));
        }
        let a = r.answer(Duration::from_secs(10)).await;
        (Some(r), a)
    }
}

fn rejected(a: &Answer) -> Option<RejectReason> {
    match a {
        Answer::Msg(DiskMsg::Rejected { reason, .. }) => Some(*reason),
        _ => None,
    }
}

/// Hostile frames, each on a connection of its own that passed mutual TLS
/// with A's own certificate (the test reads A's data dir): every one is
/// refused (`Rejected` with its reason, or the connection closed), logged,
/// and B's replica and its metadata are byte for byte what they were. A
/// certificate that is not the paired one does not get past TLS.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_peer_frames_are_refused_and_change_nothing() {
    let t0 = Instant::now();
    let pair = Pair::start("dfhost", |_| Opts::test_driver(1));
    pair_up(&pair).await;
    let spec = json!({
        "name": "dfhost", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}],
        "replication": {"mode": "sync"}
    });
    let vm = post(&pair.a, "/v1/vms", spec).await;
    let id = vm["id"].as_str().unwrap().to_string();
    let vm_id: Uuid = id.parse().unwrap();
    until_repl(&pair.a, &id, "initial sync", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;
    until_repl(&pair.b, &id, "B's replica", 30, |r| {
        r["disks"][0]["local"] == "up_to_date" && r["disks"][0]["connected"] == true
    })
    .await;

    let cfg_a = dataplane_config(&pair.a);
    let export = cfg_a["disks"].as_array().unwrap().iter().find(|d| d["vm"] == id.as_str()).unwrap().clone();
    let (epoch, size) = (export["epoch"].as_u64().unwrap(), export["size_bytes"].as_u64().unwrap());
    let node_a: Uuid = cfg_a["node_id"].as_str().unwrap().parse().unwrap();
    let b_addr: std::net::SocketAddr = cfg_a["peer"]["addresses"][0].as_str().unwrap().parse().unwrap();
    let b_fp = cfg_a["peer"]["fingerprint"].as_str().unwrap().to_string();
    let (chain, key) = novacron::tls::load_pem(
        Path::new(cfg_a["tls"]["cert"].as_str().unwrap()),
        Path::new(cfg_a["tls"]["key"].as_str().unwrap()),
    )
    .unwrap();
    let alpn = novacron::dataplane::peer::ALPN;
    let as_a = novacron::tls::mutual_client_config(&b_fp, chain, key, alpn).unwrap();
    let stranger = {
        let k = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["stranger".into()]).unwrap().self_signed(&k).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(k.serialize_der().into());
        novacron::tls::mutual_client_config(&b_fp, vec![c.der().clone()], key, alpn).unwrap()
    };

    let replica = pair.b.daemon.data().join("disks").join(&id).join("vda.raw");
    let meta = PathBuf::from(format!("{}.meta", replica.display()));
    let before = (sha256(&replica), sha256(&meta));
    let refusals_before = dataplane_log(&pair.b).matches("refused a frame of the peer").count();
    eprintln!("B's replica {} (epoch {epoch}, {size} bytes): {before:?}", replica.display());

    let vda = DiskRef { vm: vm_id, device: "vda".into() };
    let block = vec![0xA5u8; 4096];
    let data = |seq: u64, offset: u64, data: Vec<u8>| DiskMsg::Data { disk: vda.clone(), seq, offset, data };
    let attach = |epoch: u64| DiskMsg::Attach { disk: vda.clone(), epoch, size_bytes: size, generation: 1 };
    // (what, frames sent after Hello, the reason B must refuse the last with).
    let mut cases: Vec<(&str, Vec<DiskMsg>, RejectReason)> = vec![
        // First, while A's own data plane holds this replica attached: a
        // frame of another connection must not ride on that attachment.
        ("data before attach", vec![data(1 << 40, 1 << 20, block.clone())], RejectReason::NotAttached),
        (
            "attach of an unknown VM",
            vec![DiskMsg::Attach {
                disk: DiskRef { vm: Uuid::new_v4(), device: "vda".into() },
                epoch,
                size_bytes: size,
                generation: 1,
            }],
            RejectReason::UnknownDisk,
        ),
        (
            "data for an unknown VM",
            vec![DiskMsg::Data {
                disk: DiskRef { vm: Uuid::new_v4(), device: "vda".into() },
                seq: 1,
                offset: 0,
                data: block.clone(),
            }],
            RejectReason::UnknownDisk,
        ),
        (
            "attach of an unknown disk of the VM",
            vec![DiskMsg::Attach {
                disk: DiskRef { vm: vm_id, device: "vdz".into() },
                epoch,
                size_bytes: size,
                generation: 1,
            }],
            RejectReason::UnknownDisk,
        ),
        (
            "flush before attach",
            vec![DiskMsg::Flush { disk: vda.clone(), seq: 1 << 40 }],
            RejectReason::NotAttached,
        ),
        (
            "sync begin before attach",
            vec![DiskMsg::SyncBegin {
                disk: vda.clone(),
                kind: novacron::cluster::disk_frame::SyncKind::Full,
                total_bytes: size,
            }],
            RejectReason::NotAttached,
        ),
        (
            "offset beyond the end",
            vec![attach(epoch), data(1 << 40, size, block.clone())],
            RejectReason::OutOfRange,
        ),
        (
            "range across the end",
            vec![attach(epoch), data(1 << 40, size - 2048, block.clone())],
            RejectReason::OutOfRange,
        ),
        (
            "offset that wraps around",
            vec![attach(epoch), data(1 << 40, u64::MAX - 2047, block.clone())],
            RejectReason::OutOfRange,
        ),
        (
            "misaligned offset",
            vec![attach(epoch), data(1 << 40, 4096 + 100, block.clone())],
            RejectReason::Misaligned,
        ),
        (
            "misaligned length",
            vec![attach(epoch), data(1 << 40, 4096, vec![0xA5; 1000])],
            RejectReason::Misaligned,
        ),
        ("empty data", vec![attach(epoch), data(1 << 40, 4096, Vec::new())], RejectReason::Misaligned),
        (
            "chunk over the limit in a frame within it",
            vec![attach(epoch), data(1 << 40, 0, vec![0xA5; MAX_CHUNK + 512])],
            RejectReason::Oversized,
        ),
    ];
    if epoch > 0 {
        cases.push(("stale epoch", vec![attach(epoch - 1)], RejectReason::StaleEpoch));
        cases.push((
            "data after a stale-epoch attach",
            vec![attach(epoch - 1), data(1 << 40, 1 << 20, block.clone())],
            RejectReason::NotAttached,
        ));
    }
    let n_cases = cases.len();

    let (as_a2, stranger2) = (as_a.clone(), stranger.clone());
    let results = pair.a.ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut out = Vec::new();
            for (what, frames, want) in cases {
                let (r, hello) = Rogue::hello(b_addr, as_a2.clone(), node_a).await;
                assert!(matches!(hello, Answer::Msg(DiskMsg::HelloOk { .. })), "{what}: hello: {hello:?}");
                let mut r = r.unwrap();
                let mut last = Answer::Silent;
                for f in &frames {
                    r.send(f).await.unwrap();
                    last = r.answer(Duration::from_secs(10)).await;
                    if let DiskMsg::Attach { epoch: e, .. } = f {
                        if f != frames.last().unwrap() && *e == epoch {
                            assert!(
                                matches!(last, Answer::Msg(DiskMsg::Attached { .. })),
                                "{what}: attach: {last:?}"
                            );
                        }
                    }
                }
                out.push((what.to_string(), format!("{last:?}"), rejected(&last) == Some(want)));
            }
            // A frame whose header announces more than the limit: closed
            // on the header alone (the body is never sent, nor waited for).
            let (r, _) = Rogue::hello(b_addr, as_a2.clone(), node_a).await;
            let mut r = r.unwrap();
            r.send_raw(&((MAX_DISK_FRAME as u32 + 1).to_be_bytes())).await.unwrap();
            let a = r.answer(Duration::from_secs(10)).await;
            out.push(("frame over the limit".into(), format!("{a:?}"), matches!(a, Answer::Closed(_))));
            let (r, _) = Rogue::hello(b_addr, as_a2.clone(), node_a).await;
            let mut r = r.unwrap();
            r.send_raw(&u32::MAX.to_be_bytes()).await.unwrap();
            let a = r.answer(Duration::from_secs(10)).await;
            out.push(("frame of 4 GiB".into(), format!("{a:?}"), matches!(a, Answer::Closed(_))));
            // Hello as another node, with A's certificate.
            let (_, a) = Rogue::hello(b_addr, as_a2.clone(), Uuid::new_v4()).await;
            out.push((
                "hello as another node".into(),
                format!("{a:?}"),
                matches!(a, Answer::Msg(DiskMsg::Refused { .. }) | Answer::Closed(_)),
            ));
            // A certificate that is not the paired one: no HelloOk ever.
            let (_, a) = Rogue::hello(b_addr, stranger2, node_a).await;
            out.push((
                "certificate not the paired one".into(),
                format!("{a:?}"),
                matches!(a, Answer::Closed(_)),
            ));
            out
        })
    });
    for (what, answer, ok) in &results {
        eprintln!("{what}: {answer}");
        assert!(ok, "{what}: not refused as it should be: {answer}\n{}", dataplane_log(&pair.b));
    }
    // Each refusal is logged by B's data plane, with its reason.
    let log = dataplane_log(&pair.b);
    let refusals = log.matches("refused a frame of the peer").count() - refusals_before;
    assert!(refusals >= n_cases, "{refusals} refusals logged for {n_cases} refused frames:\n{log}");
    assert!(
        log.contains("data-plane TLS handshake refused"),
        "the stranger's handshake is not logged:\n{log}"
    );
    assert_eq!((sha256(&replica), sha256(&meta)), before, "B's replica or its metadata changed");
    // The real pair is unharmed: B's copy is still current, and A's data
    // plane (superseded by the rogue's Attach, so its connection closed)
    // attached again.
    until_repl(&pair.b, &id, "B's replica attached to A again", 30, |r| {
        r["disks"][0]["local"] == "up_to_date" && r["disks"][0]["connected"] == true
    })
    .await;
    until_repl(&pair.a, &id, "A's view", 30, |r| r["disks"][0]["peer"] == "up_to_date").await;
    eprintln!("hostile frames: {:.1} s", t0.elapsed().as_secs_f64());
}

/// A new replicated VM on A whose record has not reached B (the peer link's
/// port blocked on both nodes, the data planes' own port open): B refuses
/// its `Attach` (no replica kept here). Only that disk waits and attaches
/// again each second; the connection stays up, so the VM already
/// replicating stays connected and up to date. Once the link is back B
/// learns of the VM and its replica syncs.
#[tokio::test(flavor = "multi_thread")]
async fn an_attach_refused_for_a_new_disk_leaves_the_others_connected() {
    let t0 = Instant::now();
    let pair = Pair::start("dfnew", |_| Opts::test_driver(1));
    pair_up(&pair).await;
    let create = |name: &str| {
        json!({
            "name": name, "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}],
            "replication": {"mode": "sync"}
        })
    };
    let first = post(&pair.a, "/v1/vms", create("dfnew-0")).await["id"].as_str().unwrap().to_string();
    until_repl(&pair.a, &first, "initial sync", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;
    let port = common::link_port().to_string();
    for n in [&pair.a, &pair.b] {
        for dir in ["--dport", "--sport"] {
            let out = n.exec("iptables", &["-A", "INPUT", "-p", "tcp", dir, &port, "-j", "DROP"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let second = post(&pair.a, "/v1/vms", create("dfnew-1")).await["id"].as_str().unwrap().to_string();
    let refusal = format!("no replica of {second}/vda is kept here");
    common::wait_for("B refusing the new disk's Attach a few times", 60, || {
        dataplane_log(&pair.b).matches(&refusal).count() >= 3
    });
    let v = until_repl(&pair.a, &first, "the first VM connected", 30, |r| {
        r["disks"][0]["peer"] == "up_to_date" && r["disks"][0]["connected"] == true
    })
    .await;
    let log = dataplane_log(&pair.a);
    assert!(!log.contains("the peer rejected a frame"), "a refused Attach dropped the connection:\n{log}");
    eprintln!("while B lacks the record: {}", v["replication"]);
    for n in [&pair.a, &pair.b] {
        pair.clear_loss(n);
    }
    until_repl(&pair.a, &second, "the new VM's sync", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;
    until_repl(&pair.a, &first, "the first VM", 10, |r| r["disks"][0]["peer"] == "up_to_date").await;
    eprintln!("refused attach: {:.1} s", t0.elapsed().as_secs_f64());
}

/// The seed of a randomized test: `NOVACRON_SEED` or the clock; printed so
/// that a failing run can be repeated.
fn seed(test: &str) -> novacron::cluster::SeededRng {
    let seed = std::env::var("NOVACRON_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: seed {seed} (NOVACRON_SEED={seed} repeats it)");
    novacron::cluster::SeededRng::new(seed)
}

/// A uniform draw in `lo..hi` (milliseconds).
fn between(rng: &mut novacron::cluster::SeededRng, lo: u64, hi: u64) -> u64 {
    lo + rng.next_u64() % (hi - lo).max(1)
}

/// A VM on A writing records, replicated to B.
struct Writer {
    name: String,
    id: String,
    console: PathBuf,
    /// B's replica of its disk.
    replica: PathBuf,
}

impl Writer {
    fn printed(&self) -> Vec<u64> {
        common::disk::printed(&self.console).0
    }
}

/// Creates and starts a VM on A writing `novacron.records` (more than a
/// run writes) with replication `mode`; returns once B's replica is up to
/// date (before the guest boots).
async fn start_writer(pair: &Pair, name: &str, replication: Value, boot: &(PathBuf, PathBuf)) -> Writer {
    let spec = json!({
        "name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"size_gib": 1}],
        "replication": replication,
        "boot": {"kernel": boot.0, "initrd": boot.1,
                 "cmdline": "console=ttyS0 panic=-1 quiet novacron.records=1000000"}
    });
    let vm = post(&pair.a, "/v1/vms", spec).await;
    let id = vm["id"].as_str().unwrap().to_string();
    until_repl(&pair.a, &id, "initial sync", 60, |r| r["disks"][0]["peer"] == "up_to_date").await;
    until_repl(&pair.b, &id, "B's replica", 30, |r| r["disks"][0]["local"] == "up_to_date").await;
    post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
    Writer {
        name: name.into(),
        console: pair.a.daemon.data().join("logs").join(format!("{name}.{id}.console.log")),
        replica: pair.b.daemon.data().join("disks").join(&id).join("vda.raw"),
        id,
    }
}

/// PID of the data plane serving `data_dir` (its command line names that
/// data dir's dataplane.json).
fn dataplane_pid(data_dir: &Path) -> Option<i32> {
    let want = data_dir.join("dataplane.json").display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is = args.contains(&&b"dataplane"[..]) && args.contains(&want.as_bytes());
        is.then_some(pid)
    })
}

fn qemu_pid(name: &str) -> Option<i32> {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).ok()?.trim().parse().ok()
}

/// The death of host A: SIGKILL to the QEMU of each of `vms`, A's data
/// plane and its API daemon, one right after the other (nothing of A runs
/// a line of code in between that a dead host would not), then waits
/// until they are gone (so the consoles' logs are final).
fn kill_host_a(pair: &mut Pair, vms: &[&Writer]) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut pids: Vec<i32> = vms.iter().map(|w| qemu_pid(&w.name).expect("QEMU's pid file")).collect();
    pids.push(dataplane_pid(&pair.a.daemon.data()).expect("A's data plane runs"));
    pids.push(pair.a.daemon.pid() as i32);
    for &p in &pids {
        kill(Pid::from_raw(p), Signal::SIGKILL).unwrap();
    }
    pair.a.daemon.kill9();
    common::wait_for("A's processes gone", 20, || {
        pids.iter().all(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        })
    });
    for w in vms {
        common::wait_domain_gone(&w.name);
    }
}

/// What B's replica holds of a writer's records: the length of the prefix
/// 0..k of records it holds, after checking that nothing else is there (no
/// torn record, no record after a hole) within `span` slots.
fn replica_prefix(w: &Writer, span: u64) -> u64 {
    use common::disk::Slot;
    let slots = common::disk::slots(&w.replica, span);
    let torn: Vec<usize> = slots.iter().enumerate().filter(|s| *s.1 == Slot::Torn).map(|s| s.0).collect();
    assert!(torn.is_empty(), "{}: torn records on B's replica: {torn:?}", w.name);
    let k = slots.iter().position(|s| *s != Slot::Record).unwrap_or(slots.len()) as u64;
    let after: Vec<u64> = (k..span).filter(|&i| slots[i as usize] == Slot::Record).take(10).collect();
    assert!(after.is_empty(), "{}: records {after:?} on B's replica after the hole at {k}", w.name);
    k
}

/// `POST /v1/peer/takeover {"force": true}` on B (A is dead): `ws` are B's
/// now, from up-to-date replicas; the first boots on B (its guest writes
/// its records from 0 again, the same bytes) and B's copy still holds every
/// record A's guest printed.
async fn take_over_and_boot(pair: &Pair, ws: &[Writer]) {
    let held: Vec<(u64, u64)> = ws
        .iter()
        .map(|w| (w.printed().len() as u64, replica_prefix(w, w.printed().len() as u64 + 256)))
        .collect();
    let (s, report) =
        common::call(&pair.b.local(), hyper::Method::POST, "/v1/peer/takeover", Some(json!({"force": true})))
            .await;
    assert!(s.is_success(), "takeover: {s} {report}");
    for w in ws {
        let mine = report["vms"].as_array().unwrap().iter().find(|v| v["id"] == w.id.as_str()).cloned();
        let mine = mine.unwrap_or_else(|| panic!("{} not in the takeover report: {report}", w.name));
        assert_eq!(mine["replica"], "up_to_date", "{report}");
        assert!(mine["result"] == "taken_over" || mine["result"] == "started", "{report}");
    }
    let w = &ws[0];
    let v = get(&pair.b, &format!("/v1/vms/{}", w.id)).await;
    if v["state"] != "running" {
        post(&pair.b, &format!("/v1/vms/{}/start", w.id), json!(null)).await;
    }
    let console = pair.b.daemon.data().join("logs").join(format!("{}.{}.console.log", w.name, w.id));
    let deadline = Instant::now() + Duration::from_secs(240);
    while common::disk::printed(&console).0.len() < 10 {
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            let tail: String = text
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "{}: the replica did not boot and write on B within 240 s; VM: {}\nconsole tail:\n{tail}\nB's data plane log:\n{}",
                w.name,
                get(&pair.b, &format!("/v1/vms/{}", w.id)).await,
                dataplane_log(&pair.b)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let disk =
        PathBuf::from(get(&pair.b, &format!("/v1/vms/{}", w.id)).await["disks"][0]["path"].as_str().unwrap());
    let (printed, k) = held[0];
    let now = common::disk::slots(&disk, printed);
    assert!(
        now.iter().all(|s| *s == common::disk::Slot::Record),
        "{}: after the takeover and boot on B, records 0..{printed} are not all on its disk: {now:?}",
        w.name
    );
    eprintln!(
        "takeover on B: {} VMs taken over; {} booted on B, its disk holds the {printed} records A's guest printed (0..{k} at A's death)",
        ws.len(),
        w.name
    );
}

/// Async mode's bound on the loss in the RPO rounds.
const ASYNC_MAX_LAG: u64 = 5;

/// RPO 0 in sync mode: at random moments (seeded) host A dies (its QEMU,
/// data plane and API daemon killed together), in some runs just after
/// both links were cut (before the ack timeout lets A go on degraded);
/// every record the guest printed is on B's replica, which holds exactly a
/// prefix of the sequence. Two sync VMs a round, and a third in async mode
/// (the same deaths, the guests' boots shared): its replica also holds a
/// prefix with no hole or torn record, and what it lacks was printed within
/// its `max_lag_seconds` before the death. A restarts between rounds.
/// After the last death the operator takes over on B and one of the
/// replicas boots there.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn sync_mode_loses_no_acknowledged_write_when_the_primary_host_dies() {
    let t0 = Instant::now();
    let mut rng = seed("sync RPO");
    let mut pair = Pair::start("dfrpo", |_| Opts::qemu(1));
    pair_up(&pair).await;
    let boot = common::install_guest(&pair.a.daemon.data().join("boot"));
    let rounds = 5;
    // Two sync writers and one async.
    let per_round = 3;
    let names: Vec<String> =
        (0..rounds * per_round).map(|i| format!("dfrpo-{}-{i}", std::process::id())).collect();
    let _cleanup = common::DomainGuard(names.clone());
    let (mut runs, mut async_runs) = (0, 0);
    for round in 0..rounds {
        let mut ws = Vec::new();
        for i in 0..per_round {
            let name = &names[round * per_round + i];
            let repl = if i == 2 {
                json!({"mode": "async", "max_lag_seconds": ASYNC_MAX_LAG})
            } else {
                json!({"mode": "sync"})
            };
            ws.push(start_writer(&pair, name, repl, &boot).await);
        }
        // Each past its first records: streaming, protected. When and how
        // many give the async guest's record rate.
        let mut firsts = Vec::new();
        for w in &ws {
            common::wait_for("the guest's first records", 240, || w.printed().len() >= 20);
            firsts.push((Instant::now(), w.printed().len()));
            until_repl(&pair.a, &w.id, "protected", 20, |r| r["protection"] == "protected").await;
        }
        let cut = rng.next_u64() % 2 == 1;
        let wait = between(&mut rng, 0, 4000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let after_cut = if cut {
            pair.cut(0);
            pair.cut(1);
            // Below the 2 s ack timeout: A has acknowledged nothing B lacks.
            let ms = between(&mut rng, 0, 1500);
            std::thread::sleep(Duration::from_millis(ms));
            Some(ms)
        } else {
            None
        };
        let killed = Instant::now();
        kill_host_a(&mut pair, &ws.iter().collect::<Vec<_>>());
        for (i, w) in ws.iter().enumerate() {
            let printed = w.printed();
            let last = printed.last().copied().unwrap_or(0);
            assert_eq!(printed, (0..printed.len() as u64).collect::<Vec<_>>(), "{}: console", w.name);
            let k = replica_prefix(w, last + 256);
            let n = printed.len() as u64;
            let how = after_cut.map_or(String::new(), |ms| format!(", links cut {ms} ms before"));
            if i == 2 {
                let (t, at) = firsts[i];
                let rate = (n - at as u64) as f64 / killed.duration_since(t).as_secs_f64();
                let lost = n.saturating_sub(k);
                let lost_s = lost as f64 / rate;
                eprintln!(
                    "round {round} {} (async): A killed {wait} ms into the run{how}; {n} records printed at {rate:.0}/s, B holds records 0..{k}: {lost} lost, {lost_s:.2} s of writes",
                    w.name
                );
                assert!(
                    lost_s <= ASYNC_MAX_LAG as f64,
                    "{}: async lost {lost} records ({lost_s:.2} s at {rate:.0}/s), more than max_lag_seconds {ASYNC_MAX_LAG}",
                    w.name
                );
                async_runs += 1;
                continue;
            }
            eprintln!(
                "round {round} {}: A killed {wait} ms into the run{how}; {n} records printed, B holds records 0..{k}",
                w.name
            );
            assert!(k >= n, "{}: the guest printed records 0..{n} but B's replica holds only 0..{k}", w.name);
            runs += 1;
        }
        if round + 1 == rounds {
            // The last death is final: the operator takes over on B, and
            // the last VM's replica boots there.
            take_over_and_boot(&pair, &ws).await;
            break;
        }
        if cut {
            pair.restore(0);
            pair.restore(1);
        }
        pair.a.daemon.restart();
        common::disk::until_link_up(&pair.a).await;
    }
    assert_eq!((runs, async_runs), (10, 5));
    eprintln!("sync RPO: {runs} sync and {async_runs} async runs in {:.0} s", t0.elapsed().as_secs_f64());
}

/// The 4 KiB blocks in which two files of the same size differ.
fn differing_blocks(a: &Path, b: &Path) -> Vec<u64> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    assert_eq!(fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut out = Vec::new();
    let mut at = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return out;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if x != y {
                out.push(at / 4096 + i as u64);
            }
        }
        at += n as u64;
    }
}

/// Kills `n`'s API daemon and then its data plane (so the daemon cannot
/// restart it), leaving its files as they are.
fn stop_node(n: &mut Node) {
    use nix::sys::signal::{kill, Signal};
    n.daemon.kill9();
    if let Some(p) = dataplane_pid(&n.daemon.data()) {
        kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL).unwrap();
        // Gone or a zombie (its command line empties earlier, with its
        // memory). A zombie leader may still have threads holding the
        // files: `open_when_free` waits for those.
        common::wait_for("the data plane gone", 20, || {
            std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |st| {
                st.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
        });
    }
}

/// Opens B's replica as its data plane does, once the killed data plane's
/// threads have all exited and closed the metadata (its lock): a leader
/// already a zombie may still have threads that hold the files. Names the
/// holders if that takes long.
fn open_when_free(replica: &Path, size: u64, id: &str) -> novacron::dataplane::replica::Replica {
    use novacron::dataplane::replica::{Replica, ReplicaError};
    let t0 = Instant::now();
    loop {
        match Replica::open(replica, size, id.parse().unwrap(), "vda") {
            Err(ReplicaError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::WouldBlock
                    && t0.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                let holders = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("find /proc/[0-9]*/fd -lname '{}.meta' 2>/dev/null", replica.display()))
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                panic!("cannot open {}: {e}; open by: {holders}", replica.display())
            }
            Ok(r) => return r,
        }
    }
}

/// Host A dies in the middle of a delta resync (throttled with tbf so the
/// kill lands inside it): B's replica says `syncing`, and that only the
/// pre-resync copy can be had back, with force; the rollback without force
/// is refused, with force it gives back B's image from before the resync
/// byte for byte, whose records are a prefix of the sequence.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn primary_death_mid_resync_leaves_only_the_pre_resync_copy_with_force() {
    let t0 = Instant::now();
    let mut rng = seed("death mid-resync");
    let mut pair = Pair::start("dfresync", |_| Opts::qemu(1));
    pair_up(&pair).await;
    let boot = common::install_guest(&pair.a.daemon.data().join("boot"));
    let name = format!("dfresync-{}", std::process::id());
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    let w = start_writer(&pair, &name, json!({"mode": "sync"}), &boot).await;
    common::wait_for("the guest's first records", 240, || w.printed().len() >= 30);
    until_repl(&pair.a, &w.id, "protected", 20, |r| r["protection"] == "protected").await;

    // An outage under writes: A goes on degraded, its dirty blocks grow.
    let at_cut = w.printed().len() as u64;
    pair.cut(0);
    pair.cut(1);
    until_repl(&pair.a, &w.id, "peer outdated", 30, |r| r["disks"][0]["peer"] == "outdated").await;
    common::wait_for("writes during the outage", 120, || w.printed().len() as u64 >= at_cut + 300);
    // B's copy as the resync will find it: consistent, records 0..k (kept
    // aside as a sparse copy). The frames in flight at the cut may still
    // reach B when the link returns, on the old connection, before the
    // resync: a few more records of the same sequence.
    let pre = w.replica.with_extension("pre-resync");
    let cp = std::process::Command::new("cp").arg("--sparse=always").arg(&w.replica).arg(&pre).status();
    assert!(cp.unwrap().success());
    let k_pre = replica_prefix(&w, at_cut + 1024);
    assert!(k_pre >= at_cut, "B's replica holds 0..{k_pre} of the {at_cut} records printed before the cut");
    // The resync through a slow link (what A sends, on both links).
    for l in 0..2 {
        pair.shape(&pair.a, l, "200kbit", "400ms");
    }
    pair.restore(0);
    pair.restore(1);
    let v = until_repl(&pair.b, &w.id, "B syncing", 60, |r| r["disks"][0]["local"] == "syncing").await;
    eprintln!("B during the resync: {}", v["replication"]);
    let ms = between(&mut rng, 0, 3000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    // Inside the resync at the kill: connected and sending it (a throttled
    // link that stalled past the ack timeout reconnects and resumes).
    let a_view = until_repl(&pair.a, &w.id, "A inside the resync", 120, |r| {
        let d = &r["disks"][0];
        d["connected"] == true && d["peer"] == "syncing" && d["sync"]["kind"] == "delta"
    })
    .await;
    eprintln!("killing A {ms} ms into the resync: {}", a_view["replication"]["disks"][0]);
    kill_host_a(&mut pair, &[&w]);

    // B says what is left: a broken resync, the old copy only with force.
    let v =
        until_repl(&pair.b, &w.id, "B's replica detached", 30, |r| r["disks"][0]["connected"] == false).await;
    let d = &v["replication"]["disks"][0];
    eprintln!("B after A's death: {d}");
    assert_eq!(d["local"], "syncing", "{v}");
    let detail = d["detail"].as_str().unwrap();
    assert!(detail.contains("pre-resync") && detail.contains("force"), "{v}");
    assert_ne!(v["replication"]["protection"], "protected", "{v}");

    // No API drives the rollback yet: B's daemon and data plane stopped,
    // the replica opened as its data plane opens it.
    stop_node(&mut pair.b);
    use novacron::cluster::ReplicaState;
    use novacron::dataplane::replica::ReplicaError;
    let size = std::fs::metadata(&w.replica).unwrap().len();
    let mut r = open_when_free(&w.replica, size, &w.id);
    assert_eq!(r.state(), ReplicaState::Syncing);
    assert!(r.has_undo());
    assert!(
        matches!(r.rollback_to_consistent(false), Err(ReplicaError::RollbackNeedsForce)),
        "a rollback without force"
    );
    assert_eq!(r.rollback_to_consistent(true).unwrap(), ReplicaState::Outdated);
    drop(r);
    let k = replica_prefix(&w, at_cut + 1024);
    let differ = differing_blocks(&pre, &w.replica);
    eprintln!(
        "rolled back: records 0..{k}; 0..{k_pre} before the link returned; blocks changed since: {differ:?}"
    );
    let late: Vec<u64> = (k_pre..k).map(|n| common::disk::record_offset(n) / 4096).collect();
    assert!(k - k_pre <= 4, "B's replica holds 0..{k} after the rollback, 0..{k_pre} before the resync");
    assert_eq!(differ, late, "the rolled-back replica is not the pre-resync image (plus the late records)");
    let _ = std::fs::remove_file(&pre);
    let r = open_when_free(&w.replica, size, &w.id);
    assert_eq!(r.state(), ReplicaState::Outdated);
    assert!(!r.has_undo());
    eprintln!("death mid-resync: {:.0} s", t0.elapsed().as_secs_f64());
}
