//! State replication between two real daemons in network namespaces
//! (tests/common/pair.rs), over the real peer link: tokens, networks and
//! VMs made on either node reach the other, the stream resumes after cuts
//! and `kill -9` of either side with no duplicate and no gap, and a name
//! conflict made during a cut is resolved and reported.

mod common;

use common::pair::{Node, Pair};
use common::{call, Opts};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

async fn get(n: &Node, path: &str) -> Value {
    let (s, v) = call(&n.local(), Method::GET, path, None).await;
    assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
    v
}

async fn post(n: &Node, path: &str, body: Value) -> Value {
    let (s, v) = call(&n.local(), Method::POST, path, Some(body)).await;
    assert!(s.is_success(), "POST {path}: {s} {v}");
    v
}

async fn node_id(n: &Node) -> String {
    get(n, "/v1/host").await["node_id"].as_str().unwrap().to_string()
}

/// Pairs B with A over link 0 and waits for the link on both sides.
async fn pair_up(pair: &Pair) {
    let v = post(&pair.a, "/v1/peer/invite", json!({})).await;
    post(&pair.b, "/v1/peer/join", json!({ "code": v["code"] })).await;
    for n in [&pair.a, &pair.b] {
        until(n, "link up", 15, |n| async move { get(n, "/v1/peer").await["link"]["state"] == "up" }).await;
    }
}

async fn until<'a, F, Fut>(n: &'a Node, what: &str, secs: u64, f: F)
where
    F: Fn(&'a Node) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f(n).await {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s\n{}", n.daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What must be the same on both nodes: token names and roles, networks,
/// VMs with owner, epoch and specs (not their observed state).
async fn state(n: &Node) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in get(n, "/v1/tokens").await["tokens"].as_array().unwrap() {
        out.insert(format!("token {} {} {}", t["name"], t["role"], t["id"]));
    }
    for net in get(n, "/v1/networks").await["networks"].as_array().unwrap() {
        out.insert(format!("network {} {} {}", net["name"], net["kind"], net["subnet"]));
    }
    for vm in get(n, "/v1/vms").await["vms"].as_array().unwrap() {
        out.insert(format!(
            "vm {} {} owner {} epoch {} vcpus {} mem {}",
            vm["name"], vm["id"], vm["owner_node"], vm["epoch"], vm["vcpus"], vm["memory_mib"]
        ));
    }
    out
}

