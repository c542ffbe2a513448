//! Numbered schema migrations. `PRAGMA user_version` holds the number of the
//! last one applied; a migration is never edited once released, only added.

pub const MIGRATIONS: &[(u32, &str)] = &[(
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
    network     TEXT,
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
-- The replication stream: one row per committed mutation, written in the
-- same transaction as the mutation itself.
CREATE TABLE changes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    payload     BLOB NOT NULL
);
"#,
)];
