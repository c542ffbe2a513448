//! docs/openapi.json says what the server enforces: schemathesis (PyPI,
//! pinned in tests/setup-host.sh, venv /opt/novacron-test-venv) runs every
//! operation of the document the daemon serves against the real binary on
//! `test:///default`, with all checks, a fixed seed and a bounded number of
//! examples. Any finding fails the test unless it is listed in `INTENDED`
//! with the reason.
//!
//!   cargo test --test schemathesis -- --include-ignored --nocapture
//!
//! Like the sushy-emulator test it needs the venv, so a plain `cargo test`
//! lists it as ignored; tests/run.sh (and CI) runs it.
//!
//! The run's JSON report and schemathesis's output are printed on failure;
//! `SCHEMATHESIS_EXAMPLES=N` changes the number of examples per operation
//! (default 8) to look further when changing the API.

mod common;

use common::{Daemon, Opts};
use serde_json::Value;
use std::process::Command;

const SCHEMATHESIS: &str = "/opt/novacron-test-venv/bin/schemathesis";
const SEED: &str = "20261201";

/// Findings that are the API working as designed, each with the reason:
/// (schemathesis failure code, operation or "*", answer status, text in the
/// answer's error message).
const INTENDED: &[(&str, &str, u16, &str, &str)] = &[
    // ST202: a schema-valid request refused. The schema checks the shape of
    // a request; these refusals depend on the host or on other resources.
    ("ST202", "POST /v1/images", 400, "must name an existing file inside",
     "`path` must name an existing file inside `images.import_dirs`: the schema cannot know the host's files"),
    ("ST202", "POST /v1/vms", 400, "must name an existing file inside",
     "disk images and kernels named in the body must be existing files in the data dir's images/ or boot/"),
    ("ST202", "POST /v1/vms/{id}/disks", 400, "must name an existing file inside",
     "the disk's image must be an existing file in images/"),
    ("ST202", "POST /v1/vms", 400, "there is no network", "the network named in the body must exist"),
    ("ST202", "POST /v1/networks", 400, "is not a bridge on this host", "`bridge` must be an existing host bridge"),
    ("ST202", "POST /v1/networks", 400, "is not a network address",
     "`subnet` must have no host bits, which a pattern cannot check against the prefix"),
    ("ST202", "POST /v1/vms/{id}/disks/{device}/resize", 400, "disks only grow",
     "the new size must exceed the disk's current size"),
    ("ST202", "GET /v1/vms/{id}/console", 400, "the console is a WebSocket",
     "schemathesis's HTTP client drops the `Connection: Upgrade` header, so it cannot open the WebSocket \
     (tests/provision.rs drives the console)"),
    // ST101: a 5xx. libvirt's test driver has no disk hotplug; on
    // qemu:///system a running VM's disks are attached and detached live.
    ("ST101", "POST /v1/vms/{id}/disks", 500, "unsupported flags", "test:///default has no live disk attach"),
    ("ST101", "DELETE /v1/vms/{id}/disks/{device}", 500, "not supported by the connection driver",
     "test:///default has no live disk detach"),
    ("ST202", "POST /v1/vms", 400, "this host has",
     "vcpus beyond the host's CPUs times hypervisor.vcpu_overcommit: a fact of the host"),
    ("ST202", "PATCH /v1/vms/{id}", 400, "this host has",
     "vcpus beyond the host's CPUs times hypervisor.vcpu_overcommit: a fact of the host"),
    ("ST202", "POST /v1/vms/{id}/snapshots", 400, "a stopped VM has no memory state",
     "a memory snapshot needs a running or paused VM (SnapshotCreate.memory says so)"),
    ("ST202", "PUT /v1/images/{name}", 400, "a raw image must be at least",
     "an upload must be a disk image (qcow2, or raw of at least 1 MiB in whole sectors), not any bytes"),
    ("ST202", "POST /v1/peer/join", 400, "malformed join code",
     "a join code carries a checksum and a format version, which a schema cannot check (tests/peer.rs pairs real nodes)"),
    ("ST202", "POST /v1/peer/handshake", 422, "no such invitation on this node",
     "a handshake step names an invitation this node made, which random data never does (tests/peer.rs)"),
    ("ST202", "PUT /v1/images/{name}", 400, "checksum mismatch",
     "X-Checksum-Sha256 must be the SHA-256 of the body, which a schema cannot tie to it"),
];

