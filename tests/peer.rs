//! Pairing two real daemons (issue 9): one-time codes, the handshake over
//! pinned HTTPS, refusals that leave no half-paired state, unpairing on
//! both sides and alone. Each daemon has its own 127.0.0.X address.

mod common;

use common::{call, cli, error_code, Daemon, Opts};
use hyper::{Method, StatusCode};
use novacron::cluster::pairing::JoinCode;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn node(tag: &str, octet: u8) -> Daemon {
    let mut opts = Opts::test_driver(octet);
    opts.extra_api = format!("[node]\nname = \"{tag}\"\n");
    Daemon::start(tag, opts)
}

async fn peer(d: &Daemon) -> Value {
    let (status, v) = call(&d.local(), Method::GET, "/v1/peer", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

async fn assert_alone(d: &Daemon, what: &str) {
    let v = peer(d).await;
    assert_eq!(v["state"], "not_paired", "{what}: {v}");
    assert_eq!(v["paired"], false, "{what}: {v}");
    assert_eq!(v["peer"], Value::Null, "{what}: {v}");
}

async fn invite(d: &Daemon, secs: u64) -> String {
    let (status, v) =
        call(&d.local(), Method::POST, "/v1/peer/invite", Some(json!({"expires_secs": secs}))).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["code"].as_str().unwrap().to_string()
}

async fn join(d: &Daemon, code: &str) -> (StatusCode, Value) {
    call(&d.local(), Method::POST, "/v1/peer/join", Some(json!({ "code": code }))).await
}

async fn node_id(d: &Daemon) -> String {
    call(&d.local(), Method::GET, "/v1/host", None).await.1["node_id"].as_str().unwrap().to_string()
}

async fn metric(d: &Daemon, name: &str) -> String {
    let (_, v) = call(&d.local(), Method::GET, "/metrics", None).await;
    let text = v.as_str().unwrap_or_default().to_string();
    text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or("").to_string()
}

/// Waits up to 10 s for `d`'s pairing to reach `state`.
async fn settles(d: &Daemon, state: &str) {
    for _ in 0..100 {
        if peer(d).await["state"] == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never {state}: {}", peer(d).await);
}

async fn peer_check(d: &Daemon) -> Value {
    let (_, v) = call(&d.local(), Method::GET, "/v1/health/details", None).await;
    v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "peer").unwrap().clone()
}

#[tokio::test]
async fn pairing_succeeds_code_is_single_use_and_unpair_reaches_both() {
    let a = node("pair-a", 161);
    let b = node("pair-b", 162);
    let c = node("pair-c", 163);
    assert_alone(&a, "a fresh node").await;
    assert_eq!(peer_check(&a).await["message"], "not paired");
    assert_eq!(metric(&a, "novacron_peer_paired").await, "novacron_peer_paired 0");

    // The CLI, as an operator would: invite on A, join on B.
    let inv = cli(&a, &["peer", "invite", "--expires", "10m"]);
    assert_eq!(inv.code, 0, "{}{}", inv.stdout, inv.stderr);
    let code = inv.stdout.trim().to_string();
    let decoded = JoinCode::decode(&code).unwrap();
    assert_eq!(decoded.fingerprint, a.fingerprint);
    assert_eq!(decoded.addresses, ["127.0.0.161".parse::<std::net::IpAddr>().unwrap()]);
    assert!(inv.stderr.contains("novacron peer join"), "{}", inv.stderr);
    let joined = cli(&b, &["peer", "join", &code]);
    assert_eq!(joined.code, 0, "{}{}", joined.stdout, joined.stderr);
    assert!(joined.stdout.contains("peer:        pair-a"), "{}", joined.stdout);

    let (va, vb) = (peer(&a).await, peer(&b).await);
    assert_eq!((va["state"].as_str(), vb["state"].as_str()), (Some("paired"), Some("paired")));
    assert_eq!(va["peer"]["node_id"], node_id(&b).await.as_str());
    assert_eq!(vb["peer"]["node_id"], node_id(&a).await.as_str());
    assert_eq!(va["peer"]["fingerprint"], b.fingerprint.as_str());
    assert_eq!(vb["peer"]["fingerprint"], a.fingerprint.as_str());
    assert_eq!(va["peer"]["name"], "pair-b");
    assert_eq!(vb["peer"]["addresses"], json!(["127.0.0.161"]));
    // No link runs yet: said so, nothing invented.
    assert_eq!(va["link"]["state"], "down");
    assert_eq!(va["link"]["rtt_ms"], Value::Null);
    assert_eq!(va["disks"], json!([]));
    let check = peer_check(&a).await;
    assert_eq!(
        (check["status"].as_str(), check["message"].as_str()),
        (Some("warning"), Some("paired with pair-b, link down"))
    );
    assert_eq!(metric(&b, "novacron_peer_paired").await, "novacron_peer_paired 1");
    // journald fields (stderr here): the pairing names the peer.
    assert!(a.log().contains(&format!("PEER_ID={}", node_id(&b).await)), "{}", a.log());
    // Audit: B's admin joined; A records the commit as the peer's.
    let audit = |d: &Daemon| {
        let c = d.local();
        async move { call(&c, Method::GET, "/v1/audit", None).await.1["entries"].clone() }
    };
    let on_a = audit(&a).await;
    let b_id = node_id(&b).await;
    assert!(
        on_a.as_array().unwrap().iter().any(|e| e["actor"] == format!("peer:{b_id}")
            && e["action"] == "peer.handshake"
            && e["target"] == "commit"),
        "{on_a}"
    );
    let on_b = audit(&b).await;
    assert!(
        on_b.as_array().unwrap().iter().any(|e| e["action"] == "peer.join" && e["result"] == "ok"),
        "{on_b}"
    );
    let status = cli(&a, &["--json", "peer", "status"]);
    let v: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["peer"]["name"], "pair-b");

    // Replayed: the same code from a third node.
    let (s, v) = join(&c, &code).await;
    assert_eq!((s, error_code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "invite_used"), "{v}");
    assert_alone(&c, "after a replayed code").await;
    // Paired nodes neither invite nor join again.
    let (s, v) = call(&a.local(), Method::POST, "/v1/peer/invite", Some(json!({}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "already_paired"), "{v}");
    let code_c = invite(&c, 600).await;
    let (s, v) = join(&b, &code_c).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "already_paired"), "{v}");
    // C's code offered to an unpaired node works; but A refuses to be joined twice.
    let c_code_for_a = invite(&c, 600).await;
    let (s, v) = join(&a, &c_code_for_a).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "already_paired"), "{v}");
    assert_alone(&c, "C after being refused").await;

    let un = cli(&b, &["peer", "unpair"]);
    assert_eq!(un.code, 0, "{}{}", un.stdout, un.stderr);
    assert!(un.stdout.contains("unpaired on both nodes"), "{}", un.stdout);
    assert_alone(&a, "A after B unpaired").await;
    assert_alone(&b, "B after unpairing").await;
    assert_eq!(metric(&a, "novacron_peer_paired").await, "novacron_peer_paired 0");
    let (s, v) = call(&a.local(), Method::DELETE, "/v1/peer", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "not_paired"), "{v}");
    // And they can pair again, the other way round.
    let code = invite(&b, 600).await;
    let (s, v) = join(&a, &code).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(peer(&b).await["peer"]["name"], "pair-a");
}

