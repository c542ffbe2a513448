//! One process per data dir: an exclusive `flock` on `novacron.lock` in it,
//! held for the life of the process (the kernel drops it when the process
//! dies, `kill -9` included, so there is no stale lock to clean up). The
//! file holds the holder's PID, so the one refused can say who has it.

use super::{Result, StoreError};
use nix::fcntl::Flock;
use std::path::Path;

pub const LOCK_FILE: &str = "novacron.lock";

/// Held while it lives.
#[derive(Debug)]
pub struct DataDirLock {
    _file: Flock<std::fs::File>,
}

/// Takes the lock of `data_dir` (which must exist) or says which PID has it.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock> {
    let path = data_dir.join(LOCK_FILE);
    match crate::util::exclusive_lock(&path) {
        Ok(Ok(file)) => Ok(DataDirLock { _file: file }),
        Ok(Err(pid)) => Err(StoreError::Locked {
            dir: data_dir.into(),
            pid: pid.map_or("unknown".into(), |p| p.to_string()),
        }),
        Err(e) => Err(StoreError::Lock { path, message: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid() {
        let dir = std::env::temp_dir().join(format!("novacron-lock-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock_data_dir(&dir).unwrap();
        // flock locks belong to the open file, so a second open in this
        // process conflicts like another process would.
        match lock_data_dir(&dir) {
            Err(StoreError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("second lock: {other:?}"),
        }
        drop(held);
        lock_data_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
