//! The store's side of replication: the feed of this node's changes, the
//! snapshot a new peer starts from, applying the peer's changes exactly
//! once, pruning, and name conflicts between the two nodes.
//!
//! Numbers: every node numbers its own changes densely (1, 2, 3...), its
//! "origin seq". A receiver keeps, per origin, the highest number applied
//! (the `applied` table), written in the same transaction as the apply:
//! a number at or below it is a resend and is skipped, the next one is
//! applied, and one beyond the next is a gap (refused, the sender resends
//! from the mark). The rules are in docs/design/replication-state.md.

use super::{
    apply, get_counter, last_seq, now_ms, set_counter, wire, Change, ImageRecord, NetworkRecord, Result,
    Store, StoreError, TokenRecord, VmRecord,
};
use rusqlite::{params, OptionalExtension, Transaction};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// One of this node's changes as the peer link carries it: its origin seq
/// and the encoded change (format version byte first), opaque to the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChange {
    pub seq: u64,
    /// When it was committed (Unix ms): the replication lag in seconds.
    pub at: i64,
    pub bytes: Vec<u8>,
}

/// The answer to "what came after seq N".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The next changes, in order (empty: the peer is up to date).
    Changes(Vec<EncodedChange>),
    /// Changes the peer needs were pruned (it was acknowledged away or
    /// behind the retention): it must start again from a [`Snapshot`].
    Reseed { pruned_through: u64 },
}

/// Current state as put-changes, and this node's seq it corresponds to:
/// a peer applies it, then follows [`Store::changes_since`] from `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    pub changes: Vec<Vec<u8>>,
}

/// The outcome of applying one remote change.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Applied; what changed in this node's state (empty when the change
    /// was a no-op here, like deleting what is gone; more than the change
    /// itself when a name conflict renamed a local record too).
    Applied(Vec<Change>),
    /// At or below the origin's high-water mark: already applied, skipped.
    Duplicate,
}

/// How long this node keeps its own changes once the peer acknowledged
/// them. A row goes when it is acknowledged (or no peer ever acknowledged
/// anything) and either older than `keep_ms` or more than `keep_rows`
/// rows behind the newest; and beyond `max_rows` even unacknowledged (the
/// peer then re-seeds: a peer gone for months must not fill the disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_ms: i64,
    pub keep_rows: u64,
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { keep_ms: 24 * 3600 * 1000, keep_rows: 10_000, max_rows: 1_000_000 }
    }
}

/// A name conflict resolved while applying a peer's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictRecord {
    pub at: i64,
    /// `vm`, `token`, `image` or `network`.
    pub kind: String,
    /// The name both records had.
    pub name: String,
    /// Id (or content hash) of the record that kept the name.
    pub kept: String,
    /// Id (or content hash) of the other one.
    pub loser: String,
    /// `renamed to NAME-abc123`, or `set aside: ...` when renaming is not
    /// enough (its bridge or file is the winner's too).
    pub outcome: String,
}

const PRUNED_THROUGH: &str = "changes_pruned_through";

impl Store {
    /// This node's own changes after `after` (an origin seq the peer has),
    /// at most `limit`, or [`Tail::Reseed`] when some of them were pruned.
    /// Changes applied here from the peer are never in it (no echo).
    pub fn changes_since(&self, after: u64, limit: usize) -> Result<Tail> {
        let conn = self.lock();
        let pruned = get_counter(&conn, PRUNED_THROUGH)?.max(0) as u64;
        if after < pruned {
            return Ok(Tail::Reseed { pruned_through: pruned });
        }
        let mut stmt = conn.prepare_cached(
            "SELECT origin_seq, at, payload FROM changes WHERE origin = ?1 AND origin_seq > ?2
             ORDER BY origin_seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![self.node.to_string(), after as i64, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at, mut bytes) = row?;
            // Rows from the first release: the peer gets the current format.
            if bytes.first() != Some(&wire::CHANGE_FORMAT) {
                bytes = Change::decode(&bytes).map_err(StoreError::Corrupt)?.encode();
            }
            out.push(EncodedChange { seq: seq as u64, at, bytes });
        }
        Ok(Tail::Changes(out))
    }

