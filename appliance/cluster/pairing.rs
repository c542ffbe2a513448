//! Pairing two nodes with a one-time join code, as plain state machines:
//! time (unix ms) and randomness are parameters, the core does the I/O.
//!
//! The inviter (A) makes a code: its node id, addresses, API port,
//! certificate fingerprint, an invite id, a 160-bit secret and an expiry.
//! The joiner (B) connects to A over HTTPS pinned to that fingerprint and
//! runs the steps below, each proven with HMAC-SHA256 under a key derived
//! from the secret, so the secret itself never travels:
//!
//! - `prepare`: B sends its identity, a nonce and proof("join"); A checks it
//!   and answers with its identity and proof("accept"), so B knows A holds
//!   the secret too. Nothing is persisted yet; the code is used up.
//! - B persists A as `joining`, then `commit` (proof "commit"): A persists B.
//!   That write is the commit point. B then marks A `paired`.
//! - `abort` (proof "abort"), when commit's answer did not come: A forgets B.
//!   A `joining` row left by a crash is settled at B's next start with
//!   `resolve`, authenticated by the pair key both sides derived.
//!
//! Every proof covers both node ids, both certificate fingerprints, the
//! invite id and B's nonce; each direction and step has its own label.

use ring::hmac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use uuid::Uuid;

/// The join code's format version (its first byte).
pub const CODE_VERSION: u8 = 1;
/// The handshake's version, sent in `prepare`.
pub const PROTOCOL_VERSION: u32 = 1;
/// What a code starts with, so a person can tell it from other strings.
pub const CODE_PREFIX: &str = "ncj";
pub const SECRET_LEN: usize = 20;
pub const DEFAULT_TTL_SECS: u64 = 600;
pub const MAX_TTL_SECS: u64 = 86_400;
/// How long A waits for `commit` after `prepare`.
pub const COMMIT_WINDOW_MS: u64 = 30_000;
/// Wrong proofs one invitation takes before it is burnt.
pub const MAX_WRONG_PROOFS: u32 = 5;
/// How far the clock of a peer-authenticated request may be off.
pub const PEER_CLOCK_SKEW_MS: u64 = 300_000;
/// Random bytes [`Inviter::invite`] needs: invite id + secret.
pub const INVITE_RANDOM: usize = 8 + SECRET_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    #[error("malformed join code: {0}")]
    MalformedCode(String),
    #[error("join code format {0} is not supported (this node reads format {CODE_VERSION})")]
    CodeVersion(u8),
    #[error("malformed pairing request: {0}")]
    Malformed(String),
    #[error("pairing protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    ProtocolVersion(u32),
    #[error("the join code has expired; make a new one with `novacron peer invite`")]
    Expired,
    #[error("the join code was already used; make a new one with `novacron peer invite`")]
    Used,
    #[error("no such invitation on this node (it was made elsewhere, or the daemon restarted since)")]
    UnknownInvite,
    #[error("the join code's secret does not match (a wrong or altered code)")]
    WrongSecret,
    #[error("the other node could not prove it holds the join secret")]
    InviterProof,
    #[error("this node is already paired with {0}; unpair it first")]
    AlreadyPaired(String),
    #[error("a node cannot pair with itself")]
    SelfPair,
    #[error("the server at {addr} does not have the certificate the join code names")]
    FingerprintMismatch { addr: String },
    #[error("cannot reach the other node: {0}")]
    Unreachable(String),
    /// The other node answered with an error; `code` is its JSON code.
    #[error("the other node refused: {message}")]
    Refused { code: &'static str, message: String },
    #[error("this node is not paired")]
    NotPaired,
    #[error("the request is not from the paired node, or its clock is more than 5 minutes off")]
    NotPeer,
    #[error("pairing with {0} is not finished: the other node did not answer its last step; it is settled when the other node answers again")]
    Incomplete(String),
}

