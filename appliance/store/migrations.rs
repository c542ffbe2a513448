//! Numbered schema migrations. `PRAGMA user_version` holds the number of the
//! last one applied; a migration is never edited once released, only added.

pub const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE node (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    uuid        TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE vms (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    vcpus       INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL,
    boot        BLOB,
    nics        BLOB NOT NULL,
    cloud_init  BLOB,
    shutdown_timeout_secs INTEGER,
    autostart   INTEGER NOT NULL,
    owner_node  TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE disks (
    vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    device      TEXT NOT NULL,
    path        TEXT NOT NULL UNIQUE,
    size_bytes  INTEGER NOT NULL,
    image       TEXT,
    PRIMARY KEY (vm_id, idx)
);
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    hash        BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    result      TEXT NOT NULL
);
CREATE TABLE images (
    name        TEXT PRIMARY KEY,
    path        TEXT NOT NULL UNIQUE,
    format      TEXT NOT NULL,
    virtual_size INTEGER NOT NULL,
    file_size   INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE networks (
    name        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    bridge      TEXT NOT NULL UNIQUE,
    prefix      INTEGER NOT NULL,
    gateway     TEXT,
    dhcp_start  TEXT,
    dhcp_end    TEXT,
    vlan        INTEGER,
    created_at  INTEGER NOT NULL
);
CREATE TABLE snapshots (
    vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    memory      INTEGER NOT NULL,
    vm_state    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (vm_id, name)
);
-- The replication stream: one row per committed mutation, written in the
-- same transaction as the mutation itself.
CREATE TABLE changes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    payload     BLOB NOT NULL
);
"#,
    ),
    (
        2,
        r#"
-- This node's own counters, not replicated state (not in the change
-- stream). `event_seq`: event sequence numbers up to here may have been
-- handed out, so the next run of the daemon continues above it.
CREATE TABLE counters (
    name        TEXT PRIMARY KEY,
    value       INTEGER NOT NULL
);
"#,
    ),
    (
        3,
        r#"
-- Replication (issue 9). Each change row names the node it was made on
-- and its number there; this node's own rows have origin_seq = seq (rows
-- from before this migration are this node's: the first release was
-- single-node, so its seqs are this node's dense numbering).
ALTER TABLE changes ADD COLUMN origin TEXT;
ALTER TABLE changes ADD COLUMN origin_seq INTEGER;
UPDATE changes SET origin = (SELECT uuid FROM node WHERE id = 1), origin_seq = seq;
CREATE UNIQUE INDEX changes_by_origin ON changes (origin, origin_seq);
-- This node's own changes are numbered densely from here, so a receiver
-- that sees a number skipped knows it missed one.
INSERT INTO counters (name, value) SELECT 'local_seq', COALESCE(MAX(seq), 0) FROM changes;
CREATE INDEX changes_by_at ON changes (at);
-- Per remote origin: the highest of its seqs applied here. Written in the
-- same transaction as the apply, so a change is applied exactly once.
CREATE TABLE applied (
    origin      TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL
);
-- What the peer acknowledged of this node's changes (pruning keeps the rest).
CREATE TABLE peer_acks (
    peer        TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    at          INTEGER NOT NULL
);
-- Name conflicts between the two nodes, resolved when applying (see
-- docs/design/replication-state.md). `record`: the encoded put of the
-- record that lost its name (or was set aside), so nothing is lost.
CREATE TABLE conflicts (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    kept        TEXT NOT NULL,
    loser       TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    record      BLOB NOT NULL,
    UNIQUE (kind, loser, outcome)
);
"#,
    ),
    (
        4,
        r#"
-- The paired node (issue 9), node-local like `node`: each side holds the
-- other. At most one row. `state`: 'joining' on the joiner between its own
-- write and the inviter's commit (settled at start by asking the inviter),
-- then 'paired'. `pair_key` authenticates node-to-node requests (resolve,
-- unpair); `addresses` is a JSON array of IPs.
CREATE TABLE peer (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    node_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    addresses   TEXT NOT NULL,
    api_port    INTEGER NOT NULL,
    link_port   INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    pair_key    BLOB NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('joining', 'paired')),
    paired_at   INTEGER NOT NULL
);
"#,
    ),
    (
        5,
        r#"
-- Forced shutdowns due (`vm shutdown --timeout`): the guest is forced off
-- at `force_at` (ms since the epoch) if it is still on. Node-local and not
-- replicated: an acknowledged request outlives a daemon restart.
CREATE TABLE pending_shutdowns (
    vm_id       TEXT PRIMARY KEY,
    force_at    INTEGER NOT NULL
);
"#,
    ),
    (
        6,
        r#"
-- Disk replication of a VM (issue 10): postcard of `wire::Replication`
-- (mode, max_lag_seconds). NULL: plain qcow2 disks, not served by the data
-- plane. Replicated with the VM (change format 3).
ALTER TABLE vms ADD COLUMN replication BLOB;
"#,
    ),
    (
        7,
        r#"
-- Start order of autostart VMs at boot and in a takeover: higher first,
-- ties by name (-1000..=1000, checked by the core). Replicated with the VM
-- (change format 4).
ALTER TABLE vms ADD COLUMN autostart_priority INTEGER NOT NULL DEFAULT 0;
"#,
    ),
];
