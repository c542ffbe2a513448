//! Helpers of the replicated-disk tests (disk_replication.rs,
//! disk_failures.rs): API calls on a node of a [`Pair`], pairing, polling
//! a VM's replication, and the records of the `novacron.records=N` guest
//! workload (tests/guest/build-guest.sh).

use super::call;
use super::pair::{Node, Pair};
use hyper::Method;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

pub async fn get(n: &Node, path: &str) -> Value {
    let (s, v) = call(&n.local(), Method::GET, path, None).await;
    assert_eq!(s, hyper::StatusCode::OK, "GET {path}: {v}");
    v
}

pub async fn post(n: &Node, path: &str, body: Value) -> Value {
    let (s, v) = call(&n.local(), Method::POST, path, Some(body)).await;
    assert!(s.is_success(), "POST {path}: {s} {v}");
    v
}

/// Pairs A and B and waits until both see the link up.
pub async fn pair_up(pair: &Pair) {
    let v = post(&pair.a, "/v1/peer/invite", json!({})).await;
    post(&pair.b, "/v1/peer/join", json!({ "code": v["code"] })).await;
    for n in [&pair.a, &pair.b] {
        until_link_up(n).await;
    }
}

pub async fn until_link_up(n: &Node) {
    let t0 = Instant::now();
    while get(n, "/v1/peer").await["link"]["state"] != "up" {
        assert!(t0.elapsed() < Duration::from_secs(20), "link not up\n{}", n.daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET /v1/vms/{id}` on `n` until `f` holds for its replication.
pub async fn until_repl(n: &Node, id: &str, what: &str, secs: u64, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let v = get(n, &format!("/v1/vms/{id}")).await;
        if f(&v["replication"]) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s: {v}\n{}",
            n.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `NOVACRON-REC=n` lines of the guest's console, whether it saw an error,
/// and whether it printed that it is done.
pub fn printed(log: &Path) -> (Vec<u64>, bool, bool) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    (
        records_in(&text),
        text.contains("NOVACRON-REC-FAILED") || text.contains("I/O error"),
        text.contains("NOVACRON-RECORDS-DONE"),
    )
}

/// The record numbers a console text printed.
pub fn records_in(text: &str) -> Vec<u64> {
    // The console's shell prompt can share a line with a record's number.
    text.split("NOVACRON-REC=")
        .skip(1)
        .filter_map(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// Byte offset of record n: (256 + n) * 4096.
pub fn record_offset(n: u64) -> u64 {
    (256 + n) * 4096
}

/// Record n as the guest writes it: "NCREC <n>\n" padded to 4 KiB.
pub fn record(n: u64) -> Vec<u8> {
    let mut want = format!("NCREC {n:08}\n").into_bytes();
    want.resize(4096, 0);
    want
}

/// Of `recs`, those not on `disk` exactly.
pub fn missing_records(disk: &Path, recs: &[u64]) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).unwrap();
    let mut block = vec![0u8; 4096];
    recs.iter()
        .copied()
        .filter(|&n| f.read_exact_at(&mut block, record_offset(n)).is_err() || block != record(n))
        .collect()
}

/// What each record slot 0..n of `disk` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Exactly record n.
    Record,
    /// All zeroes: never written.
    Empty,
    /// Anything else: a torn or foreign block.
    Torn,
}

pub fn slots(disk: &Path, n: u64) -> Vec<Slot> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).unwrap();
    let mut block = vec![0u8; 4096];
    (0..n)
        .map(|i| {
            if f.read_exact_at(&mut block, record_offset(i)).is_err() {
                Slot::Torn
            } else if block == record(i) {
                Slot::Record
            } else if block.iter().all(|&b| b == 0) {
                Slot::Empty
            } else {
                Slot::Torn
            }
        })
        .collect()
}

pub fn sha256(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}