/// The codes [`PairError`] answers with, so a refusal relayed from the
/// other node keeps its code.
pub const CODES: &[&str] = &[
    "malformed_code",
    "unsupported_code_version",
    "invalid_value",
    "protocol_version",
    "invite_expired",
    "invite_used",
    "invite_unknown",
    "wrong_secret",
    "inviter_proof",
    "already_paired",
    "pair_self",
    "fingerprint_mismatch",
    "peer_unreachable",
    "not_paired",
    "not_peer",
    "pairing_incomplete",
];

impl PairError {
    pub fn code(&self) -> &'static str {
        match self {
            PairError::MalformedCode(_) => "malformed_code",
            PairError::CodeVersion(_) => "unsupported_code_version",
            PairError::Malformed(_) => "invalid_value",
            PairError::ProtocolVersion(_) => "protocol_version",
            PairError::Expired => "invite_expired",
            PairError::Used => "invite_used",
            PairError::UnknownInvite => "invite_unknown",
            PairError::WrongSecret => "wrong_secret",
            PairError::InviterProof => "inviter_proof",
            PairError::AlreadyPaired(_) => "already_paired",
            PairError::SelfPair => "pair_self",
            PairError::FingerprintMismatch { .. } => "fingerprint_mismatch",
            PairError::Unreachable(_) => "peer_unreachable",
            PairError::Refused { code, .. } => code,
            PairError::NotPaired => "not_paired",
            PairError::NotPeer => "not_peer",
            PairError::Incomplete(_) => "pairing_incomplete",
        }
    }

    /// The other node's error answer, keeping its code when it is one of ours.
    pub fn refused(code: &str, message: &str) -> PairError {
        let code = CODES.iter().find(|c| **c == code).copied().unwrap_or("peer_refused");
        PairError::Refused { code, message: message.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, PairError>;

/// A node as the other one pins it (the peer row holds the same).
pub use crate::types::NodeInfo;

/// What a join code carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinCode {
    pub invite: [u8; 8],
    pub node_id: Uuid,
    pub addresses: Vec<IpAddr>,
    pub api_port: u16,
    /// `AB:CD:...`.
    pub fingerprint: String,
    pub secret: [u8; SECRET_LEN],
    pub expires_at_ms: u64,
}

/// The postcard body of a code (field order is the format: never reorder).
#[derive(Serialize, Deserialize)]
struct CodeBody {
    invite: [u8; 8],
    node_id: [u8; 16],
    addresses: Vec<IpAddr>,
    api_port: u16,
    fingerprint: [u8; 32],
    secret: [u8; SECRET_LEN],
    expires_at_ms: u64,
}

const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

fn base32(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(B32[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(B32[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn unbase32(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = B32.iter().position(|&x| x == c)? as u32;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// 32 raw bytes of an `AB:CD:...` fingerprint.
pub fn fingerprint_bytes(fp: &str) -> Option<[u8; 32]> {
    let hex: String = fp.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    hex::decode(hex).ok()?.try_into().ok()
}

fn fingerprint_text(raw: &[u8; 32]) -> String {
    raw.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

fn checksum(data: &[u8]) -> [u8; 4] {
    Sha256::digest(data)[..4].try_into().expect("4 bytes")
}

impl JoinCode {
    /// `ncj` + base32 of: version byte, postcard body, 4 checksum bytes.
    pub fn encode(&self) -> String {
        let body = CodeBody {
            invite: self.invite,
            node_id: *self.node_id.as_bytes(),
            addresses: self.addresses.clone(),
            api_port: self.api_port,
            fingerprint: fingerprint_bytes(&self.fingerprint).unwrap_or([0; 32]),
            secret: self.secret,
            expires_at_ms: self.expires_at_ms,
        };
        let mut bytes = vec![CODE_VERSION];
        bytes.extend(postcard::to_stdvec(&body).expect("a code body serializes"));
        let sum = checksum(&bytes);
        bytes.extend(sum);
        format!("{CODE_PREFIX}{}", base32(&bytes))
    }

    /// Reads a code; whitespace and case are ignored (it may have been
    /// retyped or wrapped). A typo fails the checksum: "malformed", never a
    /// network error later.
    pub fn decode(text: &str) -> Result<JoinCode> {
        let bad = |m: &str| PairError::MalformedCode(m.to_string());
        let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_lowercase();
        let rest = clean.strip_prefix(CODE_PREFIX).ok_or_else(|| bad("it does not start with \"ncj\""))?;
        let bytes = unbase32(rest).ok_or_else(|| bad("it has characters a code never has"))?;
        if bytes.len() < 1 + 4 {
            return Err(bad("it is too short"));
        }
        let (data, sum) = bytes.split_at(bytes.len() - 4);
        if checksum(data) != sum {
            return Err(bad("its checksum does not match (a typo, or a cut-off copy?)"));
        }
        if data[0] != CODE_VERSION {
            return Err(PairError::CodeVersion(data[0]));
        }
        let body: CodeBody = postcard::from_bytes(&data[1..]).map_err(|e| bad(&e.to_string()))?;
        if body.addresses.is_empty() {
            return Err(bad("it names no address"));
        }
        Ok(JoinCode {
            invite: body.invite,
            node_id: Uuid::from_bytes(body.node_id),
            addresses: body.addresses,
            api_port: body.api_port,
            fingerprint: fingerprint_text(&body.fingerprint),
            secret: body.secret,
            expires_at_ms: body.expires_at_ms,
        })
    }
}

/// One request of the handshake (`POST /v1/peer/handshake`), node to node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Handshake {
    Prepare {
        version: u32,
        invite: String,
        joiner: NodeInfo,
        nonce: String,
        proof: String,
    },
    Commit {
        invite: String,
        joiner: Uuid,
        proof: String,
    },
    Abort {
        invite: String,
        joiner: Uuid,
        proof: String,
    },
    /// A joiner with a `joining` row asks whether the pairing stands.
    Resolve {
        from: Uuid,
        at_ms: u64,
        nonce: String,
        proof: String,
    },
    /// The peer unpairs.
    Unpair {
        from: Uuid,
        at_ms: u64,
        nonce: String,
        proof: String,
    },
    /// The paired node asks about or hands over VMs (the proof covers `op`).
    Vm {
        from: Uuid,
        at_ms: u64,
        nonce: String,
        op: VmPeerOp,
        proof: String,
    },
}

/// What one paired node asks of the other about VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmPeerOp {
    /// The owner and epoch of every VM as the answering node holds them:
    /// asked before a node starts VMs the peer could have taken over.
    Epochs,
    /// A planned move: the asking node stopped `vm` and handed it to the
    /// answering node at `epoch`; start it there.
    Start { vm: Uuid, epoch: u64 },
}

/// A VM's owner and epoch, as one node holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEpoch {
    pub vm: Uuid,
    pub owner: Uuid,
    pub epoch: u64,
}

impl Handshake {
    /// Refuses malformed fields before anything is looked up, so a bad
    /// request is a 400 whatever state this node is in.
    pub fn check(&self) -> Result<()> {
        let proof = match self {
            Handshake::Prepare { invite, joiner, nonce, proof, .. } => {
                hex_field::<8>("invite", invite)?;
                hex_field::<16>("nonce", nonce)?;
                ident(joiner)?;
                proof
            }
            Handshake::Commit { invite, proof, .. } | Handshake::Abort { invite, proof, .. } => {
                hex_field::<8>("invite", invite)?;
                proof
            }
            Handshake::Resolve { nonce, proof, .. }
            | Handshake::Unpair { nonce, proof, .. }
            | Handshake::Vm { nonce, proof, .. } => {
                hex_field::<16>("nonce", nonce)?;
                proof
            }
        };
        hex_field::<32>("proof", proof).map(drop)
    }

    pub fn step(&self) -> &'static str {
        match self {
            Handshake::Prepare { .. } => "prepare",
            Handshake::Commit { .. } => "commit",
            Handshake::Abort { .. } => "abort",
            Handshake::Resolve { .. } => "resolve",
            Handshake::Unpair { .. } => "unpair",
            Handshake::Vm { .. } => "vm",
        }
    }

    /// What the proof signs as the step: the op's JSON for `vm`, so a
    /// proof for one op does not pass for another.
    fn signed_step(&self) -> String {
        match self {
            Handshake::Vm { op, .. } => format!("vm/{}", serde_json::to_string(op).expect("ops serialize")),
            other => other.step().to_string(),
        }
    }
}

/// The answer to a [`Handshake`]. `paired`: the answering node now has
/// (prepare: would have) the asking node as its peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeReply {
    pub paired: bool,
    /// Prepare only: the inviter and its proof("accept").
    #[serde(default)]
    pub inviter: Option<NodeInfo>,
    #[serde(default)]
    pub proof: Option<String>,
    /// `vm` `epochs` only: the answering node's VMs.
    #[serde(default)]
    pub epochs: Option<Vec<VmEpoch>>,
}

/// A pairing both sides agree on: the peer and the key they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paired {
    pub peer: NodeInfo,
    pub pair_key: [u8; 32],
}

fn invite_key(secret: &[u8], invite: &[u8; 8]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut msg = b"novacron/pair/v1/key\0".to_vec();
    msg.extend(invite);
    hmac::sign(&k, &msg).as_ref().try_into().expect("32 bytes")
}

/// What every pairing proof covers, after its label.
struct Transcript<'a> {
    invite: &'a [u8; 8],
    inviter: (Uuid, [u8; 32]),
    joiner: (Uuid, [u8; 32]),
    nonce: &'a [u8; 16],
}

impl Transcript<'_> {
    fn message(&self, label: &str) -> Vec<u8> {
        let mut msg = format!("novacron/pair/v1/{label}\0").into_bytes();
        msg.extend(self.invite);
        msg.extend(self.inviter.0.as_bytes());
        msg.extend(self.inviter.1);
        msg.extend(self.joiner.0.as_bytes());
        msg.extend(self.joiner.1);
        msg.extend(self.nonce);
        msg
    }

    fn mac(&self, key: &[u8; 32], label: &str) -> [u8; 32] {
        let k = hmac::Key::new(hmac::HMAC_SHA256, key);
        hmac::sign(&k, &self.message(label)).as_ref().try_into().expect("32 bytes")
    }

    fn verify(&self, key: &[u8; 32], label: &str, proof: &str) -> bool {
        let Ok(given) = hex::decode(proof) else { return false };
        // Constant time, so a wrong proof teaches nothing about the right one.
        hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), &self.message(label), &given).is_ok()
    }
}

