//! Crash safety: `kill -9` in the middle of a burst of mutations loses no
//! acknowledged change and leaves a sound database.

mod common;

use common::{call, Daemon, Opts};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_200_concurrent_mutations() {
    let mut d = Daemon::start("crash", Opts::test_driver(21));
    let c = d.admin();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (path, body, name) = if i % 4 == 0 {
                let name = format!("vm-{i}");
                (
                    "/v1/vms",
                    json!({"name": name, "vcpus": 1, "memory_mib": 32, "disks": [{"size_gib": 1}]}),
                    name,
                )
            } else {
                let name = format!("tok-{i}");
                ("/v1/tokens", json!({"name": name, "role": "viewer"}), name)
            };
            let r = c.request(Method::POST, path, Some(serde_json::to_vec(&body).unwrap())).await;
            (path, name, r.map(|(s, _)| s))
        }));
    }
    // Let part of the burst land, then pull the plug.
    tokio::time::sleep(Duration::from_millis(250)).await;
    d.kill9();
    let mut acked_vms = HashSet::new();
    let mut acked_tokens = HashSet::new();
    for t in tasks {
        let (path, name, r) = t.await.unwrap();
        if let Ok(s) = r {
            assert!(s == StatusCode::CREATED, "{path} {name}: {s}");
            if path == "/v1/vms" {
                acked_vms.insert(name);
            } else {
                acked_tokens.insert(name);
            }
        }
    }
    assert!(!acked_tokens.is_empty(), "nothing was acknowledged before the kill; the test proves nothing");
    assert!(
        acked_tokens.len() + acked_vms.len() < 200,
        "everything finished before the kill; the test proves nothing"
    );
    eprintln!("acknowledged before kill -9: {} tokens, {} VMs", acked_tokens.len(), acked_vms.len());

    let store = novacron::store::Store::open(&d.data().join("state.db")).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    drop(store);

    d.restart();
    let c = d.admin();
    let (_, tokens) = call(&c, Method::GET, "/v1/tokens", None).await;
    let names: Vec<&str> =
        tokens["tokens"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    for t in &acked_tokens {
        assert!(names.contains(&t.as_str()), "acknowledged token {t} lost");
    }
    assert_eq!(names.len(), names.iter().collect::<HashSet<_>>().len(), "duplicate tokens");
    let (_, vms) = call(&c, Method::GET, "/v1/vms", None).await;
    let vms = vms["vms"].as_array().unwrap();
    let vm_names: Vec<&str> =
        vms.iter().filter(|v| v["managed"] == true).map(|v| v["name"].as_str().unwrap()).collect();
    for v in &acked_vms {
        assert!(vm_names.contains(&v.as_str()), "acknowledged VM {v} lost");
    }
    assert_eq!(vm_names.len(), vm_names.iter().collect::<HashSet<_>>().len(), "duplicate VMs");
    // The test driver forgot every domain with the old process; the
    // daemon redefined them all and each is usable.
    for v in &acked_vms {
        let (s, body) = call(&c, Method::POST, &format!("/v1/vms/{v}/start"), None).await;
        assert_eq!(s, StatusCode::OK, "{v}: {body}");
    }
}