/// Operations left out of the run, with the reason.
const EXCLUDED: &[(&str, &str)] = &[(
    "token_revoke",
    "schemathesis reads the admin token's id from GET /v1/tokens and revokes the token it runs with, \
     after which every request is 401; tests/api.rs covers revocation",
)];

/// One failed check of the run, with the daemon's answer to the request.
struct Finding {
    code: String,
    title: String,
    operation: String,
    status: u16,
    answer: String,
}

/// Every failed check in schemathesis's NDJSON event log.
fn findings(ndjson: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    for line in ndjson.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
        let rec = &event["ScenarioFinished"]["recorder"];
        for (case, checks) in rec["checks"].as_object().into_iter().flatten() {
            for check in checks.as_array().into_iter().flatten().filter(|c| c["status"] == "failure") {
                let f = &check["failure_info"]["failure"];
                let response = &rec["interactions"][case]["response"];
                let body = response["content"]["$base64"].as_str().map(base64).unwrap_or_default();
                out.push(Finding {
                    code: f["code"].as_str().unwrap_or("?").into(),
                    title: f["title"].as_str().unwrap_or("?").into(),
                    operation: f["operation"].as_str().or(rec["label"].as_str()).unwrap_or("?").into(),
                    status: response["status_code"].as_u64().unwrap_or(0) as u16,
                    answer: String::from_utf8_lossy(&body).chars().take(300).collect(),
                });
            }
        }
    }
    out
}

fn intended(f: &Finding) -> bool {
    INTENDED.iter().any(|(code, op, status, text, _)| {
        *code == f.code
            && (*op == "*" || *op == f.operation)
            && *status == f.status
            && f.answer.contains(text)
    })
}

/// Standard base64 (the NDJSON log's bodies).
fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
#[ignore = "needs schemathesis from tests/setup-host.sh (/opt/novacron-test-venv)"]
fn openapi_document_holds_against_the_live_daemon() {
    assert!(
        std::path::Path::new(SCHEMATHESIS).exists(),
        "{SCHEMATHESIS} is missing: run bash tests/setup-host.sh"
    );
    let d = Daemon::start("schemathesis", Opts::test_driver(91));
    let report = d.dir.join("schemathesis.json");
    let events = d.dir.join("schemathesis.ndjson");
    let mut cmd = Command::new(SCHEMATHESIS);
    cmd.arg("run");
    for (operation_id, _) in EXCLUDED {
        cmd.args(["--exclude-operation-id", operation_id]);
    }
    let examples = std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "8".into());
    let out = cmd
        .arg(format!("{}/v1/openapi.json", d.url))
        .args(["--url", &d.url])
        .arg("--tls-verify")
        .arg(d.data().join("tls/cert.pem"))
        .args(["--header", &format!("Authorization: Bearer {}", d.admin)])
        .args(["--checks", "all", "--seed", SEED, "--max-examples", &examples, "--workers", "1"])
        .args(["--generation-database", "none", "--request-timeout", "10", "--no-color"])
        .args(["--report", "json,ndjson", "--report-json-path"])
        .arg(&report)
        .arg("--report-ndjson-path")
        .arg(&events)
        // schemathesis keeps nothing in the checkout.
        .current_dir(&d.dir)
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!("no report ({e}); schemathesis said:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    });
    let doc: Value = serde_json::from_str(&text).unwrap();
    eprintln!(
        "schemathesis {}: {} test cases in {} s, {} operations tested",
        doc["schemathesis_version"],
        doc["test_cases"]["generated"],
        doc["running_time"],
        doc["operations"]["tested"]
    );
    let errors = doc["errors"].as_array().cloned().unwrap_or_default();
    let all = findings(&std::fs::read_to_string(&events).unwrap_or_default());
    let new: Vec<String> = all
        .iter()
        .filter(|f| !intended(f))
        .map(|f| format!("{} {} on {}: {} {}", f.code, f.title, f.operation, f.status, f.answer))
        .collect();
    eprintln!("{} failed checks, {} of them intended", all.len(), all.len() - new.len());
    assert!(
        doc["complete"] == true && errors.is_empty() && new.is_empty(),
        "schemathesis found what docs/openapi.json does not say (or could not finish):\n{}\n\
         errors: {errors:#?}\n--- schemathesis output ---\n{stdout}",
        new.join("\n")
    );
    // The run did test the API: every operation, with many requests.
    assert_eq!(doc["operations"]["errored"], 0, "{text}");
    assert!(doc["operations"]["tested"].as_u64().unwrap_or(0) >= 40, "{text}");
}