fn ident(n: &NodeInfo) -> Result<(Uuid, [u8; 32])> {
    let fp = fingerprint_bytes(&n.fingerprint)
        .ok_or_else(|| PairError::Malformed(format!("fingerprint {:?} is not a SHA-256", n.fingerprint)))?;
    Ok((n.node_id, fp))
}

fn hex_field<const N: usize>(name: &str, s: &str) -> Result<[u8; N]> {
    hex::decode(s)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| PairError::Malformed(format!("{name} must be {N} bytes of hex")))
}

#[derive(Debug)]
enum InviteState {
    Open,
    Prepared {
        joiner: NodeInfo,
        nonce: [u8; 16],
        deadline_ms: u64,
    },
    Committed {
        joiner: NodeInfo,
        nonce: [u8; 16],
    },
    /// Aborted, timed out, or too many wrong proofs: refused for good.
    Burnt,
}

#[derive(Debug)]
struct Invite {
    /// Derived from the secret; the secret itself is not kept.
    key: [u8; 32],
    expires_at_ms: u64,
    state: InviteState,
    wrong: u32,
}

/// The inviting side: outstanding invitations, in memory only (a restart
/// forgets them, so no secret material is ever on disk).
#[derive(Debug)]
pub struct Inviter {
    me: NodeInfo,
    invites: HashMap<[u8; 8], Invite>,
}

