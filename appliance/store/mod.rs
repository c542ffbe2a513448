//! Store subsystem: NovaCron's own state in SQLite.
//!
//! One connection behind a mutex: SQLite serializes writers anyway, and the
//! daemon serves reads from memory (the core's cache), so the store is on
//! the write path and the start-up path only. WAL + `synchronous=FULL`
//! means a transaction that returned is on disk: an acknowledged change
//! survives `kill -9` and power loss.

pub mod backup;
pub mod changes;
pub mod lock;
mod migrations;
mod paths;
mod peer;
mod replication;
pub mod wire;
mod wire_v2;
mod wire_v3;

pub use changes::{Change, ImageRecord, NetworkRecord, SnapshotRecord, TokenRecord, VmRecord};
pub use peer::{PeerRecord, PeerState};
pub use replication::{Applied, ConflictRecord, EncodedChange, Retention, Snapshot, Tail};

use crate::types::{AuditEntry, Disk, NetworkKind, Role, VmState};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A uniqueness rule (VM or token name, disk path) would be broken.
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    /// Observed state is written only by the VM's owner node.
    #[error("{0} is owned by another node")]
    NotOwner(String),
    /// The database was written by a newer NovaCron.
    #[error("database schema version {found} is newer than this binary supports ({supported})")]
    TooNew { found: u32, supported: u32 },
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A peer's change arrived before one it depends on: the sender must
    /// resend from `expected`.
    #[error("change {got} of node {origin} arrived before {expected}")]
    Gap { origin: Uuid, expected: u64, got: u64 },
    /// Another process (a second daemon, a restore) uses the data dir.
    #[error("{dir} is in use by another novacron process (PID {pid}); stop it first")]
    Locked { dir: PathBuf, pid: String },
    #[error("cannot lock {path}: {message}")]
    Lock { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: Uuid,
    pub name: String,
}

/// One row of the change stream.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    /// This store's own sequence number of the row.
    pub seq: i64,
    pub at: i64,
    /// The node the change was made on, and its number there (equal to
    /// `seq` for this node's own changes).
    pub origin: Uuid,
    pub origin_seq: i64,
    pub change: Change,
}

pub struct Store {
    conn: Mutex<Connection>,
    /// This node's id: the origin of its own changes.
    node: Uuid,
}

pub use crate::util::now_ms;
pub use paths::Paths;

