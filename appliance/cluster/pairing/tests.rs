//! The pairing state machines step by step, with a fake clock.

use super::*;

fn node(n: u8) -> NodeInfo {
    NodeInfo {
        node_id: Uuid::from_bytes([n; 16]),
        name: format!("node{n}"),
        addresses: vec![IpAddr::from([10, 0, 0, n])],
        api_port: 8443,
        link_port: 8444,
        fingerprint: fingerprint_text(&[n; 32]),
    }
}

const T0: u64 = 1_800_000_000_000;
const TTL: u64 = 600_000;

fn setup() -> (Inviter, JoinCode) {
    let mut a = Inviter::new(node(1));
    let code = a.invite(T0, TTL, [7; INVITE_RANDOM]);
    (a, code)
}

fn joiner(code: &JoinCode) -> Joiner {
    Joiner::new(code.clone(), node(2), [9; 16]).unwrap()
}

#[test]
fn codes_round_trip_and_typos_are_malformed() {
    let (_, code) = setup();
    assert!(code.secret.len() * 8 >= 128);
    let text = code.encode();
    assert!(text.starts_with("ncj"), "{text}");
    assert_eq!(JoinCode::decode(&text).unwrap(), code);
    // Pasted with a line break and in upper case: still the same code.
    let (head, tail) = text.split_at(40);
    assert_eq!(JoinCode::decode(&format!(" {}\n{} ", head.to_uppercase(), tail)).unwrap(), code);
    // One character changed: the checksum catches it.
    let mut typo = text.clone().into_bytes();
    typo[30] = if typo[30] == b'a' { b'b' } else { b'a' };
    let e = JoinCode::decode(std::str::from_utf8(&typo).unwrap()).unwrap_err();
    assert!(matches!(e, PairError::MalformedCode(ref m) if m.contains("checksum")), "{e}");
    assert_eq!(e.code(), "malformed_code");
    assert!(matches!(JoinCode::decode(&text[..text.len() - 3]), Err(PairError::MalformedCode(_))));
    assert!(matches!(JoinCode::decode("hello"), Err(PairError::MalformedCode(_))));
    assert!(matches!(JoinCode::decode("ncj0189"), Err(PairError::MalformedCode(_))));
    // Another format version, with a valid checksum: said so, not "malformed".
    let mut raw = unbase32(&text[3..]).unwrap();
    raw[0] = 2;
    let n = raw.len();
    let sum = checksum(&raw[..n - 4]);
    raw[n - 4..].copy_from_slice(&sum);
    assert_eq!(JoinCode::decode(&format!("ncj{}", base32(&raw))), Err(PairError::CodeVersion(2)));
}

#[test]
fn base32_matches_rfc4648() {
    assert_eq!(base32(b"foobar"), "mzxw6ytboi");
    assert_eq!(unbase32("mzxw6ytboi").unwrap(), b"foobar");
    assert_eq!(base32(b""), "");
}

#[test]
fn a_pairing_runs_and_both_sides_agree() {
    let (mut a, code) = setup();
    let b = joiner(&JoinCode::decode(&code.encode()).unwrap());
    let reply = a.prepare(T0 + 1000, None, &b.prepare()).unwrap();
    assert_eq!(reply.inviter.as_ref().unwrap(), &node(1));
    let on_b = b.accept(&reply).unwrap();
    assert_eq!(on_b.peer, node(1));
    let on_a = a.commit(T0 + 2000, &b.commit()).unwrap();
    assert_eq!(on_a.peer, node(2));
    assert_eq!(on_a.pair_key, on_b.pair_key);
    // The proofs never contain the secret.
    let wire = serde_json::to_string(&b.prepare()).unwrap() + &serde_json::to_string(&b.commit()).unwrap();
    assert!(!wire.contains(&hex::encode(code.secret)));
    // Used up: a replay of the same steps is refused.
    assert_eq!(a.prepare(T0 + 3000, None, &b.prepare()), Err(PairError::Used));
    assert_eq!(a.commit(T0 + 3000, &b.commit()), Err(PairError::Used));
}