impl Inviter {
    pub fn new(me: NodeInfo) -> Inviter {
        Inviter { me, invites: HashMap::new() }
    }

    /// This node's identity as the codes and replies give it (its addresses
    /// can change with the configuration).
    pub fn set_identity(&mut self, me: NodeInfo) {
        self.me = me;
    }

    /// A new one-time code valid for `ttl_ms`.
    pub fn invite(&mut self, now_ms: u64, ttl_ms: u64, random: [u8; INVITE_RANDOM]) -> JoinCode {
        self.forget_old(now_ms);
        let invite: [u8; 8] = random[..8].try_into().expect("8 bytes");
        let secret: [u8; SECRET_LEN] = random[8..].try_into().expect("secret bytes");
        let expires_at_ms = now_ms + ttl_ms;
        self.invites.insert(
            invite,
            Invite { key: invite_key(&secret, &invite), expires_at_ms, state: InviteState::Open, wrong: 0 },
        );
        JoinCode {
            invite,
            node_id: self.me.node_id,
            addresses: self.me.addresses.clone(),
            api_port: self.me.api_port,
            fingerprint: self.me.fingerprint.clone(),
            secret,
            expires_at_ms,
        }
    }

    /// Drops invitations that expired over an hour ago (a late attempt
    /// still hears "expired" rather than "unknown" for that long).
    fn forget_old(&mut self, now_ms: u64) {
        self.invites.retain(|_, i| i.expires_at_ms + 3_600_000 > now_ms);
    }

