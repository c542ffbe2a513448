//! The two-node harness itself (tests/common/pair.rs): two real daemons in
//! their own network namespaces answer, reach each other over both veth
//! links, and the link helpers (cut, loss, rate) do what they say.

mod common;

use common::call;
use common::pair::{Pair, LINKS};
use hyper::{Method, StatusCode};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_in_namespaces_reach_each_other_until_the_link_is_cut() {
    let pair = Pair::test_driver("pair");
    // Both answer on their sockets, as two different nodes.
    let (s, ha) = call(&pair.a.local(), Method::GET, "/v1/health", None).await;
    assert_eq!(s, StatusCode::OK, "{ha}");
    let (s, hb) = call(&pair.b.local(), Method::GET, "/v1/health", None).await;
    assert_eq!(s, StatusCode::OK, "{hb}");
    assert_ne!(ha["node"], hb["node"], "one node twice");

    // Each reaches the other over HTTPS on both links, from inside its own
    // namespace.
    for (link, name) in LINKS.iter().enumerate() {
        assert!(pair.b.reaches(&pair.a, link), "B cannot reach A on {name}");
        assert!(pair.a.reaches(&pair.b, link), "A cannot reach B on {name}");
    }
    // The addresses exist inside the namespaces only (checked on the root
    // namespace's interfaces; no packet is sent there).
    let root = std::process::Command::new("ip").args(["-br", "addr"]).output().unwrap();
    let root = String::from_utf8_lossy(&root.stdout);
    for addr in pair.a.addrs.iter().chain(&pair.b.addrs) {
        assert!(!root.contains(&format!(" {addr}/")), "{addr} is on a root namespace interface:\n{root}");
    }
    let run = pair.b.cli_to(&pair.a, 0, Duration::from_secs(5), &["--json", "status"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let status: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(status["host"]["node_id"], ha["node"], "B reached someone else: {status}");

    // The library's HTTPS client from inside B: a token A made works on A
    // over link 1; a bad one is refused.
    let (s, v) = pair.b.call_to(&pair.a, 1, Some(&pair.a.daemon.admin), Method::GET, "/v1/host", None);
    assert_eq!((s, v["node_id"].clone()), (StatusCode::OK, ha["node"].clone()), "{v}");
    let (s, _) = pair.b.call_to(&pair.a, 1, Some("nc_bogus"), Method::GET, "/v1/host", None);
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A's HTTPS address does not exist in the root namespace: the root-side
    // client refuses to try it.
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pair.a.daemon.admin()));
    assert!(refused.is_err(), "a root-namespace client was made for a namespace address");

    // Cut the primary link: A is unreachable from B there, still reachable
    // over the redundant one; plugged back in, reachable again.
    pair.cut(0);
    assert!(!pair.b.reaches(&pair.a, 0), "A still reachable over a cut link");
    assert!(pair.b.reaches(&pair.a, 1), "the redundant link went down with the first");
    pair.restore(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pair.b.reaches(&pair.a, 0) {
        assert!(Instant::now() < deadline, "A not reachable after the link came back");
    }

    // Total loss on A's side of link 1: unreachable there; cleared: back.
    pair.loss(&pair.a, 1, 1.0);
    assert!(!pair.b.reaches(&pair.a, 1), "a 100% loss rule let traffic through");
    assert!(pair.b.reaches(&pair.a, 0), "loss on link 1 hit link 0");
    pair.clear_loss(&pair.a);
    assert!(pair.b.reaches(&pair.a, 1));
}

/// Seconds B takes to fetch A's OpenAPI document (about 130 kB) over link 0.
fn fetch_secs(pair: &Pair) -> f64 {
    let url = format!("{}/v1/openapi.json", pair.a.url(0));
    let out =
        pair.b.exec("curl", &["-sk", "--max-time", "30", "-o", "/dev/null", "-w", "%{time_total}", &url]);
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn rate_limit_slows_the_link_and_is_removed() {
    let mut pair = Pair::test_driver("rate");
    let fast = fetch_secs(&pair);
    // 256 kbit/s: ~130 kB take at least 4 s.
    pair.shape(&pair.a, 0, "256kbit", "2s");
    let slow = fetch_secs(&pair);
    pair.clear_shape(&pair.a, 0);
    let again = fetch_secs(&pair);
    eprintln!("openapi.json over link 0: {fast:.2} s, shaped {slow:.2} s, unshaped again {again:.2} s");
    assert!(slow > 3.0, "256 kbit/s shaping did not slow the transfer: {slow:.2} s");
    assert!(again < slow / 2.0, "shaping not removed: {again:.2} s");

    // The witness namespace routes to both nodes over its own links, and
    // nothing else: the pair's links are not its.
    let a_link = pair.a.addrs[0];
    let w = pair.add_witness();
    for addr in w.node_addrs {
        assert!(w.routes_to(addr, 1), "the witness has no route to {addr}");
    }
    assert!(!w.routes_to(a_link, common::api_port()), "the witness reaches the pair's link");
}