#[test]
fn expired_codes_are_refused() {
    let (mut a, code) = setup();
    let b = joiner(&code);
    assert_eq!(a.prepare(T0 + TTL, None, &b.prepare()), Err(PairError::Expired));
    // And a late commit after a prepare in time.
    let code = a.invite(T0, TTL, [8; INVITE_RANDOM]);
    let b = joiner(&code);
    a.prepare(T0 + 1, None, &b.prepare()).unwrap();
    assert_eq!(a.commit(T0 + 2 + COMMIT_WINDOW_MS, &b.commit()), Err(PairError::Expired));
    assert_eq!(a.commit(T0 + 3, &b.commit()), Err(PairError::Used), "burnt after the window");
}

#[test]
fn a_wrong_secret_is_refused_and_burns_the_code_after_a_few_tries() {
    let (mut a, code) = setup();
    let mut wrong = code.clone();
    wrong.secret[0] ^= 1;
    let b = joiner(&wrong);
    for _ in 0..MAX_WRONG_PROOFS {
        assert_eq!(a.prepare(T0, None, &b.prepare()), Err(PairError::WrongSecret));
    }
    assert_eq!(a.prepare(T0, None, &joiner(&code).prepare()), Err(PairError::Used));
}

#[test]
fn a_forged_inviter_answer_is_refused() {
    let (mut a, code) = setup();
    let b = joiner(&code);
    let mut reply = a.prepare(T0, None, &b.prepare()).unwrap();
    let good = reply.clone();
    reply.proof = Some(hex::encode([0u8; 32]));
    assert_eq!(b.accept(&reply), Err(PairError::InviterProof));
    let mut other = good.clone();
    other.inviter.as_mut().unwrap().fingerprint = fingerprint_text(&[3; 32]);
    assert_eq!(b.accept(&other), Err(PairError::InviterProof));
    assert!(b.accept(&good).is_ok());
}

#[test]
fn self_and_already_paired_are_refused() {
    let (mut a, code) = setup();
    assert_eq!(Joiner::new(code.clone(), node(1), [0; 16]).unwrap_err(), PairError::SelfPair);
    let b = joiner(&code);
    assert_eq!(a.prepare(T0, Some("node3"), &b.prepare()), Err(PairError::AlreadyPaired("node3".into())));
    // A joiner claiming A's own certificate.
    let mut me_too = node(2);
    me_too.fingerprint = node(1).fingerprint;
    let code2 = a.invite(T0, TTL, [5; INVITE_RANDOM]);
    let fake = Joiner {
        code: code2.clone(),
        me: me_too,
        nonce: [1; 16],
        key: invite_key(&code2.secret, &code2.invite),
    };
    assert_eq!(a.prepare(T0, None, &fake.prepare()), Err(PairError::SelfPair));
}

#[test]
fn aborts_roll_back_at_either_step() {
    let (mut a, code) = setup();
    let b = joiner(&code);
    a.prepare(T0, None, &b.prepare()).unwrap();
    assert_eq!(a.abort(&b.abort()), Ok(None));
    assert_eq!(a.commit(T0, &b.commit()), Err(PairError::Used), "no commit after an abort");
    let code = a.invite(T0, TTL, [6; INVITE_RANDOM]);
    let b = joiner(&code);
    a.prepare(T0, None, &b.prepare()).unwrap();
    a.commit(T0, &b.commit()).unwrap();
    assert_eq!(a.abort(&b.abort()), Ok(Some(node(2).node_id)), "committed: the caller removes the peer");
    // An abort needs the secret too.
    let code = a.invite(T0, TTL, [4; INVITE_RANDOM]);
    let b = joiner(&code);
    a.prepare(T0, None, &b.prepare()).unwrap();
    let mut forged = code.clone();
    forged.secret[1] ^= 1;
    assert_eq!(a.abort(&joiner(&forged).abort()), Err(PairError::WrongSecret));
    assert!(a.commit(T0, &b.commit()).is_ok());
}