    fn transcript<'a>(
        &self,
        invite: &'a [u8; 8],
        joiner: &NodeInfo,
        nonce: &'a [u8; 16],
    ) -> Result<Transcript<'a>> {
        Ok(Transcript { invite, inviter: ident(&self.me)?, joiner: ident(joiner)?, nonce })
    }

    /// Step 1 on A. `paired_with`: the name of A's current peer, if any.
    pub fn prepare(
        &mut self,
        now_ms: u64,
        paired_with: Option<&str>,
        req: &Handshake,
    ) -> Result<HandshakeReply> {
        let Handshake::Prepare { version, invite, joiner, nonce, proof } = req else {
            return Err(PairError::Malformed("not a prepare step".into()));
        };
        if *version != PROTOCOL_VERSION {
            return Err(PairError::ProtocolVersion(*version));
        }
        let id: [u8; 8] = hex_field("invite", invite)?;
        let nonce: [u8; 16] = hex_field("nonce", nonce)?;
        let t = self.transcript(&id, joiner, &nonce)?;
        let inv = self.invites.get_mut(&id).ok_or(PairError::UnknownInvite)?;
        if !matches!(inv.state, InviteState::Open) {
            return Err(PairError::Used);
        }
        if now_ms >= inv.expires_at_ms {
            return Err(PairError::Expired);
        }
        if !t.verify(&inv.key, "join", proof) {
            inv.wrong += 1;
            if inv.wrong >= MAX_WRONG_PROOFS {
                inv.state = InviteState::Burnt;
            }
            return Err(PairError::WrongSecret);
        }
        if let Some(peer) = paired_with {
            return Err(PairError::AlreadyPaired(peer.to_string()));
        }
        if joiner.node_id == self.me.node_id || t.joiner.1 == t.inviter.1 {
            return Err(PairError::SelfPair);
        }
        let reply = HandshakeReply {
            paired: false,
            inviter: Some(self.me.clone()),
            proof: Some(hex::encode(t.mac(&inv.key, "accept"))),
            epochs: None,
        };
        inv.state =
            InviteState::Prepared { joiner: joiner.clone(), nonce, deadline_ms: now_ms + COMMIT_WINDOW_MS };
        Ok(reply)
    }

    /// Step 2 on A: the pairing to persist. The caller persists it and
    /// answers; if it cannot, the joiner rolls back on the error.
    pub fn commit(&mut self, now_ms: u64, req: &Handshake) -> Result<Paired> {
        let Handshake::Commit { invite, joiner, proof } = req else {
            return Err(PairError::Malformed("not a commit step".into()));
        };
        let id: [u8; 8] = hex_field("invite", invite)?;
        let me = ident(&self.me)?;
        let inv = self.invites.get_mut(&id).ok_or(PairError::UnknownInvite)?;
        let InviteState::Prepared { joiner: j, nonce, deadline_ms } = &inv.state else {
            return Err(match inv.state {
                InviteState::Open => PairError::Malformed("commit before prepare".into()),
                _ => PairError::Used,
            });
        };
        if j.node_id != *joiner {
            return Err(PairError::Used);
        }
        let t = Transcript { invite: &id, inviter: me, joiner: ident(j)?, nonce };
        if !t.verify(&inv.key, "commit", proof) {
            return Err(PairError::WrongSecret);
        }
        if now_ms > *deadline_ms {
            inv.state = InviteState::Burnt;
            return Err(PairError::Expired);
        }
        let paired = Paired { peer: j.clone(), pair_key: t.mac(&inv.key, "peer-key") };
        inv.state = InviteState::Committed { joiner: j.clone(), nonce: *nonce };
        Ok(paired)
    }

    /// On A: the joiner gives up. Returns the joiner's id when the pairing
    /// had been committed here, so the caller removes that peer.
    pub fn abort(&mut self, req: &Handshake) -> Result<Option<Uuid>> {
        let Handshake::Abort { invite, joiner, proof } = req else {
            return Err(PairError::Malformed("not an abort step".into()));
        };
        let id: [u8; 8] = hex_field("invite", invite)?;
        let me = ident(&self.me)?;
        let inv = self.invites.get_mut(&id).ok_or(PairError::UnknownInvite)?;
        let (j, nonce, committed) = match &inv.state {
            InviteState::Prepared { joiner, nonce, .. } => (joiner.clone(), *nonce, false),
            InviteState::Committed { joiner, nonce } => (joiner.clone(), *nonce, true),
            _ => return Err(PairError::Used),
        };
        if j.node_id != *joiner {
            return Err(PairError::Used);
        }
        let t = Transcript { invite: &id, inviter: me, joiner: ident(&j)?, nonce: &nonce };
        if !t.verify(&inv.key, "abort", proof) {
            return Err(PairError::WrongSecret);
        }
        inv.state = InviteState::Burnt;
        Ok(committed.then_some(j.node_id))
    }

    /// Outstanding (open) invitations, for metrics.
    pub fn open_invites(&self, now_ms: u64) -> usize {
        self.invites
            .values()
            .filter(|i| matches!(i.state, InviteState::Open) && now_ms < i.expires_at_ms)
            .count()
    }
}

