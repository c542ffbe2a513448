//! The core's replication interface between two cores in one process (two
//! data dirs, libvirt's test driver): what the peer link does, minus the
//! link.

use super::owner_tests::{cleanup, open, replica, test_config};
use super::*;
use crate::store::{Applied, Change, Tail};
use crate::types::{Role, TokenCreate, VmState};

/// Applies everything `to` has not applied yet of `from`'s changes in one
/// batch, as the link would; returns how many.
async fn sync(from: &Core, to: &Core) -> usize {
    let mark = to.applied_mark(from.node.id).await.unwrap();
    let Tail::Changes(tail) = from.changes_since(mark, 1000).await.unwrap() else { panic!("reseed") };
    let n = tail.len();
    let applied = to.apply_remote_batch(from.node.id, tail).await.unwrap();
    assert!(applied.iter().all(|a| matches!(a, Applied::Applied(_))));
    n
}

async fn new_token(core: &Arc<Core>, name: &str) -> String {
    let req = TokenCreate { name: name.into(), role: Role::Operator };
    match core.execute(&Core::local_admin(0), Command::CreateToken(req)).await.unwrap() {
        Reply::TokenCreated(t) => t.secret,
        _ => panic!("token create answered something else"),
    }
}

/// Items 1 and 2: a peer's VM applied through the core is listed with its
/// owner and the state the owner reported, announced like a local change,
/// never rewritten by this node's reconcile (the test driver has no domain
/// for it: reconcile used to record it `missing`), and not streamed back.
#[tokio::test]
async fn peer_changes_update_the_view_once_and_are_not_echoed() {
    let b = open(&test_config("replica-b"));
    let peer = Uuid::new_v4();
    let v = replica("peer", peer, VmState::Stopped);
    let mut local_seq = b.local_seq();
    let seq_before = *local_seq.borrow();
    let (_, mut events) = b.events.subscribe(0);
    let put = Change::VmPut(v.clone()).encode();
    let running = Change::VmState { id: v.id, state: VmState::Running, at: 5 }.encode();
    assert!(matches!(b.apply_remote(peer, 1, put.clone()).await.unwrap(), Applied::Applied(_)));
    assert!(matches!(b.apply_remote(peer, 2, running.clone()).await.unwrap(), Applied::Applied(_)));
    let ev = events.try_recv().unwrap();
    assert_eq!((ev.kind, &ev.data["state"]), ("vm.state", &serde_json::json!("running")));
    // The same batch again: nothing changes, nothing is announced.
    assert_eq!(b.apply_remote(peer, 1, put).await.unwrap(), Applied::Duplicate);
    assert_eq!(b.apply_remote(peer, 2, running).await.unwrap(), Applied::Duplicate);
    assert!(events.try_recv().is_err());
    let shown = b.find_vm(&v.name).unwrap();
    assert_eq!((shown.owner_node, shown.state), (Some(peer), VmState::Running));
    b.reconcile_all().await.unwrap();
    assert_eq!(b.find_vm(&v.name).unwrap().state, VmState::Running);
    // Only this node's own changes move the feed.
    assert!(!local_seq.has_changed().unwrap());
    assert_eq!(b.changes_since(seq_before, 100).await.unwrap(), Tail::Changes(Vec::new()));
    new_token(&b, "ops").await;
    assert!(local_seq.has_changed().unwrap());
    assert_eq!(*local_seq.borrow_and_update(), seq_before + 1);
    // Garbage is refused without applying anything.
    let e = b.apply_remote(peer, 3, vec![2, 0xff, 0xff]).await.unwrap_err();
    assert_eq!(e.code(), "invalid_value", "{e}");
    assert_eq!(b.applied_mark(peer).await.unwrap(), 2);
    cleanup(&b, &[]).await;
}

/// Item 4: a token made on A works on B, and both nodes' first-start
/// `admin` tokens survive pairing: both authenticate on both nodes, the
/// younger is renamed the same way on each, and health reports it.
#[tokio::test]
async fn tokens_are_site_wide_and_both_admins_keep_working() {
    let a = open(&test_config("replica-ta"));
    let b = open(&test_config("replica-tb"));
    let admin_a = a.bootstrap_admin_token().await.unwrap().unwrap();
    let admin_b = b.bootstrap_admin_token().await.unwrap().unwrap();
    let ops = new_token(&a, "ops").await;
    assert!(b.authenticate(&ops).is_none());
    sync(&a, &b).await;
    sync(&b, &a).await;
    assert_eq!(b.authenticate(&ops).unwrap().name, "ops");
    for core in [&a, &b] {
        let who_a = core.authenticate(&admin_a.secret).unwrap();
        let who_b = core.authenticate(&admin_b.secret).unwrap();
        assert_eq!((who_a.role, who_b.role), (Role::Admin, Role::Admin));
        // The older keeps the name (created_at in ms; on a tie the smaller
        // id wins), whichever node made it.
        let (ta, tb) = (&admin_a.token, &admin_b.token);
        let created = |id: &str| core.tokens.read().unwrap()[id].created_at;
        let a_wins = (created(&ta.id), &ta.id) <= (created(&tb.id), &tb.id);
        let (winner, loser) = if a_wins { (&who_a, &who_b) } else { (&who_b, &who_a) };
        let loser_id = if a_wins { &tb.id } else { &ta.id };
        assert_eq!(winner.name, "admin");
        assert_eq!(loser.name, format!("admin-{}", &loser_id[..6]));
        let report = core.health_report().await;
        let c = report.checks.iter().find(|c| c.name == "conflicts").unwrap();
        assert_eq!(c.status, crate::types::CheckStatus::Warning, "{}", c.message);
        assert!(c.message.contains(&loser.name), "{}", c.message);
    }
    assert_eq!(a.list_tokens(), b.list_tokens());
    // A revocation on B reaches A.
    b.execute(&Core::local_admin(0), Command::RevokeToken { token: "ops".into(), force: false })
        .await
        .unwrap();
    sync(&b, &a).await;
    assert!(a.authenticate(&ops).is_none());
    cleanup(&a, &[]).await;
    cleanup(&b, &[]).await;
}