impl Store {
    /// Opens (creating with mode 0600) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let open_err = |source| StoreError::Open { path: path.into(), source };
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;",
        )
        .map_err(open_err)?;
        // WAL and shm files are created by SQLite with the umask; keep them
        // as private as the database itself.
        for suffix in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        }
        let mut store = Store { conn: Mutex::new(conn), node: Uuid::nil() };
        store.migrate()?;
        store.node = store.ensure_node()?;
        Ok(store)
    }

    /// The node row, created (with an empty name, see `node_identity`) the
    /// first time: every change needs its origin. Change rows older than
    /// migration 3 whose node row did not exist yet get it now.
    fn ensure_node(&self) -> Result<Uuid> {
        let conn = self.lock();
        let existing: Option<String> =
            conn.query_row("SELECT uuid FROM node WHERE id = 1", [], |r| r.get(0)).optional()?;
        let id = match existing {
            Some(u) => Uuid::parse_str(&u).map_err(|e| StoreError::Corrupt(format!("node id: {e}")))?,
            None => {
                let id = Uuid::new_v4();
                conn.execute(
                    "INSERT INTO node (id, uuid, name, created_at) VALUES (1, ?1, '', ?2)",
                    params![id.to_string(), now_ms()],
                )?;
                id
            }
        };
        // Rows migrated before any node row existed (a store only ever
        // used by tests): this node's, numbered as migration 3 does.
        conn.execute(
            "UPDATE changes SET origin = ?1, origin_seq = seq WHERE origin IS NULL",
            [id.to_string()],
        )?;
        Ok(id)
    }

    /// This node's id, the origin of the changes committed here.
    pub fn node_id(&self) -> Uuid {
        self.node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the
        // transaction rolls back on drop), so a poisoned lock is usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.lock();
        let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let latest = migrations::MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > latest {
            return Err(StoreError::TooNew { found: current, supported: latest });
        }
        for (version, sql) in migrations::MIGRATIONS.iter().filter(|m| m.0 > current) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
            tracing::info!(version, "applied store migration");
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<u32> {
        Ok(self.lock().query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// The node identity, created on first call and kept forever after.
    pub fn node_identity(&self, default_name: &str) -> Result<NodeRecord> {
        let conn = self.lock();
        let (uuid, name): (String, String) =
            conn.query_row("SELECT uuid, name FROM node WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let id = Uuid::parse_str(&uuid).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if name.is_empty() {
            // Created by `Store::open` before anyone named the node.
            conn.execute("UPDATE node SET name = ?1 WHERE id = 1", [default_name])?;
            return Ok(NodeRecord { id, name: default_name.to_string() });
        }
        Ok(NodeRecord { id, name })
    }

    /// Applies `change` (made on this node) and appends it to the change
    /// stream, atomically. Returns its number in this node's own sequence.
    pub fn commit(&self, change: &Change) -> Result<i64> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        apply(&tx, self.node, change)?;
        let seq = append_local(&tx, self.node, change)?;
        tx.commit()?;
        Ok(seq)
    }

    /// Commits a batch of this node's own changes (a dump, a restore's
    /// path rewrite) in one transaction.
    pub fn replay(&self, changes: &[Change]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        for change in changes {
            apply(&tx, self.node, change)?;
            append_local(&tx, self.node, change)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every row of the stream after this store's `after_seq`, whatever its
    /// origin, decoded (replay, backups, tests). The peer's feed is
    /// [`Store::changes_since`].
    pub fn stream(&self, after_seq: i64, limit: usize) -> Result<Vec<ChangeRow>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at, origin, origin_seq, payload FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after_seq, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at, origin, origin_seq, payload) = row?;
            let change = Change::decode(&payload).map_err(StoreError::Corrupt)?;
            let origin = Uuid::parse_str(&origin).map_err(|e| StoreError::Corrupt(format!("origin: {e}")))?;
            out.push(ChangeRow { seq, at, origin, origin_seq, change });
        }
        Ok(out)
    }

    /// The number of this node's newest change, 0 before the first. A
    /// counter, so it keeps growing after old rows are pruned.
    pub fn last_seq(&self) -> Result<i64> {
        last_seq(&self.lock())
    }

    /// Reserves `block` event sequence numbers above those a previous run
    /// may have used: returns that run's high-water mark, and records the
    /// mark plus `block`, in one transaction.
    pub fn reserve_event_seqs(&self, block: u64) -> Result<u64> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let last: i64 = tx
            .query_row("SELECT value FROM counters WHERE name = 'event_seq'", [], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let last = last.max(0) as u64;
        set_counter(&tx, "event_seq", last.saturating_add(block))?;
        tx.commit()?;
        Ok(last)
    }

    /// Records the event sequence high-water mark (see `reserve_event_seqs`).
    pub fn set_event_seq(&self, value: u64) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        set_counter(&tx, "event_seq", value)?;
        tx.commit()?;
        Ok(())
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        Self::read_vms(&self.lock())
    }

    fn read_vms(conn: &Connection) -> Result<Vec<VmRecord>> {
        let mut stmt = conn.prepare_cached(
            "SELECT id, name, vcpus, memory_mib, boot, nics, autostart, owner_node, epoch,
                    state, created_at, updated_at, cloud_init, shutdown_timeout_secs, replication,
                    autostart_priority
             FROM vms ORDER BY name",
        )?;
        let mut vms = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<Vec<u8>>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                    r.get::<_, bool>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, String>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, i64>(11)?,
                    r.get::<_, Option<Vec<u8>>>(12)?,
                    r.get::<_, Option<i64>>(13)?,
                    r.get::<_, Option<Vec<u8>>>(14)?,
                    r.get::<_, i32>(15)?,
                ))
            })?
            .map(|row| {
                let (
                    id,
                    name,
                    vcpus,
                    mem,
                    boot,
                    nics,
                    autostart,
                    owner,
                    epoch,
                    state,
                    c,
                    u,
                    ci,
                    sto,
                    repl,
                    prio,
                ) = row?;
                let corrupt = |what: &str| StoreError::Corrupt(format!("vm {id}: bad {what}"));
                Ok(VmRecord {
                    id: Uuid::parse_str(&id).map_err(|_| corrupt("id"))?,
                    name,
                    vcpus,
                    memory_mib: mem as u64,
                    disks: Vec::new(),
                    boot: match boot {
                        Some(b) => {
                            Some(postcard::from_bytes::<wire::Boot>(&b).map_err(|_| corrupt("boot"))?.into())
                        }
                        None => None,
                    },
                    nics: postcard::from_bytes::<Vec<wire::Nic>>(&nics)
                        .map_err(|_| corrupt("nics"))?
                        .into_iter()
                        .map(Into::into)
                        .collect(),
                    cloud_init: match ci {
                        Some(b) => Some(
                            postcard::from_bytes::<wire::CloudInit>(&b)
                                .map_err(|_| corrupt("cloud_init"))?
                                .into(),
                        ),
                        None => None,
                    },
                    shutdown_timeout_secs: sto.map(|v| v as u64),
                    replication: match repl {
                        Some(b) => Some(
                            postcard::from_bytes::<wire::Replication>(&b)
                                .map_err(|_| corrupt("replication"))?
                                .into(),
                        ),
                        None => None,
                    },
                    autostart,
                    autostart_priority: prio,
                    owner_node: Uuid::parse_str(&owner).map_err(|_| corrupt("owner_node"))?,
                    epoch: epoch as u64,
                    state: VmState::parse(&state).ok_or_else(|| corrupt("state"))?,
                    created_at: c,
                    updated_at: u,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut stmt = conn
            .prepare_cached("SELECT vm_id, device, path, size_bytes, image FROM disks ORDER BY vm_id, idx")?;
        let disks = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Disk {
                    device: r.get(1)?,
                    path: r.get(2)?,
                    size_bytes: r.get::<_, i64>(3)? as u64,
                    image: r.get(4)?,
                },
            ))
        })?;
        for d in disks {
            let (vm_id, disk) = d?;
            if let Some(vm) = vms.iter_mut().find(|v| v.id.to_string() == vm_id) {
                vm.disks.push(disk);
            }
        }
        Ok(vms)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        Self::read_tokens(&self.lock())
    }

    fn read_tokens(conn: &Connection) -> Result<Vec<TokenRecord>> {
        let mut stmt =
            conn.prepare_cached("SELECT id, name, role, hash, created_at FROM tokens ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (id, name, role, hash, created_at) = row?;
            Ok(TokenRecord {
                role: Role::parse(&role)
                    .ok_or_else(|| StoreError::Corrupt(format!("token {id}: bad role")))?,
                hash: hash.try_into().map_err(|_| StoreError::Corrupt(format!("token {id}: bad hash")))?,
                id,
                name,
                created_at,
            })
        })
        .collect()
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        Self::read_images(&self.lock())
    }

    fn read_images(conn: &Connection) -> Result<Vec<ImageRecord>> {
        let mut stmt = conn.prepare_cached(
            "SELECT name, path, format, virtual_size, file_size, sha256, created_at FROM images ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ImageRecord {
                name: r.get(0)?,
                path: r.get(1)?,
                format: r.get(2)?,
                virtual_size: r.get::<_, i64>(3)? as u64,
                file_size: r.get::<_, i64>(4)? as u64,
                sha256: r.get(5)?,
                created_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn networks(&self) -> Result<Vec<NetworkRecord>> {
        Self::read_networks(&self.lock())
    }

    fn read_networks(conn: &Connection) -> Result<Vec<NetworkRecord>> {
        let mut stmt = conn.prepare_cached(
            "SELECT name, kind, bridge, prefix, gateway, dhcp_start, dhcp_end, vlan, created_at
             FROM networks ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            let kind: String = r.get(1)?;
            Ok(NetworkRecord {
                name: r.get(0)?,
                kind: if kind == "bridge" { NetworkKind::Bridge } else { NetworkKind::Nat },
                bridge: r.get(2)?,
                prefix: r.get(3)?,
                gateway: r.get(4)?,
                dhcp_start: r.get(5)?,
                dhcp_end: r.get(6)?,
                vlan: r.get(7)?,
                created_at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        Self::read_snapshots(&self.lock())
    }

    fn read_snapshots(conn: &Connection) -> Result<Vec<SnapshotRecord>> {
        let mut stmt = conn.prepare_cached(
            "SELECT vm_id, name, description, memory, vm_state, created_at FROM snapshots
             ORDER BY created_at, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        rows.map(|row| {
            let (vm_id, name, description, memory, state, created_at) = row?;
            Ok(SnapshotRecord {
                vm_id: Uuid::parse_str(&vm_id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                vm_state: VmState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("snapshot {name}: bad state")))?,
                name,
                description,
                memory,
                created_at,
            })
        })
        .collect()
    }

    /// Records that `vm` is to be forced off at `force_at` (ms since the
    /// epoch) unless it is off by then; replaces an earlier deadline.
    pub fn set_pending_shutdown(&self, vm: Uuid, force_at: i64) -> Result<()> {
        self.lock().execute(
            "INSERT INTO pending_shutdowns (vm_id, force_at) VALUES (?1, ?2)
             ON CONFLICT(vm_id) DO UPDATE SET force_at = excluded.force_at",
            params![vm.to_string(), force_at],
        )?;
        Ok(())
    }

    pub fn clear_pending_shutdown(&self, vm: Uuid) -> Result<()> {
        self.lock().execute("DELETE FROM pending_shutdowns WHERE vm_id = ?1", params![vm.to_string()])?;
        Ok(())
    }

    /// Every forced shutdown still due: (VM, force_at in ms).
    pub fn pending_shutdowns(&self) -> Result<Vec<(Uuid, i64)>> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT vm_id, force_at FROM pending_shutdowns ORDER BY force_at")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at) = row?;
            // A row this version cannot read is dropped rather than fatal.
            if let Ok(id) = id.parse() {
                out.push((id, at));
            }
        }
        Ok(out)
    }

    pub fn record_audit(&self, actor: &str, action: &str, target: &str, result: &str) -> Result<()> {
        self.lock().execute(
            "INSERT INTO audit (at, actor, action, target, result) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![now_ms(), actor, action, target, result],
        )?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at, actor, action, target, result FROM audit ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(AuditEntry {
                seq: r.get(0)?,
                at: crate::util::rfc3339(r.get(1)?),
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                result: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// `PRAGMA integrity_check`: "ok" or SQLite's list of problems.
    pub fn integrity_check(&self) -> Result<String> {
        let conn = self.lock();
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let lines = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(lines.collect::<std::result::Result<Vec<_>, _>>()?.join("; "))
    }

    /// True when the database answers a trivial query.
    /// Moves the write-ahead log into the database file: at shutdown, so
    /// that the data dir holds one self-contained database at rest.
    pub fn checkpoint(&self) -> Result<()> {
        self.lock().query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    pub fn ping(&self) -> bool {
        self.lock().query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).is_ok()
    }
}

fn set_counter(tx: &Transaction<'_>, name: &str, value: u64) -> Result<()> {
    // SQLite integers are signed; a mark beyond i64 is clamped (never reached).
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO counters (name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![name, value],
    )?;
    Ok(())
}

fn unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

fn conflict(e: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    if unique_violation(&e) {
        StoreError::Conflict(what())
    } else {
        e.into()
    }
}

fn last_seq(conn: &Connection) -> Result<i64> {
    get_counter(conn, "local_seq")
}

fn get_counter(conn: &Connection, name: &str) -> Result<i64> {
    Ok(conn
        .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Appends a change made on this node, numbered densely (`local_seq`)
/// so the peer can tell a missed change from a skipped number. Returns
/// that number.
fn append_local(tx: &Transaction<'_>, node: Uuid, change: &Change) -> Result<i64> {
    let local: i64 = tx.query_row(
        "INSERT INTO counters (name, value) VALUES ('local_seq', 1)
         ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value",
        [],
        |r| r.get(0),
    )?;
    tx.execute(
        "INSERT INTO changes (at, payload, origin, origin_seq) VALUES (?1, ?2, ?3, ?4)",
        params![now_ms(), change.encode(), node.to_string(), local],
    )?;
    Ok(local)
}

/// Writes one change made on `origin` into the state tables. The single
/// place they change. A VM's observed state is written only when `origin`
/// owns the VM: each node reports the state of the VMs it runs.
fn apply(tx: &Transaction<'_>, origin: Uuid, change: &Change) -> Result<()> {
    match change {
        Change::VmPut(vm) => {
            let boot = vm.boot.clone().map(|b| wire::to_bytes(&wire::Boot::from(b)));
            let nics = wire::to_bytes(&vm.nics.iter().cloned().map(wire::Nic::from).collect::<Vec<_>>());
            let ci = vm.cloud_init.clone().map(|c| wire::to_bytes(&wire::CloudInit::from(c)));
            let repl = vm.replication.map(|r| wire::to_bytes(&wire::Replication::from(r)));
            tx.execute(
                "INSERT INTO vms (id, name, vcpus, memory_mib, boot, nics, autostart,
                                  owner_node, epoch, state, created_at, updated_at, cloud_init,
                                  shutdown_timeout_secs, replication, autostart_priority)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT(id) DO UPDATE SET name=excluded.name, vcpus=excluded.vcpus,
                    memory_mib=excluded.memory_mib, boot=excluded.boot,
                    nics=excluded.nics, autostart=excluded.autostart,
                    owner_node=excluded.owner_node, epoch=excluded.epoch,
                    state=excluded.state, updated_at=excluded.updated_at,
                    cloud_init=excluded.cloud_init,
                    shutdown_timeout_secs=excluded.shutdown_timeout_secs,
                    replication=excluded.replication,
                    autostart_priority=excluded.autostart_priority",
                params![
                    vm.id.to_string(),
                    vm.name,
                    vm.vcpus,
                    vm.memory_mib as i64,
                    boot,
                    nics,
                    vm.autostart,
                    vm.owner_node.to_string(),
                    vm.epoch as i64,
                    vm.state.as_str(),
                    vm.created_at,
                    vm.updated_at,
                    ci,
                    vm.shutdown_timeout_secs.map(|v| v as i64),
                    repl,
                    vm.autostart_priority,
                ],
            )
            .map_err(|e| {
                if unique_violation(&e) {
                    StoreError::Conflict(format!("a VM named {:?}", vm.name))
                } else {
                    e.into()
                }
            })?;
            tx.execute("DELETE FROM disks WHERE vm_id = ?1", [vm.id.to_string()])?;
            for (idx, d) in vm.disks.iter().enumerate() {
                tx.execute(
                    "INSERT INTO disks (vm_id, idx, device, path, size_bytes, image)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![vm.id.to_string(), idx as i64, d.device, d.path, d.size_bytes as i64, d.image],
                )
                .map_err(|e| {
                    if unique_violation(&e) {
                        StoreError::Conflict(format!("disk {}", d.path))
                    } else {
                        e.into()
                    }
                })?;
            }
        }
        Change::VmState { id, state, at } => {
            let n = tx.execute(
                "UPDATE vms SET state = ?2, updated_at = ?3 WHERE id = ?1 AND owner_node = ?4",
                params![id.to_string(), state.as_str(), at, origin.to_string()],
            )?;
            if n == 0 {
                return Err(match replication::vm_owner(tx, *id)? {
                    Some(_) => StoreError::NotOwner(format!("VM {id}")),
                    None => StoreError::NotFound(format!("VM {id}")),
                });
            }
        }
        Change::VmDelete { id } => {
            let n = tx.execute("DELETE FROM vms WHERE id = ?1", [id.to_string()])?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("VM {id}")));
            }
        }
        Change::TokenPut(t) => {
            tx.execute(
                "INSERT INTO tokens (id, name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET name=excluded.name, role=excluded.role,
                    hash=excluded.hash",
                params![t.id, t.name, t.role.as_str(), t.hash.to_vec(), t.created_at],
            )
            .map_err(|e| {
                if unique_violation(&e) {
                    StoreError::Conflict(format!("a token named {:?}", t.name))
                } else {
                    e.into()
                }
            })?;
        }
        Change::TokenDelete { id } => {
            let n = tx.execute("DELETE FROM tokens WHERE id = ?1", [id])?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("token {id}")));
            }
        }
        Change::ImagePut(i) => {
            tx.execute(
                "INSERT INTO images (name, path, format, virtual_size, file_size, sha256, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    i.name,
                    i.path,
                    i.format,
                    i.virtual_size as i64,
                    i.file_size as i64,
                    i.sha256,
                    i.created_at
                ],
            )
            .map_err(|e| conflict(e, || format!("an image named {:?}", i.name)))?;
        }
        Change::ImageDelete { name } => {
            if tx.execute("DELETE FROM images WHERE name = ?1", [name])? == 0 {
                return Err(StoreError::NotFound(format!("image {name}")));
            }
        }
        Change::NetworkPut(n) => {
            let kind = match n.kind {
                NetworkKind::Nat => "nat",
                NetworkKind::Bridge => "bridge",
            };
            tx.execute(
                "INSERT INTO networks (name, kind, bridge, prefix, gateway, dhcp_start, dhcp_end, vlan, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![n.name, kind, n.bridge, n.prefix, n.gateway, n.dhcp_start, n.dhcp_end, n.vlan, n.created_at],
            )
            .map_err(|e| conflict(e, || format!("a network named {:?} or on bridge {:?}", n.name, n.bridge)))?;
        }
        Change::NetworkDelete { name } => {
            if tx.execute("DELETE FROM networks WHERE name = ?1", [name])? == 0 {
                return Err(StoreError::NotFound(format!("network {name}")));
            }
        }
        Change::SnapshotPut(sn) => {
            tx.execute(
                "INSERT INTO snapshots (vm_id, name, description, memory, vm_state, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    sn.vm_id.to_string(),
                    sn.name,
                    sn.description,
                    sn.memory,
                    sn.vm_state.as_str(),
                    sn.created_at
                ],
            )
            .map_err(|e| conflict(e, || format!("a snapshot named {:?}", sn.name)))?;
        }
        Change::SnapshotDelete { vm_id, name } => {
            let n = tx.execute(
                "DELETE FROM snapshots WHERE vm_id = ?1 AND name = ?2",
                params![vm_id.to_string(), name],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("snapshot {name}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tests;