/// The joining side of one attempt.
#[derive(Debug)]
pub struct Joiner {
    code: JoinCode,
    me: NodeInfo,
    nonce: [u8; 16],
    key: [u8; 32],
}

impl Joiner {
    /// Refuses a code of this very node before anything is sent.
    pub fn new(code: JoinCode, me: NodeInfo, nonce: [u8; 16]) -> Result<Joiner> {
        if code.node_id == me.node_id
            || fingerprint_bytes(&code.fingerprint) == fingerprint_bytes(&me.fingerprint)
        {
            return Err(PairError::SelfPair);
        }
        ident(&me)?;
        let key = invite_key(&code.secret, &code.invite);
        Ok(Joiner { code, me, nonce, key })
    }

    pub fn code(&self) -> &JoinCode {
        &self.code
    }

    fn transcript(&self) -> Transcript<'_> {
        Transcript {
            invite: &self.code.invite,
            inviter: (self.code.node_id, fingerprint_bytes(&self.code.fingerprint).unwrap_or([0; 32])),
            joiner: ident(&self.me).expect("checked in new"),
            nonce: &self.nonce,
        }
    }

    pub fn prepare(&self) -> Handshake {
        Handshake::Prepare {
            version: PROTOCOL_VERSION,
            invite: hex::encode(self.code.invite),
            joiner: self.me.clone(),
            nonce: hex::encode(self.nonce),
            proof: hex::encode(self.transcript().mac(&self.key, "join")),
        }
    }

    /// Checks A's answer to `prepare`: A must be the node the code names and
    /// prove the secret.
    pub fn accept(&self, reply: &HandshakeReply) -> Result<Paired> {
        let (Some(inviter), Some(proof)) = (&reply.inviter, &reply.proof) else {
            return Err(PairError::InviterProof);
        };
        if inviter.node_id != self.code.node_id
            || fingerprint_bytes(&inviter.fingerprint) != fingerprint_bytes(&self.code.fingerprint)
        {
            return Err(PairError::InviterProof);
        }
        let t = self.transcript();
        if !t.verify(&self.key, "accept", proof) {
            return Err(PairError::InviterProof);
        }
        Ok(Paired { peer: inviter.clone(), pair_key: t.mac(&self.key, "peer-key") })
    }

    pub fn commit(&self) -> Handshake {
        Handshake::Commit {
            invite: hex::encode(self.code.invite),
            joiner: self.me.node_id,
            proof: hex::encode(self.transcript().mac(&self.key, "commit")),
        }
    }

    pub fn abort(&self) -> Handshake {
        Handshake::Abort {
            invite: hex::encode(self.code.invite),
            joiner: self.me.node_id,
            proof: hex::encode(self.transcript().mac(&self.key, "abort")),
        }
    }
}