#[test]
fn a_restarted_inviter_knows_no_code() {
    let (_, code) = setup();
    let mut restarted = Inviter::new(node(1));
    assert_eq!(restarted.prepare(T0, None, &joiner(&code).prepare()), Err(PairError::UnknownInvite));
}

#[test]
fn protocol_version_mismatch_is_named() {
    let (mut a, code) = setup();
    let mut req = joiner(&code).prepare();
    if let Handshake::Prepare { version, .. } = &mut req {
        *version = 99;
    }
    assert_eq!(a.prepare(T0, None, &req), Err(PairError::ProtocolVersion(99)));
}

#[test]
fn peer_requests_need_the_pair_key_and_a_close_clock() {
    let key = [3u8; 32];
    let (a, b) = (node(1).node_id, node(2).node_id);
    let req = peer_request("unpair", &key, a, b, T0, [1; 16]);
    assert_eq!(verify_peer_request(&req, b, a, &key, T0 + 1000), Ok(()));
    assert_eq!(verify_peer_request(&req, b, a, &[4; 32], T0), Err(PairError::NotPeer));
    assert_eq!(verify_peer_request(&req, b, b, &key, T0), Err(PairError::NotPeer));
    assert_eq!(
        verify_peer_request(&req, a, a, &key, T0),
        Err(PairError::NotPeer),
        "addressed to another node"
    );
    assert_eq!(verify_peer_request(&req, b, a, &key, T0 + PEER_CLOCK_SKEW_MS + 1), Err(PairError::NotPeer));
    // A resolve cannot pass for an unpair: the step is in the proof.
    let Handshake::Unpair { from, at_ms, nonce, proof } = req else { panic!() };
    let as_resolve = Handshake::Resolve { from, at_ms, nonce, proof };
    assert_eq!(verify_peer_request(&as_resolve, b, a, &key, T0), Err(PairError::NotPeer));
}

#[test]
fn a_vm_request_proves_its_op() {
    let (a, b, key) = (Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]), [3u8; 32]);
    let vm = Uuid::from_bytes([9; 16]);
    let req = peer_vm_request(VmPeerOp::Start { vm, epoch: 4 }, &key, a, b, T0, [5; 16]);
    assert_eq!(req.check(), Ok(()));
    assert_eq!(verify_peer_request(&req, b, a, &key, T0), Ok(()));
    assert_eq!(verify_peer_request(&req, b, a, &[4; 32], T0), Err(PairError::NotPeer));
    // Another epoch, another VM or another op under the same proof: refused.
    for op in [VmPeerOp::Start { vm, epoch: 5 }, VmPeerOp::Start { vm: a, epoch: 4 }, VmPeerOp::Epochs] {
        let Handshake::Vm { from, at_ms, nonce, proof, .. } = req.clone() else { panic!() };
        let forged = Handshake::Vm { from, at_ms, nonce, op, proof };
        assert_eq!(verify_peer_request(&forged, b, a, &key, T0), Err(PairError::NotPeer));
    }
    let v = serde_json::to_value(&req).unwrap();
    assert_eq!((v["step"].as_str(), v["op"]["op"].as_str()), (Some("vm"), Some("start")), "{v}");
    assert_eq!(serde_json::from_value::<Handshake>(v).unwrap(), req);
}

#[test]
fn handshake_json_is_strict() {
    let (_, code) = setup();
    let mut v = serde_json::to_value(joiner(&code).prepare()).unwrap();
    assert_eq!(v["step"], "prepare");
    v["extra"] = serde_json::json!(1);
    assert!(serde_json::from_value::<Handshake>(v).is_err());
    assert!(serde_json::from_str::<Handshake>(r#"{"step":"explode"}"#).is_err());
}
