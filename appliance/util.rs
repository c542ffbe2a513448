//! Small helpers with no better home: time, randomness, VM folders. They
//! use nothing else of the crate, so any module may use them.

/// The current time in unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds as RFC 3339 UTC (`2026-11-26T04:00:00.123Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (inverse of `civil_from_days`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Today's UTC date, offset by `days`.
pub fn civil_date(days: i64) -> (i64, u32, u32) {
    civil_from_days(now_ms().div_euclid(86_400_000) + days)
}

/// `n` bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).expect("the OS random source failed");
    buf
}

/// Creates `dir` and its parents for VM files. QEMU runs as another user
/// (libvirt relabels the files, not their folders) and must traverse to
/// them, so the folder is 0711 whatever the daemon's umask (0077 under
/// systemd).
pub fn create_vm_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

/// Replaces `path` with `data` so readers see the old or the new content,
/// never half: writes `<name>.new` beside it with exactly `mode` (not
/// filtered by the umask), syncs it, renames it over `path` and syncs the
/// folder. A stale `.new` (crash, planted link) is removed first.
pub fn write_atomic(path: &std::path::Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Syncs a folder's entries (after a rename), best effort: vfat may refuse
/// fsync on a directory, and the files themselves are synced.
pub fn sync_dir(dir: &std::path::Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Size and hex SHA-256 of a file, read in 1 MiB chunks; `on_chunk` hears
/// each chunk's length (for progress).
pub fn sha256_file(
    path: &std::path::Path,
    mut on_chunk: impl FnMut(usize),
) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        on_chunk(n);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// An exclusive `flock` on `path` (created, mode 0600), holding this
/// process's PID, for as long as the returned file lives. The kernel drops
/// it when the process dies (`kill -9` included). `Ok(Err(pid))`: another
/// process holds it (its PID, if it wrote one).
pub fn exclusive_lock(
    path: &std::path::Path,
) -> std::io::Result<Result<nix::fcntl::Flock<std::fs::File>, Option<u32>>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Ok(Err(pid.trim().parse().ok()));
        }
        Err((_, errno)) => return Err(errno.into()),
    };
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(Ok(file))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_known_values() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(1_795_665_600_123), "2026-11-26T04:00:00.123Z");
        assert_eq!(super::rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(super::days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(super::civil_from_days(super::days_from_civil(2031, 12, 31)), (2031, 12, 31));
    }

    #[test]
    fn atomic_write_and_file_hash() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("novacron-util-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.json");
        // A stale temporary from a crash is replaced, not appended to.
        std::fs::write(dir.join("a.json.new"), "stale stale stale").unwrap();
        super::write_atomic(&path, b"abc", 0o640).unwrap();
        super::write_atomic(&path, b"abc", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.join("a.json.new").exists());
        let mut chunks = Vec::new();
        let (size, hex) = super::sha256_file(&path, |n| chunks.push(n)).unwrap();
        assert_eq!((size, chunks), (3, vec![3]));
        // sha256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
