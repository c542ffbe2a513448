//! The paired node's row (`peer` table, migration 4): node-local state, not
//! in the change stream (each side holds the other).

use super::{Result, Store, StoreError};
use crate::types::NodeInfo;
use rusqlite::{params, OptionalExtension};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Written by the joiner before the inviter committed.
    Joining,
    Paired,
}

impl PeerState {
    fn as_str(self) -> &'static str {
        match self {
            PeerState::Joining => "joining",
            PeerState::Paired => "paired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// The peer as pairing pinned it; its `fingerprint` is the only
    /// certificate trusted.
    pub node: NodeInfo,
    pub pair_key: Vec<u8>,
    pub state: PeerState,
    pub paired_at: i64,
}

impl Store {
    pub fn peer(&self) -> Result<Option<PeerRecord>> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT node_id, name, addresses, api_port, link_port, fingerprint, pair_key, state, paired_at
                 FROM peer WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, u16>(3)?,
                        r.get::<_, u16>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, Vec<u8>>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, i64>(8)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, name, addrs, api_port, link_port, fingerprint, pair_key, state, paired_at)) = row
        else {
            return Ok(None);
        };
        let corrupt = |m: String| StoreError::Corrupt(format!("peer: {m}"));
        Ok(Some(PeerRecord {
            node: NodeInfo {
                node_id: Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?,
                name,
                addresses: serde_json::from_str(&addrs).map_err(|e| corrupt(e.to_string()))?,
                api_port,
                link_port,
                fingerprint,
            },
            pair_key,
            state: match state.as_str() {
                "joining" => PeerState::Joining,
                "paired" => PeerState::Paired,
                other => return Err(corrupt(format!("state {other:?}"))),
            },
            paired_at,
        }))
    }

    /// Records the peer; a `Conflict` if there is one already (one peer at
    /// most, also when two pairings race).
    pub fn peer_insert(&self, rec: &PeerRecord) -> Result<()> {
        let (p, addrs) =
            (&rec.node, serde_json::to_string(&rec.node.addresses).expect("addresses serialize"));
        let n = self.lock().execute(
            "INSERT OR IGNORE INTO peer (id, node_id, name, addresses, api_port, link_port, fingerprint, pair_key, state, paired_at)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                p.node_id.to_string(),
                p.name,
                addrs,
                p.api_port,
                p.link_port,
                p.fingerprint,
                rec.pair_key,
                rec.state.as_str(),
                rec.paired_at
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict("a peer".into()));
        }
        Ok(())
    }

    pub fn peer_set_state(&self, node_id: Uuid, state: PeerState) -> Result<()> {
        let n = self.lock().execute(
            "UPDATE peer SET state = ?1 WHERE id = 1 AND node_id = ?2",
            params![state.as_str(), node_id.to_string()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("peer {node_id}")));
        }
        Ok(())
    }

    /// Removes the peer if it is `node_id`; true if a row went.
    pub fn peer_delete(&self, node_id: Uuid) -> Result<bool> {
        let n = self
            .lock()
            .execute("DELETE FROM peer WHERE id = 1 AND node_id = ?1", params![node_id.to_string()])?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> PeerRecord {
        PeerRecord {
            node: crate::types::NodeInfo {
                node_id: Uuid::from_bytes([n; 16]),
                name: format!("n{n}"),
                addresses: vec![std::net::IpAddr::from([10, 0, 0, n]), "fd00::1".parse().unwrap()],
                api_port: 8443,
                link_port: 8444,
                fingerprint: "AB:CD".into(),
            },
            pair_key: vec![n; 32],
            state: PeerState::Joining,
            paired_at: 5,
        }
    }

    #[test]
    fn one_peer_at_most_and_state_changes() {
        let dir = std::env::temp_dir().join(format!("novacron-peer-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("state.db")).unwrap();
        assert_eq!(store.peer().unwrap(), None);
        store.peer_insert(&record(1)).unwrap();
        assert!(matches!(store.peer_insert(&record(2)), Err(StoreError::Conflict(_))));
        assert_eq!(store.peer().unwrap(), Some(record(1)));
        store.peer_set_state(record(1).node.node_id, PeerState::Paired).unwrap();
        assert_eq!(store.peer().unwrap().unwrap().state, PeerState::Paired);
        assert!(matches!(
            store.peer_set_state(record(2).node.node_id, PeerState::Paired),
            Err(StoreError::NotFound(_))
        ));
        assert!(!store.peer_delete(record(2).node.node_id).unwrap(), "only the named peer goes");
        assert!(store.peer_delete(record(1).node.node_id).unwrap());
        assert_eq!(store.peer().unwrap(), None);
        drop(store);
        // Survives a reopen (the migration does not run twice).
        let store = Store::open(&dir.join("state.db")).unwrap();
        store.peer_insert(&record(2)).unwrap();
        drop(store);
        assert_eq!(Store::open(&dir.join("state.db")).unwrap().peer().unwrap(), Some(record(2)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