    /// The whole replicated state as put-changes, with the seq of this
    /// node's newest change it contains (read under the store's one lock,
    /// so no commit falls in between).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let conn = self.lock();
        let seq = last_seq(&conn)?.max(0) as u64;
        let mut changes = Vec::new();
        // Order matters for the receiver: snapshots need their VM.
        changes.extend(Store::read_tokens(&conn)?.into_iter().map(Change::TokenPut));
        changes.extend(Store::read_networks(&conn)?.into_iter().map(Change::NetworkPut));
        changes.extend(Store::read_images(&conn)?.into_iter().map(Change::ImagePut));
        let vms = Store::read_vms(&conn)?;
        changes.extend(vms.into_iter().map(Change::VmPut));
        changes.extend(Store::read_snapshots(&conn)?.into_iter().map(Change::SnapshotPut));
        Ok(Snapshot { seq, changes: changes.iter().map(Change::encode).collect() })
    }

    /// The highest seq of `origin`'s changes applied here (0: none).
    pub fn applied_mark(&self, origin: Uuid) -> Result<u64> {
        mark(&self.lock(), origin)
    }

    /// Applies change `seq` made on `origin` (a peer), exactly once: the
    /// origin's mark moves in the same transaction. See [`Applied`].
    pub fn apply_remote(&self, origin: Uuid, seq: u64, change: &Change) -> Result<Applied> {
        let mut one = self.apply_remote_batch(origin, &[(seq, change.clone())])?;
        Ok(one.remove(0))
    }

    /// Applies a batch of `origin`'s changes in one transaction (one disk
    /// flush for all), each exactly once, with one result per change. A
    /// gap anywhere fails the whole batch: nothing of it is applied.
    pub fn apply_remote_batch(&self, origin: Uuid, batch: &[(u64, Change)]) -> Result<Vec<Applied>> {
        if origin == self.node {
            // Our own changes coming back: already here by definition.
            return Ok(vec![Applied::Duplicate; batch.len()]);
        }
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let before = mark(&tx, origin)?;
        let mut m = before;
        let mut out = Vec::with_capacity(batch.len());
        for (seq, change) in batch {
            if *seq <= m {
                out.push(Applied::Duplicate);
                continue;
            }
            if *seq != m + 1 {
                return Err(StoreError::Gap { origin, expected: m + 1, got: *seq });
            }
            let effects = apply_from_peer(&tx, self.node, origin, change)?;
            tx.execute(
                "INSERT INTO changes (at, payload, origin, origin_seq) VALUES (?1, ?2, ?3, ?4)",
                params![now_ms(), change.encode(), origin.to_string(), *seq as i64],
            )?;
            m = *seq;
            out.push(Applied::Applied(effects));
        }
        if m > before {
            set_mark(&tx, origin, m)?;
            tx.commit()?;
        }
        Ok(out)
    }

    /// Applies a peer's [`Snapshot`] (decoded) in one transaction and sets
    /// its mark to the snapshot's seq. The changes are applied like any of
    /// the peer's changes (upserts; conflicts resolved), so seeding a node
    /// that has state of its own merges the two. A snapshot at or below the
    /// mark is skipped.
    pub fn apply_snapshot(&self, origin: Uuid, seq: u64, changes: &[Change]) -> Result<Applied> {
        if origin == self.node {
            return Ok(Applied::Duplicate);
        }
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if seq <= mark(&tx, origin)? && seq > 0 {
            return Ok(Applied::Duplicate);
        }
        let mut effects = Vec::new();
        for change in changes {
            effects.extend(apply_from_peer(&tx, self.node, origin, change)?);
        }
        set_mark(&tx, origin, seq)?;
        tx.commit()?;
        Ok(Applied::Applied(effects))
    }

    /// Records that `peer` has applied this node's changes up to `seq`.
    pub fn record_peer_ack(&self, peer: Uuid, seq: u64) -> Result<()> {
        self.lock().execute(
            "INSERT INTO peer_acks (peer, seq, at) VALUES (?1, ?2, ?3)
             ON CONFLICT(peer) DO UPDATE SET seq = MAX(seq, excluded.seq), at = excluded.at",
            params![peer.to_string(), seq as i64, now_ms()],
        )?;
        Ok(())
    }

    /// Deletes change rows the retention no longer keeps (see
    /// [`Retention`]); returns how many. Remote rows need no ack.
    pub fn prune(&self, now: i64, r: &Retention) -> Result<usize> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let newest: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| r.get(0))?;
        // With no peer ever, nothing waits for the rows: a new peer seeds.
        let acked: Option<i64> = tx.query_row("SELECT MIN(seq) FROM peer_acks", [], |r| r.get(0))?;
        let acked = acked.unwrap_or(i64::MAX);
        let old = now - r.keep_ms;
        let row_floor = newest - r.keep_rows.min(i64::MAX as u64) as i64;
        let hard_floor = newest - r.max_rows.min(i64::MAX as u64) as i64;
        let me = self.node.to_string();
        let pruned_max: Option<i64> = tx.query_row(
            "SELECT MAX(origin_seq) FROM changes
             WHERE origin = ?1 AND ((origin_seq <= ?2 AND (at < ?3 OR seq <= ?4)) OR seq <= ?5)",
            params![me, acked, old, row_floor, hard_floor],
            |r| r.get(0),
        )?;
        let n = tx.execute(
            "DELETE FROM changes WHERE
               (origin = ?1 AND ((origin_seq <= ?2 AND (at < ?3 OR seq <= ?4)) OR seq <= ?5))
               OR (origin != ?1 AND (at < ?3 OR seq <= ?4))",
            params![me, acked, old, row_floor, hard_floor],
        )?;
        if let Some(p) = pruned_max {
            let before = get_counter(&tx, PRUNED_THROUGH)?;
            set_counter(&tx, PRUNED_THROUGH, p.max(before).max(0) as u64)?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Conflicts resolved here, newest first.
    pub fn conflicts(&self, limit: usize) -> Result<Vec<ConflictRecord>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT at, kind, name, kept, loser, outcome FROM conflicts ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(ConflictRecord {
                at: r.get(0)?,
                kind: r.get(1)?,
                name: r.get(2)?,
                kept: r.get(3)?,
                loser: r.get(4)?,
                outcome: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }
}

fn mark(conn: &rusqlite::Connection, origin: Uuid) -> Result<u64> {
    let m: Option<i64> = conn
        .query_row("SELECT seq FROM applied WHERE origin = ?1", [origin.to_string()], |r| r.get(0))
        .optional()?;
    Ok(m.unwrap_or(0).max(0) as u64)
}

fn set_mark(tx: &Transaction<'_>, origin: Uuid, seq: u64) -> Result<()> {
    tx.execute(
        "INSERT INTO applied (origin, seq) VALUES (?1, ?2)
         ON CONFLICT(origin) DO UPDATE SET seq = MAX(seq, excluded.seq)",
        params![origin.to_string(), seq as i64],
    )?;
    Ok(())
}

/// The owner of VM `id`, if the VM is here.
pub(super) fn vm_owner(tx: &Transaction<'_>, id: Uuid) -> Result<Option<Uuid>> {
    Ok(vm_meta(tx, id)?.map(|m| m.owner))
}

struct VmMeta {
    owner: Uuid,
    epoch: u64,
    state: String,
}

fn vm_meta(tx: &Transaction<'_>, id: Uuid) -> Result<Option<VmMeta>> {
    let row: Option<(String, i64, String)> = tx
        .query_row("SELECT owner_node, epoch, state FROM vms WHERE id = ?1", [id.to_string()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    row.map(|(o, e, state)| {
        let owner = Uuid::parse_str(&o).map_err(|e| StoreError::Corrupt(format!("vm {id} owner: {e}")))?;
        Ok(VmMeta { owner, epoch: e.max(0) as u64, state })
    })
    .transpose()
}

impl Store {
    fn read_vm_named(tx: &Transaction<'_>, name: &str) -> Result<Option<VmRecord>> {
        named(tx, "vms", name, Store::read_vms, |v| &v.name)
    }
    fn read_token_named(tx: &Transaction<'_>, name: &str) -> Result<Option<TokenRecord>> {
        named(tx, "tokens", name, Store::read_tokens, |t| &t.name)
    }
    fn read_image_named(tx: &Transaction<'_>, name: &str) -> Result<Option<ImageRecord>> {
        named(tx, "images", name, Store::read_images, |i| &i.name)
    }
    fn read_network_named(tx: &Transaction<'_>, name: &str) -> Result<Option<NetworkRecord>> {
        named(tx, "networks", name, Store::read_networks, |n| &n.name)
    }
}

/// The record of `table` named `name`. Conflicts are rare: a cheap check
/// by name first, the full record only then.
fn named<T>(
    tx: &Transaction<'_>,
    table: &str,
    name: &str,
    read: fn(&rusqlite::Connection) -> Result<Vec<T>>,
    name_of: fn(&T) -> &String,
) -> Result<Option<T>> {
    if !exists(tx, &format!("SELECT 1 FROM {table} WHERE name = ?1"), [name])? {
        return Ok(None);
    }
    Ok(read(tx)?.into_iter().find(|r| name_of(r) == name))
}

fn exists(tx: &Transaction<'_>, sql: &str, p: impl rusqlite::Params) -> Result<bool> {
    Ok(tx.query_row(sql, p, |_| Ok(())).optional()?.is_some())
}

/// Applies a change made on `origin` (not this node) idempotently: a put
/// is an upsert, deleting or updating what is missing is a no-op. Returns
/// what changed here.
fn apply_from_peer(tx: &Transaction<'_>, local: Uuid, origin: Uuid, change: &Change) -> Result<Vec<Change>> {
    let one = |c: &Change| -> Result<Vec<Change>> {
        apply(tx, origin, c)?;
        Ok(vec![c.clone()])
    };
    match change {
        Change::VmPut(v) => {
            let mut v = v.clone();
            if let Some(ex) = vm_meta(tx, v.id)? {
                // The owner decides about its VM at its epoch: an older
                // epoch, or the peer's copy of a VM this node owns, loses.
                if v.epoch < ex.epoch || (v.epoch == ex.epoch && ex.owner == local) {
                    return Ok(Vec::new());
                }
                if v.owner_node == local {
                    // Handed to this node: the observed state stays ours.
                    v.state = crate::types::VmState::parse(&ex.state).unwrap_or(v.state);
                }
            }
            let mut effects = Vec::new();
            let holder = Store::read_vm_named(tx, &v.name)?.filter(|h| h.id != v.id);
            if let Some(h) = holder {
                match resolve_vm(tx, h, v)? {
                    Some((effect, winner)) => {
                        effects.extend(effect);
                        v = winner;
                    }
                    None => return Ok(effects),
                }
            }
            let put = Change::VmPut(v.clone());
            if let Some(e) = try_apply(tx, origin, &put)? {
                // A disk path of another VM (not expected: paths hold the id).
                record_conflict(tx, "vm", &v.name, "", &v.id.to_string(), &format!("set aside: {e}"), &put)?;
                return Ok(effects);
            }
            effects.push(put);
            Ok(effects)
        }
        Change::VmState { id, .. } => match vm_owner(tx, *id)? {
            // Only the owner reports a VM's state.
            Some(owner) if owner == origin => one(change),
            _ => Ok(Vec::new()),
        },
        Change::VmDelete { id } => match vm_owner(tx, *id)? {
            Some(owner) if owner != local => one(change),
            _ => Ok(Vec::new()),
        },
        Change::TokenPut(t) => {
            let holder = Store::read_token_named(tx, &t.name)?.filter(|h| h.id != t.id);
            let mut effects = Vec::new();
            let mut t = t.clone();
            if let Some(h) = holder {
                let (effect, winner) = resolve_token(tx, h, t)?;
                effects.extend(effect);
                t = winner;
            }
            apply(tx, origin, &Change::TokenPut(t.clone()))?;
            effects.push(Change::TokenPut(t));
            Ok(effects)
        }
        Change::TokenDelete { id } => {
            if exists(tx, "SELECT 1 FROM tokens WHERE id = ?1", [id])? {
                one(change)
            } else {
                Ok(Vec::new())
            }
        }
        Change::ImagePut(i) => {
            let holder = Store::read_image_named(tx, &i.name)?.map(Named::image);
            put_named(tx, origin, holder, Named::image(i.clone()))
        }
        Change::ImageDelete { name } => if_exists(tx, "images", name, || one(change)),
        Change::NetworkPut(n) => {
            let holder = Store::read_network_named(tx, &n.name)?.map(Named::network);
            put_named(tx, origin, holder, Named::network(n.clone()))
        }
        Change::NetworkDelete { name } => if_exists(tx, "networks", name, || one(change)),
        Change::SnapshotPut(sn) => {
            if !exists(tx, "SELECT 1 FROM vms WHERE id = ?1", [sn.vm_id.to_string()])? {
                return Ok(Vec::new());
            }
            let del = Change::SnapshotDelete { vm_id: sn.vm_id, name: sn.name.clone() };
            let had = exists(
                tx,
                "SELECT 1 FROM snapshots WHERE vm_id = ?1 AND name = ?2",
                params![sn.vm_id.to_string(), sn.name],
            )?;
            if had {
                apply(tx, origin, &del)?;
            }
            one(change)
        }
        Change::SnapshotDelete { vm_id, name } => {
            let had = exists(
                tx,
                "SELECT 1 FROM snapshots WHERE vm_id = ?1 AND name = ?2",
                params![vm_id.to_string(), name],
            )?;
            if had {
                one(change)
            } else {
                Ok(Vec::new())
            }
        }
    }
}

/// The first 6 hex digits of a record's id: the suffix its name gets when
/// it loses a conflict. The record's own id (not its origin's), because
/// both nodes know it identically, also for records seeded by snapshot.
fn suffix(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_hexdigit()).take(6).collect::<String>().to_ascii_lowercase()
}

/// Content id of a network: its definition without the name and date.
fn network_hash(n: &NetworkRecord) -> String {
    let w = wire::Network::from(NetworkRecord { name: String::new(), created_at: 0, ..n.clone() });
    hex::encode(Sha256::digest(wire::to_bytes(&w)))
}

/// Which of two records with one name keeps it: the smaller (created_at,
/// id), the same on both nodes whatever order they see the records in.
fn first_wins(a: (i64, &str), b: (i64, &str)) -> bool {
    a <= b
}

/// A name not yet used in `table`: `NAME-abc123`, else with the whole id.
fn free_name(tx: &Transaction<'_>, table: &str, base: &str, id: &str) -> Result<Option<String>> {
    let clean: String = id.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    for candidate in [format!("{base}-{}", suffix(id)), format!("{base}-{clean}")] {
        let sql = format!("SELECT 1 FROM {table} WHERE name = ?1");
        if !exists(tx, &sql, [&candidate])? {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

fn record_conflict(
    tx: &Transaction<'_>,
    kind: &str,
    name: &str,
    kept: &str,
    loser: &str,
    outcome: &str,
    record: &Change,
) -> Result<()> {
    tracing::warn!(
        KIND = kind,
        NAME = name,
        KEPT = kept,
        LOSER = loser,
        outcome,
        "replication name conflict"
    );
    tx.execute(
        "INSERT OR IGNORE INTO conflicts (at, kind, name, kept, loser, outcome, record)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![now_ms(), kind, name, kept, loser, outcome, record.encode()],
    )?;
    Ok(())
}

/// `holder` (here) and `incoming` (from the peer) have the same name and
/// different ids. Renames the loser; returns the local effect (the holder
/// renamed) and the incoming record to put (renamed or not), or `None`
/// when the incoming one is set aside.
fn resolve_vm(
    tx: &Transaction<'_>,
    holder: VmRecord,
    incoming: VmRecord,
) -> Result<Option<(Vec<Change>, VmRecord)>> {
    let (hid, iid) = (holder.id.simple().to_string(), incoming.id.simple().to_string());
    let holder_wins = first_wins((holder.created_at, &hid), (incoming.created_at, &iid));
    let name = holder.name.clone();
    let (mut loser, lid, wid) =
        if holder_wins { (incoming.clone(), iid, hid) } else { (holder.clone(), hid, iid) };
    let Some(new_name) = free_name(tx, "vms", &name, &lid)? else {
        record_conflict(tx, "vm", &name, &wid, &lid, "set aside: no free name", &Change::VmPut(loser))?;
        return Ok(if holder_wins { None } else { Some((Vec::new(), incoming)) });
    };
    loser.name = new_name.clone();
    record_conflict(
        tx,
        "vm",
        &name,
        &wid,
        &lid,
        &format!("renamed to {new_name}"),
        &Change::VmPut(loser.clone()),
    )?;
    if holder_wins {
        Ok(Some((Vec::new(), loser)))
    } else {
        // Renamed in place: the holder keeps its owner and epoch.
        tx.execute("UPDATE vms SET name = ?2 WHERE id = ?1", params![loser.id.to_string(), loser.name])?;
        Ok(Some((vec![Change::VmPut(loser)], incoming)))
    }
}

fn resolve_token(
    tx: &Transaction<'_>,
    holder: TokenRecord,
    incoming: TokenRecord,
) -> Result<(Vec<Change>, TokenRecord)> {
    let holder_wins = first_wins((holder.created_at, &holder.id), (incoming.created_at, &incoming.id));
    let name = holder.name.clone();
    let (mut loser, winner_id) = if holder_wins {
        (incoming.clone(), holder.id.clone())
    } else {
        (holder.clone(), incoming.id.clone())
    };
    // Token ids are unique, so the long form is always free.
    let new_name =
        free_name(tx, "tokens", &name, &loser.id)?.unwrap_or_else(|| format!("{name}-{}", loser.id));
    loser.name = new_name.clone();
    record_conflict(
        tx,
        "token",
        &name,
        &winner_id,
        &loser.id,
        &format!("renamed to {new_name}"),
        &Change::TokenPut(loser.clone()),
    )?;
    if holder_wins {
        Ok((Vec::new(), loser))
    } else {
        tx.execute("UPDATE tokens SET name = ?2 WHERE id = ?1", params![loser.id, loser.name])?;
        Ok((vec![Change::TokenPut(loser)], incoming))
    }
}

/// An image or network: keyed by name, identified by content.
struct Named {
    kind: &'static str,
    table: &'static str,
    name: String,
    id: String,
    created_at: i64,
    /// The record as a put, with another name or date.
    put: Reput,
}

type Reput = Box<dyn Fn(&str, i64) -> Change>;

impl Named {
    fn image(i: ImageRecord) -> Named {
        Named {
            kind: "image",
            table: "images",
            name: i.name.clone(),
            id: i.sha256.clone(),
            created_at: i.created_at,
            put: Box::new(move |name, created_at| {
                Change::ImagePut(ImageRecord { name: name.into(), created_at, ..i.clone() })
            }),
        }
    }
    fn network(n: NetworkRecord) -> Named {
        Named {
            kind: "network",
            table: "networks",
            name: n.name.clone(),
            id: network_hash(&n),
            created_at: n.created_at,
            put: Box::new(move |name, created_at| {
                Change::NetworkPut(NetworkRecord { name: name.into(), created_at, ..n.clone() })
            }),
        }
    }
    fn delete(&self) -> Change {
        match self.kind {
            "image" => Change::ImageDelete { name: self.name.clone() },
            _ => Change::NetworkDelete { name: self.name.clone() },
        }
    }
}

/// Name conflict of images or networks. The winner holds the name; the
/// loser is renamed, or set aside (kept only in the conflicts table) when
/// its file path or bridge is the winner's too: two records cannot share
/// one bridge or one file.
fn resolve_named(tx: &Transaction<'_>, origin: Uuid, holder: Named, incoming: Named) -> Result<Vec<Change>> {
    let name = holder.name.clone();
    let holder_wins = first_wins((holder.created_at, &holder.id), (incoming.created_at, &incoming.id));
    let mut effects = Vec::new();
    if !holder_wins {
        // The winner first, so it lands whatever happens to the loser.
        let del = holder.delete();
        apply(tx, origin, &del)?;
        effects.push(del);
        let put = (incoming.put)(&name, incoming.created_at);
        apply(tx, origin, &put)?;
        effects.push(put);
    }
    let (winner, loser) = if holder_wins { (&holder, &incoming) } else { (&incoming, &holder) };
    let outcome = match free_name(tx, holder.table, &name, &loser.id)? {
        Some(new_name) => {
            let put = (loser.put)(&new_name, loser.created_at);
            match try_apply(tx, origin, &put)? {
                None => {
                    effects.push(put);
                    format!("renamed to {new_name}")
                }
                Some(e) => format!("set aside: {e}"),
            }
        }
        None => "set aside: no free name".to_string(),
    };
    record_conflict(
        tx,
        holder.kind,
        &name,
        &winner.id,
        &loser.id,
        &outcome,
        &(loser.put)(&name, loser.created_at),
    )?;
    Ok(effects)
}

/// Applies `change` inside a savepoint: a uniqueness conflict undoes it
/// all and is returned, other errors fail the whole apply.
fn try_apply(tx: &Transaction<'_>, origin: Uuid, change: &Change) -> Result<Option<StoreError>> {
    tx.execute_batch("SAVEPOINT try_apply")?;
    match apply(tx, origin, change) {
        Ok(()) => {
            tx.execute_batch("RELEASE try_apply")?;
            Ok(None)
        }
        Err(e) => {
            tx.execute_batch("ROLLBACK TO try_apply; RELEASE try_apply")?;
            match e {
                StoreError::Conflict(_) => Ok(Some(e)),
                e => Err(e),
            }
        }
    }
}

/// Puts an image or network from the peer. Free name: put, unless its
/// file path or bridge is taken (then set aside). The same content under
/// the name on both nodes: one record, with the older date (an image's
/// path stays this node's own file). Other content: a name conflict.
fn put_named(
    tx: &Transaction<'_>,
    origin: Uuid,
    holder: Option<Named>,
    incoming: Named,
) -> Result<Vec<Change>> {
    let Some(holder) = holder else {
        let put = (incoming.put)(&incoming.name, incoming.created_at);
        return match try_apply(tx, origin, &put)? {
            None => Ok(vec![put]),
            Some(e) => {
                let outcome = format!("set aside: {e}");
                record_conflict(tx, incoming.kind, &incoming.name, "", &incoming.id, &outcome, &put)?;
                Ok(Vec::new())
            }
        };
    };
    if holder.id != incoming.id {
        return resolve_named(tx, origin, holder, incoming);
    }
    if incoming.created_at >= holder.created_at {
        return Ok(Vec::new());
    }
    let sql = format!("UPDATE {} SET created_at = ?2 WHERE name = ?1", holder.table);
    tx.execute(&sql, params![holder.name, incoming.created_at])?;
    Ok(vec![(holder.put)(&holder.name, incoming.created_at)])
}

/// `then()` if `table` has a record named `name`, else nothing changes.
fn if_exists(
    tx: &Transaction<'_>,
    table: &str,
    name: &str,
    then: impl FnOnce() -> Result<Vec<Change>>,
) -> Result<Vec<Change>> {
    if exists(tx, &format!("SELECT 1 FROM {table} WHERE name = ?1"), [name])? {
        then()
    } else {
        Ok(Vec::new())
    }
}