#[tokio::test]
async fn refused_codes_leave_neither_node_paired() {
    let mut a = node("refuse-a", 164);
    let b = node("refuse-b", 165);
    let code = invite(&a, 600).await;
    let mut parsed = JoinCode::decode(&code).unwrap();

    // Wrong fingerprint: B's TLS client refuses A's certificate.
    let mut wrong_fp = parsed.clone();
    wrong_fp.fingerprint = vec!["AB"; 32].join(":");
    let (s, v) = join(&b, &wrong_fp.encode()).await;
    assert_eq!((s, error_code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "fingerprint_mismatch"), "{v}");
    // Wrong secret: A refuses, B never hears A's proof.
    let mut wrong_secret = parsed.clone();
    wrong_secret.secret[0] ^= 0x55;
    let (s, v) = join(&b, &wrong_secret.encode()).await;
    assert_eq!((s, error_code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "wrong_secret"), "{v}");
    // A typo: caught before any connection.
    let mut typo = code.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let (s, v) = join(&b, std::str::from_utf8(&typo).unwrap()).await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "malformed_code"), "{v}");
    let bad = cli(&b, &["peer", "join", "ncjnotacode"]);
    assert_eq!(bad.code, 2, "a bad request: {}", bad.stderr);
    assert!(bad.stderr.contains("malformed_code"), "{}", bad.stderr);
    // Its own code.
    let (s, v) = join(&a, &code).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "pair_self"), "{v}");
    // Nobody listening at the code's address.
    let mut nowhere = parsed.clone();
    nowhere.addresses = vec!["127.0.0.169".parse().unwrap()];
    let (s, v) = join(&b, &nowhere.encode()).await;
    assert_eq!((s, error_code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "peer_unreachable"), "{v}");
    // Garbage handshakes on A's public endpoint.
    let anon = a.https(None);
    let (s, v) = call(&anon, Method::POST, "/v1/peer/handshake", Some(json!({"step": "prepare"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(
        &anon,
        Method::POST,
        "/v1/peer/handshake",
        Some(json!({"step": "commit", "invite": "00", "joiner": uuid::Uuid::nil(), "proof": "00"})),
    )
    .await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{v}");
    for d in [&a, &b] {
        assert_alone(d, "after the refusals").await;
    }
    // The code itself still works after all that (wrong secrets up to the limit).
    assert!(a.log().contains("peer handshake refused"), "refusals are logged");
    // ... in the journal, not the audit log, which anonymous callers must not fill.
    let (_, audit) = call(&a.local(), Method::GET, "/v1/audit", None).await;
    assert!(!audit.to_string().contains("peer.handshake"), "{audit}");

    // Expired.
    let short = cli(&a, &["peer", "invite", "--expires", "1s"]);
    assert_eq!(short.code, 0, "{}", short.stderr);
    std::thread::sleep(Duration::from_millis(1500));
    let (s, v) = join(&b, short.stdout.trim()).await;
    assert_eq!((s, error_code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "invite_expired"), "{v}");
    // A restart forgets outstanding codes (they are kept in memory only).
    a.restart();
    let (s, v) = join(&b, &code).await;
    assert_eq!((s, error_code(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "invite_unknown"), "{v}");
    for d in [&a, &b] {
        assert_alone(d, "after expiry and restart").await;
    }
    // A fresh code still pairs them.
    parsed = JoinCode::decode(&invite(&a, 600).await).unwrap();
    let (s, v) = join(&b, &parsed.encode()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn unpair_alone_when_the_peer_is_stopped() {
    let a = node("alone-a", 166);
    let mut b = node("alone-b", 167);
    let code = invite(&a, 600).await;
    assert_eq!(join(&b, &code).await.0, StatusCode::OK);
    b.kill9();
    let (s, v) = call(&a.local(), Method::DELETE, "/v1/peer", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "peer_unreachable"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--force"), "{v}");
    assert_eq!(peer(&a).await["state"], "paired", "nothing changed without force");
    let forced = cli(&a, &["peer", "unpair", "--force"]);
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert!(forced.stdout.contains("unpaired on this node only"), "{}", forced.stdout);
    assert_alone(&a, "A after a forced unpair").await;
    // B, back, still lists A (it was never told); unpairing it is a no-op on A.
    b.restart();
    assert_eq!(peer(&b).await["state"], "paired");
    let (s, v) = call(&b.local(), Method::DELETE, "/v1/peer", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["peer_notified"], true, "{v}");
    assert_alone(&b, "B after unpairing").await;
    assert_alone(&a, "A stays alone").await;
}

/// What the relay does with its Nth connection.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Relay {
    Pass,
    /// Forwards the request, drops the answer and closes once the inviter
    /// logged the commit: the inviter acted, the joiner never hears it.
    CutAnswer,
    /// Closes at once: the request never arrives.
    Refuse,
}

const COMMITTED: &str = "paired with peer (invited)";

fn count(log: &std::path::Path, what: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches(what).count()
}

/// A TCP relay in front of `target` (TLS passes through it, so pinning
/// holds); `log` is the inviter's log, watched for the commit.
fn relay(listen: &str, target: String, log: std::path::PathBuf, plan: Vec<Relay>) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(listen).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let mode = plan.get(n).copied().unwrap_or(Relay::Pass);
            if mode == Relay::Refuse {
                drop(client);
                continue;
            }
            let commits = count(&log, COMMITTED);
            let server = TcpStream::connect(&target).unwrap();
            // Set once the client sent more than its ClientHello: what the
            // server sends from then on is session tickets and the answer.
            let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let req_flag = requested.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut chunks = 0;
                while let Ok(k) = c_read.read(&mut buf) {
                    if k == 0 || s_write.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    chunks += 1;
                    if chunks >= 2 {
                        req_flag.store(true, Ordering::SeqCst);
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            let log = log.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                if mode == Relay::CutAnswer {
                    let closer = c_write.try_clone().unwrap();
                    std::thread::spawn(move || {
                        common::wait_for("the inviter's commit", 10, || count(&log, COMMITTED) > commits);
                        let _ = closer.shutdown(std::net::Shutdown::Both);
                    });
                }
                while let Ok(k) = s_read.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    let drop_it = mode == Relay::CutAnswer && requested.load(Ordering::SeqCst);
                    if !drop_it && c_write.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    seen
}

#[tokio::test]
async fn a_join_cut_at_each_step_ends_the_same_on_both_nodes() {
    let a = node("cut-a", 168);
    let b = node("cut-b", 170);
    let target = a.url.trim_start_matches("https://").to_string();
    let relay_ip = "127.0.0.171";
    use Relay::*;
    let plan = vec![
        Refuse, // 1: prepare
        Pass, CutAnswer, Pass, // 2: prepare, commit (answer lost), abort
        Pass, Refuse, Refuse, // 3: prepare, commit and abort never arrive
        Pass, CutAnswer, Refuse, // 4: prepare, commit (answer lost), abort lost
    ];
    let seen = relay(&format!("{relay_ip}:{}", common::api_port()), target, a.dir.join("daemon.log"), plan);
    let via_relay = |code: &str| {
        let mut c = JoinCode::decode(code).unwrap();
        c.addresses = vec![relay_ip.parse().unwrap()];
        c.encode()
    };

    // 1. Prepare never arrives: nothing happened anywhere.
    let (s, v) = join(&b, &via_relay(&invite(&a, 600).await)).await;
    assert_eq!((s, error_code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "peer_unreachable"), "{v}");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    for d in [&a, &b] {
        assert_alone(d, "1: prepare cut").await;
    }

    // 2. A commits, its answer is lost; B's abort reaches A: both roll back.
    let (s, v) = join(&b, &via_relay(&invite(&a, 600).await)).await;
    assert_eq!((s, error_code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "peer_unreachable"), "{v}");
    assert_eq!(seen.load(Ordering::SeqCst), 4);
    assert_eq!(count(&a.dir.join("daemon.log"), COMMITTED), 1, "A had committed");
    for d in [&a, &b] {
        assert_alone(d, "2: answer to commit lost, abort passed").await;
    }

    // 3. Neither commit nor abort arrives: B keeps a `joining` row and asks
    //    A directly (the address A gave) until A says it never committed.
    let (s, v) = join(&b, &via_relay(&invite(&a, 600).await)).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "pairing_incomplete"), "{v}");
    assert_eq!(seen.load(Ordering::SeqCst), 7);
    assert_alone(&a, "3: A never saw the commit").await;
    settles(&b, "not_paired").await;

    // 4. A commits, the answer and the abort are lost: B settles the other
    //    way, paired like A.
    let (s, v) = join(&b, &via_relay(&invite(&a, 600).await)).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "pairing_incomplete"), "{v}");
    assert_eq!(seen.load(Ordering::SeqCst), 10);
    assert_eq!(peer(&a).await["state"], "paired");
    assert_eq!(peer(&b).await["state"], "joining");
    assert_eq!(peer_check(&b).await["status"], "warning");
    settles(&b, "paired").await;
}
