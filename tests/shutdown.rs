//! SIGTERM (`systemctl stop`): the daemon stops its tasks in order (API,
//! cluster, core), closes the store last and exits 0.

mod common;

use common::{call, Daemon, Opts};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

/// Where `needle` first appears in the log after `from`.
fn find_after(log: &str, from: usize, needle: &str) -> usize {
    from + log[from..]
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not logged after byte {from}:\n{log}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_tasks_in_order_then_closes_the_store() {
    let mut d = Daemon::start("shutdown", Opts::test_driver(34));
    let (s, v) = call(
        &d.local(),
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "kept", "vcpus": 1, "memory_mib": 64})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let before = d.log().len();
    let status = d.terminate(Duration::from_secs(15)).expect("the daemon did not exit within 15 s");
    assert!(status.success(), "exit {status:?}; log:\n{}", d.log());
    let log = d.log();
    let at = find_after(&log, before, "stopping; guests keep running");
    let at = find_after(&log, at, "stopped the api tasks");
    let line = &log[at..at + log[at..].find('\n').unwrap()];
    assert!(line.contains("api.https") && line.contains("api.socket"), "{line}");
    let at = find_after(&log, at, "stopped the cluster tasks");
    let at = find_after(&log, at, "stopped the core tasks");
    let line = &log[at..at + log[at..].find('\n').unwrap()];
    assert!(line.contains("tasks=core.reconciler,core.prune") && line.ends_with("aborted="), "{line}");
    find_after(&log, at, "store closed");
    assert!(!d.socket.exists(), "the socket was left behind");
    // Closed: the write-ahead log was checkpointed into the database.
    let wal = d.data().join("state.db-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0, "WAL not checkpointed");

    // And it starts again with everything in place.
    d.restart();
    let (_, list) = call(&d.local(), Method::GET, "/v1/vms", None).await;
    assert!(list["vms"].as_array().unwrap().iter().any(|v| v["name"] == "kept"), "{list}");
}