/// Waits until both nodes hold the same state; returns it and the time.
async fn converge(pair: &Pair, secs: u64) -> (BTreeSet<String>, Duration) {
    let t0 = Instant::now();
    loop {
        let (a, b) = (state(&pair.a).await, state(&pair.b).await);
        if a == b {
            return (a, t0.elapsed());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "no convergence in {secs} s:\nonly on A: {:?}\nonly on B: {:?}\n--- A log:\n{}\n--- B log:\n{}",
            a.difference(&b).collect::<Vec<_>>(),
            b.difference(&a).collect::<Vec<_>>(),
            pair.a.daemon.log(),
            pair.b.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn db(n: &Node) -> rusqlite::Connection {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let c = rusqlite::Connection::open_with_flags(n.daemon.data().join("state.db"), flags).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// The stream from `from` to `to` in `to`'s store: the seqs of `from`'s
/// changes applied there from its feed are one dense run (no gap; the
/// store's unique index forbids a duplicate, counted anyway), ending at
/// `from`'s newest change, which is also `to`'s mark.
async fn check_stream(from: &Node, to: &Node) -> (u64, u64) {
    let origin = node_id(from).await;
    let newest: i64 = db(from)
        .query_row("SELECT COALESCE(MAX(origin_seq), 0) FROM changes WHERE origin = ?1", [&origin], |r| {
            r.get(0)
        })
        .unwrap();
    let t = db(to);
    let mut stmt = t.prepare("SELECT origin_seq FROM changes WHERE origin = ?1 ORDER BY origin_seq").unwrap();
    let seqs: Vec<i64> = stmt.query_map([&origin], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    let mark: i64 = t
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM applied WHERE origin = ?1", [&origin], |r| r.get(0))
        .unwrap();
    let distinct: BTreeSet<_> = seqs.iter().collect();
    assert_eq!(distinct.len(), seqs.len(), "a change applied twice: {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "a gap in the applied stream: {seqs:?}");
    assert_eq!(mark, newest, "the mark is not the sender's newest change");
    assert_eq!(seqs.last().copied().unwrap_or(mark), mark, "rows past the mark: {seqs:?}");
    (seqs.first().copied().unwrap_or(0) as u64, mark as u64)
}

async fn token(n: &Node, name: &str) -> Value {
    post(n, "/v1/tokens", json!({"name": name, "role": "operator"})).await
}

async fn vm(n: &Node, name: &str) -> Value {
    post(n, "/v1/vms", json!({"name": name, "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}]})).await
}

/// Both nodes change tokens, networks and VMs; everything converges, a token
/// made on A works on B, a VM made on A is B's replica owned by A; then the
/// stream resumes after a cut of both links, `kill -9` of A and of B, with
/// changes made meanwhile, and each stream is dense; a token `ops` made on
/// both sides during a cut ends as `ops` and `ops-<id>` on both, reported
/// by health on both.
#[tokio::test(flavor = "multi_thread")]
async fn state_converges_both_ways_and_resumes_after_cuts_and_kill9() {
    let mut pair = Pair::test_driver("repl");
    pair_up(&pair).await;
    let (ida, idb) = (node_id(&pair.a).await, node_id(&pair.b).await);
    // Seeding: both `admin` tokens (one renamed) on both nodes.
    let (s, took) = converge(&pair, 20).await;
    eprintln!("seeded both ways in {} ms: {} records", took.as_millis(), s.len());
    assert_eq!(s.iter().filter(|l| l.starts_with("token \"admin")).count(), 2, "{s:?}");

    // Creates on both sides.
    let ta = token(&pair.a, "made-on-a").await;
    token(&pair.b, "made-on-b").await;
    post(&pair.b, "/v1/networks", json!({"name": "net-b", "kind": "nat", "subnet": "10.231.7.0/24"})).await;
    let va = vm(&pair.a, "vm-a").await;
    let vb = vm(&pair.b, "vm-b").await;
    let t0 = Instant::now();
    let (s, _) = converge(&pair, 20).await;
    eprintln!("5 creates replicated in {} ms", t0.elapsed().as_millis());
    for want in ["made-on-a", "made-on-b", "net-b", "vm-a", "vm-b"] {
        assert!(s.iter().any(|l| l.contains(&format!("\"{want}\""))), "{want} missing: {s:?}");
    }
    // A token made on A works on B (over the veth, from A's namespace).
    let secret = ta["secret"].as_str().unwrap();
    let (st, host) = pair.a.call_to(&pair.b, 0, Some(secret), Method::GET, "/v1/host", None);
    assert_eq!(st, StatusCode::OK, "{host}");
    assert_eq!(host["node_id"], idb.as_str());
    // A VM made on A is on B, owned by A; B may not operate it.
    let on_b = get(&pair.b, &format!("/v1/vms/{}", va["id"].as_str().unwrap())).await;
    assert_eq!(on_b["owner_node"], ida.as_str(), "{on_b}");
    let (st, v) =
        call(&pair.b.local(), Method::POST, &format!("/v1/vms/{}/start", va["id"].as_str().unwrap()), None)
            .await;
    assert_eq!((st, common::error_code(&v)), (StatusCode::CONFLICT, "not_owner"), "{v}");

    // Edits and deletes, both sides: B's VM resized on B, A's token revoked
    // on B (tokens are site-wide), A's VM deleted on A.
    let (st, v) = call(
        &pair.b.local(),
        Method::PATCH,
        &format!("/v1/vms/{}", vb["id"].as_str().unwrap()),
        Some(json!({"vcpus": 2})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = call(&pair.b.local(), Method::DELETE, "/v1/tokens/made-on-a", None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (st, v) =
        call(&pair.a.local(), Method::DELETE, &format!("/v1/vms/{}", va["id"].as_str().unwrap()), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let (s, _) = converge(&pair, 20).await;
    assert!(!s.iter().any(|l| l.contains("\"made-on-a\"") || l.contains("\"vm-a\"")), "{s:?}");
    assert!(s.iter().any(|l| l.contains("\"vm-b\"") && l.contains("vcpus 2")), "{s:?}");
    let (st, _) = pair.a.call_to(&pair.b, 0, Some(secret), Method::GET, "/v1/host", None);
    assert_eq!(st, StatusCode::UNAUTHORIZED, "a token revoked on B still works on B");
    check_stream(&pair.a, &pair.b).await;
    check_stream(&pair.b, &pair.a).await;

    // A cut of both links; both sides change, both make a token `ops`.
    pair.cut(0);
    pair.cut(1);
    for n in [&pair.a, &pair.b] {
        until(n, "link down", 10, |n| async move { get(n, "/v1/peer").await["link"]["state"] == "down" })
            .await;
    }
    for i in 0..20 {
        token(&pair.a, &format!("cut-a-{i}")).await;
        token(&pair.b, &format!("cut-b-{i}")).await;
    }
    token(&pair.a, "ops").await;
    token(&pair.b, "ops").await;
    // While down, A's lag is what B has not acknowledged, and its age
    // grows with nothing else happening.
    let lag = get(&pair.a, "/v1/peer").await["replication"].clone();
    assert!(lag["lag_records"].as_u64().unwrap() >= 21, "{lag}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let later = get(&pair.a, "/v1/peer").await["replication"].clone();
    let grew = later["lag_seconds"].as_f64().unwrap() - lag["lag_seconds"].as_f64().unwrap();
    assert!(grew >= 1.4, "{lag} then {later}");
    pair.restore(0);
    pair.restore(1);
    let (s, took) = converge(&pair, 30).await;
    eprintln!("after the cut: converged {} ms after the links came back", took.as_millis());
    let ops: Vec<_> = s.iter().filter(|l| l.starts_with("token \"ops")).collect();
    assert_eq!(ops.len(), 2, "both `ops` kept, one renamed: {ops:?}");
    assert!(
        ops.iter().any(|l| l.starts_with("token \"ops\" "))
            && ops.iter().any(|l| l.starts_with("token \"ops-")),
        "{ops:?}"
    );
    for n in [&pair.a, &pair.b] {
        let h = get(n, "/v1/health/details").await;
        let c = h["checks"].as_array().unwrap().iter().find(|c| c["name"] == "conflicts").unwrap().clone();
        assert_eq!(c["status"], "warning", "{c}");
        assert!(c["message"].as_str().unwrap().contains("\"ops\""), "{c}");
        // Logged with the peer's id, like the resume.
        let log = n.daemon.log();
        let logged = |what: &str| log.lines().any(|l| l.contains(what) && l.contains("PEER_ID="));
        assert!(logged("name conflict with the peer resolved: token \"ops\""), "{log}");
        assert!(logged("state replication resumes from its mark"), "{log}");
    }
    check_stream(&pair.a, &pair.b).await;
    check_stream(&pair.b, &pair.a).await;

    // kill -9 of each side in turn while the other keeps changing.
    for victim in 0..2 {
        let name = ["A", "B"][victim];
        {
            let (dead, alive) = if victim == 0 { (&mut pair.a, &pair.b) } else { (&mut pair.b, &pair.a) };
            dead.daemon.kill9();
            for i in 0..10 {
                token(alive, &format!("while-{name}-dead-{i}")).await;
            }
            dead.daemon.restart();
        }
        for i in 0..10 {
            token(&pair.a, &format!("after-{name}-a-{i}")).await;
            token(&pair.b, &format!("after-{name}-b-{i}")).await;
        }
        let (s, took) = converge(&pair, 30).await;
        eprintln!(
            "kill -9 of {name}: converged {} ms after the restart ({} records)",
            took.as_millis(),
            s.len()
        );
        let (from_a, mark_a) = check_stream(&pair.a, &pair.b).await;
        let (from_b, mark_b) = check_stream(&pair.b, &pair.a).await;
        eprintln!("streams dense: A->B {from_a}..={mark_a}, B->A {from_b}..={mark_b}");
    }
    // Caught up: no lag on either side, in the API and the metrics.
    for n in [&pair.a, &pair.b] {
        until(n, "lag 0", 10, |n| async move { get(n, "/v1/peer").await["replication"]["lag_records"] == 0 })
            .await;
        let (_, m) = call(&n.local(), Method::GET, "/metrics", None).await;
        let m = m.as_str().unwrap();
        assert!(m.contains("\nnovacron_peer_replication_lag_records 0\n"), "{m}");
        assert!(m.contains("\nnovacron_peer_replication_lag_seconds 0.000\n"), "{m}");
        // And nothing stalled the stream: the peer check is ok.
        let h = get(n, "/v1/health/details").await;
        let c = h["checks"].as_array().unwrap().iter().find(|c| c["name"] == "peer").unwrap().clone();
        assert_eq!(c["status"], "ok", "{c}");
    }
}

/// Both nodes keep changing while each drops 40 % of the packets it gets
/// on both links (iptables in the namespaces), and B's link is also
/// rate-limited: TCP retransmits, heartbeats go missing and the link may go
/// down and up; the streams still end dense and both nodes agree.
#[tokio::test(flavor = "multi_thread")]
async fn state_converges_over_lossy_slow_links() {
    let pair = Pair::test_driver("repllossy");
    pair_up(&pair).await;
    converge(&pair, 20).await;
    for n in [&pair.a, &pair.b] {
        pair.loss(n, 0, 0.4);
        pair.loss(n, 1, 0.4);
    }
    pair.shape(&pair.b, 0, "512kbit", "200ms");
    for i in 0..60 {
        token(&pair.a, &format!("lossy-a-{i}")).await;
        token(&pair.b, &format!("lossy-b-{i}")).await;
        if i % 20 == 0 {
            vm(&pair.a, &format!("lossy-vm-{i}")).await;
        }
    }
    let (s, took) = converge(&pair, 90).await;
    let (_, m) = call(&pair.a.local(), Method::GET, "/metrics", None).await;
    let downs = m
        .as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("novacron_peer_link_downs_total "))
        .map(str::to_string);
    eprintln!(
        "over 40 % loss: converged {} ms after the last change ({} records); A's {downs:?}",
        took.as_millis(),
        s.len()
    );
    assert!(s.iter().filter(|l| l.contains("\"lossy-")).count() >= 123, "{s:?}");
    for n in [&pair.a, &pair.b] {
        pair.clear_loss(n);
    }
    pair.clear_shape(&pair.b, 0);
    check_stream(&pair.a, &pair.b).await;
    check_stream(&pair.b, &pair.a).await;
}

/// A real QEMU (TCG) guest started on A shows on B as A's VM, running;
/// stopped on A, B does not start it, not even across a restart of B (both
/// daemons use the one system libvirt here, so B starting it would show).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn a_guest_running_on_a_is_a_replica_on_b_that_b_never_starts() {
    let mut pair = Pair::start("replguest", |_| Opts::qemu(1));
    pair_up(&pair).await;
    let ida = node_id(&pair.a).await;
    let (kernel, initrd) = common::install_guest(&pair.a.daemon.data().join("boot"));
    let name = format!("replguest-{}", std::process::id());
    let _cleanup = common::DomainGuard(vec![name.clone()]);
    let marker = format!("m{}", std::process::id());
    let spec = json!({
        "name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"size_gib": 1}],
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": format!("console=ttyS0 panic=-1 quiet novacron.marker={marker}")}
    });
    let vm = post(&pair.a, "/v1/vms", spec).await;
    let id = vm["id"].as_str().unwrap().to_string();
    post(&pair.a, &format!("/v1/vms/{id}/start"), json!(null)).await;
    let log = pair.a.daemon.data().join("logs").join(format!("{name}.{id}.console.log"));
    common::wait_for("the guest's marker", 120, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains(&format!("NOVACRON-MARKER={marker}"))
    });
    // On B: A's VM, in the state A reports.
    let path = format!("/v1/vms/{id}");
    until(&pair.b, "running on B's view", 20, |n| {
        let path = path.clone();
        async move { get(n, &path).await["state"] == "running" }
    })
    .await;
    let on_b = get(&pair.b, &path).await;
    assert_eq!(on_b["owner_node"], ida.as_str(), "{on_b}");
    // Stopped on A: B shows it stopped and never starts it.
    let (s, v) = call(&pair.a.local(), Method::POST, &format!("{path}/stop"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    until(&pair.b, "stopped on B's view", 20, |n| {
        let path = path.clone();
        async move { get(n, &path).await["state"] == "stopped" }
    })
    .await;
    pair.b.daemon.restart();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(common::virsh(&["domstate", &name]).contains("shut off"), "B started A's guest");
    let on_b = get(&pair.b, &path).await;
    assert_eq!(
        (on_b["state"].as_str(), on_b["owner_node"].as_str()),
        (Some("stopped"), Some(ida.as_str())),
        "{on_b}"
    );
}

/// `(origin_seq, at)` of `origin`'s change rows in `n`'s store from `first` on.
fn rows_at(n: &Node, origin: &str, first: i64) -> std::collections::BTreeMap<i64, i64> {
    let c = db(n);
    let mut stmt =
        c.prepare("SELECT origin_seq, at FROM changes WHERE origin = ?1 AND origin_seq >= ?2").unwrap();
    let rows = stmt.query_map(rusqlite::params![origin, first], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(Result::unwrap).collect()
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Replication lag from commit on A to applied on B, at offered rates of
/// token creations on A (open loop, at most 8 requests in flight over A's
/// socket). The lag of each change is B's row time minus A's (both daemons
/// on one host clock; each row is written inside its transaction, just
/// before the disk flush). Then a backlog made while the links are cut is
/// drained: the stream's own limit. `NOVACRON_BENCH_RATES` (default
/// `250,1000`, short for CI), `NOVACRON_BENCH_SECS` (3) and
/// `NOVACRON_BENCH_BACKLOG` (2000) tune it; docs/performance.md has a
/// longer run.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check: prints replication lag for docs/performance.md"]
async fn measure_replication_lag() {
    let pair = Pair::test_driver("replbench");
    pair_up(&pair).await;
    converge(&pair, 20).await;
    let ida = node_id(&pair.a).await;
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let rates: Vec<u64> =
        env("NOVACRON_BENCH_RATES", "250,1000").split(',').map(|r| r.trim().parse().unwrap()).collect();
    let secs: u64 = env("NOVACRON_BENCH_SECS", "3").parse().unwrap();
    let newest = |n: &Node| -> i64 {
        db(n)
            .query_row("SELECT COALESCE(MAX(origin_seq), 0) FROM changes WHERE origin = ?1", [&ida], |r| {
                r.get(0)
            })
            .unwrap()
    };
    for rate in rates {
        let first = newest(&pair.a) + 1;
        let n = rate * secs;
        let t0 = tokio::time::Instant::now();
        make_tokens(&pair.a, n, &format!("r{rate}"), Some(rate)).await;
        let took = t0.elapsed().as_secs_f64();
        let drain = caught_up(|| newest(&pair.b), newest(&pair.a)).await;
        let (on_a, on_b) = (rows_at(&pair.a, &ida, first), rows_at(&pair.b, &ida, first));
        let lags: Vec<i64> = on_a.iter().map(|(s, at)| on_b[s] - at).collect();
        let mut sorted = lags.clone();
        sorted.sort();
        // Growing lag: the median of the last fifth against the first fifth.
        let fifth = lags.len() / 5;
        let median = |v: &[i64]| {
            let mut v = v.to_vec();
            v.sort();
            v[v.len() / 2]
        };
        eprintln!(
            "offered {rate}/s: committed {} changes at {:.0}/s; lag ms p50 {} p90 {} p99 {} max {}; \
             median first fifth {} last fifth {}; B caught up {} ms after the last request",
            lags.len(),
            lags.len() as f64 / took,
            pct(&sorted, 0.5),
            pct(&sorted, 0.9),
            pct(&sorted, 0.99),
            sorted[sorted.len() - 1],
            median(&lags[..fifth]),
            median(&lags[lags.len() - fifth..]),
            drain.as_millis()
        );
    }
    // The stream's own limit: a backlog made while both links are cut,
    // drained once they are back; the rate is B's rows over their span.
    let backlog: u64 = env("NOVACRON_BENCH_BACKLOG", "2000").parse().unwrap();
    pair.cut(0);
    pair.cut(1);
    until(&pair.a, "link down", 10, |n| async move { get(n, "/v1/peer").await["link"]["state"] == "down" })
        .await;
    let first = newest(&pair.a) + 1;
    make_tokens(&pair.a, backlog, "backlog", None).await;
    let last = newest(&pair.a);
    pair.restore(0);
    pair.restore(1);
    let back = caught_up(|| newest(&pair.b), last).await;
    let on_b = rows_at(&pair.b, &ida, first);
    let span = on_b.values().max().unwrap() - on_b.values().min().unwrap();
    eprintln!(
        "backlog of {} changes: B applied them in {span} ms ({:.0}/s), caught up {} ms after the links came back",
        on_b.len(),
        on_b.len() as f64 * 1000.0 / span.max(1) as f64,
        back.as_millis()
    );
}

/// Creates `count` viewer tokens `PREFIX-i` on `n` over its socket, at most
/// 8 requests in flight; at `rate` per second (open loop) or as fast as
/// they go.
async fn make_tokens(n: &Node, count: u64, prefix: &str, rate: Option<u64>) {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..count {
        if let Some(rate) = rate {
            tokio::time::sleep_until(t0 + Duration::from_micros(i * 1_000_000 / rate)).await;
        }
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (c, name) = (n.local(), format!("{prefix}-{i}"));
        tasks.push(tokio::spawn(async move {
            let (s, v) =
                call(&c, Method::POST, "/v1/tokens", Some(json!({"name": name, "role": "viewer"}))).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until `newest_on_b()` reaches `last`; how long that took.
async fn caught_up(newest_on_b: impl Fn() -> i64, last: i64) -> Duration {
    let t1 = Instant::now();
    while newest_on_b() < last {
        assert!(t1.elapsed() < Duration::from_secs(120), "B did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t1.elapsed()
}

/// B's file of image `name`: (SHA-256, mode), if it exists.
fn image_file(n: &Node, name: &str) -> Option<(String, u32)> {
    use sha2::Digest;
    use std::os::unix::fs::PermissionsExt;
    let path = n.daemon.data().join("images").join(name);
    let data = std::fs::read(&path).ok()?;
    let mode = std::fs::metadata(&path).ok()?.permissions().mode() & 0o7777;
    Some((hex::encode(sha2::Sha256::digest(&data)), mode))
}

/// Hidden (temporary) files in `n`'s images folder.
fn hidden_files(n: &Node) -> Vec<String> {
    let dir = std::fs::read_dir(n.daemon.data().join("images")).unwrap();
    dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// `mib` MiB of random bytes in a file under `dir`: a raw "disk".
fn random_image(dir: &std::path::Path, name: &str, mib: usize) -> std::path::PathBuf {
    let mut data = vec![0u8; mib << 20];
    getrandom::getrandom(&mut data).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    path
}

fn upload(n: &Node, name: &str, file: &std::path::Path) -> String {
    let r = common::cli(&n.daemon, &["image", "upload", name, file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "upload {name}: {} {}", r.stdout, r.stderr);
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(file).unwrap()))
}

async fn file_state(n: &Node, name: &str) -> String {
    let (s, v) = call(&n.local(), Method::GET, &format!("/v1/images/{name}"), None).await;
    if s != StatusCode::OK {
        return "no record".into();
    }
    v["file"].as_str().unwrap_or("").to_string()
}

async fn metric(n: &Node, name: &str) -> f64 {
    let (_, m) = call(&n.local(), Method::GET, "/metrics", None).await;
    let text = m.as_str().unwrap().to_string();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// An image uploaded on A reaches B's images folder with the same SHA-256
/// and mode 0640; a VM made on A as an overlay on it has its base on B;
/// the same content under a second name is not sent again; a copy cut
/// mid-file (rate-limited link, both links down) leaves no partial file
/// under the image's name and ends with the right file once restored.
#[tokio::test(flavor = "multi_thread")]
async fn image_files_reach_the_peer_by_hash_and_survive_a_cut() {
    // Plain overlays on the image, not data-plane disks (those are full copies).
    let mut pair = Pair::start("replimg", |_| Opts {
        extra: "[dataplane]\ndefault_mode = \"off\"\n".into(),
        ..Opts::test_driver(1)
    });
    pair_up(&pair).await;
    let scratch = common::scratch_dir("replimg-files");
    let base = random_image(&scratch, "base.raw", 4);
    let sha = upload(&pair.a, "base", &base);
    until(&pair.b, "base present on B", 30, |n| async move { file_state(n, "base").await == "present" })
        .await;
    assert_eq!(image_file(&pair.b, "base"), Some((sha.clone(), 0o640)));
    assert_eq!(get(&pair.b, "/v1/images/base").await["sha256"], json!(sha));
    assert_eq!(metric(&pair.b, "novacron_peer_image_bytes_copied_total").await, (4 << 20) as f64);

    // A VM on A layered on the image: B holds its base.
    post(
        &pair.a,
        "/v1/vms",
        json!({"name": "on-base", "vcpus": 1, "memory_mib": 64, "disks": [{"image": "base"}]}),
    )
    .await;
    until(&pair.b, "the VM on B", 20, |n| async move {
        call(&n.local(), Method::GET, "/v1/vms/on-base", None).await.0 == StatusCode::OK
    })
    .await;
    let vm = get(&pair.b, "/v1/vms/on-base").await;
    let image = vm["disks"][0]["image"].as_str().unwrap_or_else(|| panic!("no image in {vm}"));
    let file = std::path::Path::new(image).file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(image_file(&pair.b, &file).map(|f| f.0), Some(sha.clone()), "B has the VM's base");

    // The same content again: linked on B, not copied.
    upload(&pair.a, "base-again", &base);
    until(
        &pair.b,
        "base-again present",
        30,
        |n| async move { file_state(n, "base-again").await == "present" },
    )
    .await;
    assert_eq!(metric(&pair.b, "novacron_peer_image_bytes_copied_total").await, (4 << 20) as f64);
    // Deleted on A: the file goes on B, the other name of that content stays.
    let (s, v) = call(&pair.a.local(), Method::DELETE, "/v1/images/base-again", None).await;
    assert!(s.is_success(), "{s} {v}");
    until(&pair.b, "base-again gone", 20, |n| async move { image_file(n, "base-again").is_none() }).await;
    assert_eq!(image_file(&pair.b, "base").map(|f| f.0), Some(sha.clone()));

    // A slow copy, cut on both links in the middle. Both of A's links are
    // shaped: the link (and the bulk connection with it) may run over
    // either.
    for link in 0..2 {
        pair.shape(&pair.a, link, "16mbit", "50ms");
    }
    let big = random_image(&scratch, "big.raw", 12);
    let big_sha = upload(&pair.a, "big", &big);
    until(&pair.b, "copying big", 30, |n| async move { file_state(n, "big").await == "copying" }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(file_state(&pair.b, "big").await, "copying", "still copying after 2 s at 16 Mbit/s");
    pair.cut(0);
    pair.cut(1);
    until(&pair.b, "link down", 15, |n| async move { get(n, "/v1/peer").await["link"]["state"] != "up" })
        .await;
    assert_eq!(file_state(&pair.b, "big").await, "missing");
    assert!(image_file(&pair.b, "big").is_none(), "a partial file under the image's name");
    let leftovers = hidden_files(&pair.b);
    assert!(leftovers.is_empty(), "temporary files left after the cut: {leftovers:?}");
    pair.restore(0);
    pair.restore(1);
    let t0 = Instant::now();
    until(
        &pair.b,
        "big present after the cut",
        60,
        |n| async move { file_state(n, "big").await == "present" },
    )
    .await;
    eprintln!(
        "big (12 MiB) copied {} ms after the links came back (16 Mbit/s on A's links)",
        t0.elapsed().as_millis()
    );
    assert_eq!(image_file(&pair.b, "big"), Some((big_sha, 0o640)));
    assert_eq!(metric(&pair.b, "novacron_peer_image_bytes_copied_total").await, (16 << 20) as f64);

    // kill -9 of B mid-copy: the crash's temporary file is removed at start
    // and the file is copied again from byte 0.
    let big2 = random_image(&scratch, "big2.raw", 12);
    let big2_sha = upload(&pair.a, "big2", &big2);
    until(&pair.b, "copying big2", 30, |n| async move { file_state(n, "big2").await == "copying" }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pair.b.daemon.restart();
    // Well under the 30 s stall timeout: the restarted B's fetch is served
    // at once, not after a stall.
    let t0 = Instant::now();
    until(
        &pair.b,
        "big2 present after kill -9",
        25,
        |n| async move { file_state(n, "big2").await == "present" },
    )
    .await;
    eprintln!("big2 (12 MiB) copied {} ms after B's restart", t0.elapsed().as_millis());
    assert_eq!(image_file(&pair.b, "big2"), Some((big2_sha, 0o640)));
    let leftovers = hidden_files(&pair.b);
    assert!(leftovers.is_empty(), "temporary files left after kill -9: {leftovers:?}");
    assert!(
        pair.b.daemon.log().contains("removed an unfinished image file"),
        "the crash left none to remove?"
    );
    for link in 0..2 {
        pair.clear_shape(&pair.a, link);
    }
    let _ = std::fs::remove_dir_all(scratch);
}

/// Image data has its own connection: a copy that fills a slow path (2
/// Mbit/s, both of A's links, packets queued up to 100 ms) never holds a
/// heartbeat behind it (on one connection, a heartbeat would wait behind
/// whatever chunks the socket buffers hold: a 256 KiB chunk alone takes a
/// second to leave at that rate; the link's miss limit is 2 s).
#[tokio::test(flavor = "multi_thread")]
async fn an_image_copy_on_a_slow_path_never_delays_heartbeats() {
    let pair = Pair::test_driver("replslow");
    pair_up(&pair).await;
    until(&pair.a, "the bulk connection up", 20, |n| async move {
        get(n, "/v1/peer").await["link"]["bulk"] == "up"
    })
    .await;
    assert_eq!(get(&pair.b, "/v1/peer").await["link"]["bulk"], "up");
    assert_eq!(metric(&pair.a, "novacron_peer_bulk_up").await, 1.0);
    let downs = |n| async move { metric(n, "novacron_peer_link_downs_total").await };
    let before = (downs(&pair.a).await, downs(&pair.b).await);
    for link in 0..2 {
        pair.shape(&pair.a, link, "2mbit", "100ms");
    }
    let scratch = common::scratch_dir("replslow-files");
    let file = random_image(&scratch, "slow.raw", 2);
    let sha = upload(&pair.a, "slow", &file);
    until(&pair.b, "copying", 30, |n| async move { file_state(n, "slow").await == "copying" }).await;
    let t0 = Instant::now();
    let (mut worst, mut samples) = (0f64, 0);
    while file_state(&pair.b, "slow").await != "present" {
        assert!(t0.elapsed() < Duration::from_secs(60), "2 MiB not copied in 60 s at 2 Mbit/s");
        for n in [&pair.a, &pair.b] {
            worst = worst.max(metric(n, "novacron_peer_heartbeat_age_seconds").await);
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t0.elapsed();
    let rtt = get(&pair.a, "/v1/peer").await["link"]["rtt_ms"].clone();
    eprintln!(
        "2 MiB over 2 Mbit/s in {} ms; worst heartbeat age {worst:.3} s over {samples} samples; rtt {rtt} ms",
        took.as_millis()
    );
    assert_eq!(image_file(&pair.b, "slow").map(|f| f.0), Some(sha));
    assert!(took > Duration::from_secs(4), "the shaping did not hold: {took:?}");
    assert_eq!((downs(&pair.a).await, downs(&pair.b).await), before, "the link went down during the copy");
    assert!(worst < 2.0, "a heartbeat waited {worst} s behind the copy");
    for link in 0..2 {
        pair.clear_shape(&pair.a, link);
    }
    let _ = std::fs::remove_dir_all(scratch);
}

/// The copy rate of image files over the veth link, for docs/performance.md:
/// a 64 MiB image uploaded on A, timed on B from the first `copying` seen
/// to `present` (polled every 20 ms), and from the upload's end.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check: prints the image copy rate for docs/performance.md"]
async fn measure_image_copy_rate() {
    let pair = Pair::test_driver("replimgrate");
    pair_up(&pair).await;
    let scratch = common::scratch_dir("replimgrate-files");
    for round in 0..3 {
        let name = format!("rate-{round}");
        let file = random_image(&scratch, &name, 64);
        upload(&pair.a, &name, &file);
        let t0 = Instant::now();
        let mut started = None;
        loop {
            match file_state(&pair.b, &name).await.as_str() {
                "copying" if started.is_none() => started = Some(Instant::now()),
                "present" => break,
                _ => {}
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "not copied in 120 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let copy = started.map_or(Duration::ZERO, |s| s.elapsed());
        eprintln!(
            "64 MiB: {:.1} MiB/s while copying ({} ms), {} ms from the upload's end (includes the 2 s scan)",
            64.0 / copy.as_secs_f64(),
            copy.as_millis(),
            t0.elapsed().as_millis()
        );
        std::fs::remove_file(file).unwrap();
    }
    let _ = std::fs::remove_dir_all(scratch);
}