fn peer_message(step: &str, from: Uuid, to: Uuid, at_ms: u64, nonce: &[u8; 16]) -> Vec<u8> {
    let mut msg = format!("novacron/peer/v1/{step}\0").into_bytes();
    msg.extend(from.as_bytes());
    msg.extend(to.as_bytes());
    msg.extend(at_ms.to_be_bytes());
    msg.extend(nonce);
    msg
}

/// A request from one paired node to the other (`resolve`, `unpair`),
/// authenticated with their pair key.
pub fn peer_request(
    step: &str,
    pair_key: &[u8],
    from: Uuid,
    to: Uuid,
    now_ms: u64,
    nonce: [u8; 16],
) -> Handshake {
    let k = hmac::Key::new(hmac::HMAC_SHA256, pair_key);
    let proof = hex::encode(hmac::sign(&k, &peer_message(step, from, to, now_ms, &nonce)));
    let (at_ms, nonce) = (now_ms, hex::encode(nonce));
    match step {
        "resolve" => Handshake::Resolve { from, at_ms, nonce, proof },
        _ => Handshake::Unpair { from, at_ms, nonce, proof },
    }
}

/// A `vm` request to the paired node, authenticated with the pair key.
pub fn peer_vm_request(
    op: VmPeerOp,
    pair_key: &[u8],
    from: Uuid,
    to: Uuid,
    now_ms: u64,
    nonce: [u8; 16],
) -> Handshake {
    let mut req = Handshake::Vm { from, at_ms: now_ms, nonce: hex::encode(nonce), op, proof: String::new() };
    let k = hmac::Key::new(hmac::HMAC_SHA256, pair_key);
    let signed = hex::encode(hmac::sign(&k, &peer_message(&req.signed_step(), from, to, now_ms, &nonce)));
    if let Handshake::Vm { proof, .. } = &mut req {
        *proof = signed;
    }
    req
}

/// Checks a `resolve`, `unpair` or `vm` from `peer` (our peer's id and pair key).
pub fn verify_peer_request(
    req: &Handshake,
    me: Uuid,
    peer: Uuid,
    pair_key: &[u8],
    now_ms: u64,
) -> Result<()> {
    let (Handshake::Resolve { from, at_ms, nonce, proof }
    | Handshake::Unpair { from, at_ms, nonce, proof }
    | Handshake::Vm { from, at_ms, nonce, proof, .. }) = req
    else {
        return Err(PairError::Malformed("not a peer request".into()));
    };
    let nonce: [u8; 16] = hex_field("nonce", nonce)?;
    let given = hex::decode(proof).map_err(|_| PairError::NotPeer)?;
    if *from != peer || now_ms.abs_diff(*at_ms) > PEER_CLOCK_SKEW_MS {
        return Err(PairError::NotPeer);
    }
    let k = hmac::Key::new(hmac::HMAC_SHA256, pair_key);
    if hmac::verify(&k, &peer_message(&req.signed_step(), *from, me, *at_ms, &nonce), &given).is_err() {
        return Err(PairError::NotPeer);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
