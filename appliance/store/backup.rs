//! Backups of a node's data dir: a plain tar archive with a `manifest.json`
//! (format version, node id, creation time, SHA-256 and mode of every file).
//!
//! The database is copied with SQLite's online backup API, so a backup taken
//! while the daemon runs is a consistent snapshot of one committed state.
//! Disk images are copied as files: the caller must make sure no running
//! guest writes to them during the copy (see `novacron backup create
//! --pause-running`), otherwise the copy is not even crash-consistent.
//!
//! Archives are written and read with the system `tar` (GNU tar), which
//! refuses members with `..` and strips leading `/` on extraction; the
//! manifest is checked on top of that before anything is moved into place.

use super::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Version of the archive layout; restore refuses other versions.
pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
/// Written into the data dir after every successful backup: Unix seconds.
/// Exported as `novacron_last_backup_timestamp_seconds`.
pub const LAST_BACKUP_MARKER: &str = "last-backup";
/// Where the configuration file is kept inside the archive.
pub const CONFIG_ENTRY: &str = "config/novacron.toml";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("tar failed: {0}")]
    Tar(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is not empty (use --force to restore over it)")]
    NotEmpty(PathBuf),
}

pub type Result<T> = std::result::Result<T, BackupError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.into(), source }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the archive root (which is the data dir, except for
    /// [`CONFIG_ENTRY`]).
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    pub node_id: String,
    pub node_name: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_unix: i64,
    pub novacron_version: String,
    pub schema_version: u32,
    pub include_disks: bool,
    /// The data dir on the node backed up: as configured, then with links
    /// resolved if that differs. A restore elsewhere rewrites the paths in
    /// the database from these prefixes to the new data dir. Archives
    /// before this field have none; their prefix is read off disk paths.
    #[serde(default)]
    pub data_dirs: Vec<String>,
    pub files: Vec<FileEntry>,
}

/// What to put in a backup.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub include_disks: bool,
}

impl Store {
    /// `PRAGMA quick_check`: "ok" or the first problems found.
    pub fn quick_check(&self) -> super::Result<String> {
        let conn = self.lock();
        let mut stmt = conn.prepare("PRAGMA quick_check")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let lines = rows.take(5).collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(lines.join("; "))
    }
}

pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    crate::util::sha256_file(path, |_| {}).map_err(io(path))
}

fn entry(root: &Path, rel: &str) -> Result<FileEntry> {
    let p = root.join(rel);
    let (size, sha256) = sha256_file(&p)?;
    let mode = std::fs::metadata(&p).map_err(io(&p))?.permissions().mode() & 0o7777;
    Ok(FileEntry { path: rel.to_string(), size, sha256, mode })
}

/// Regular files under `root/dir`, relative to `root`, sorted.
fn files_under(root: &Path, dir: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(dir)];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let rd = match std::fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&abs)(e)),
        };
        for e in rd {
            let e = e.map_err(io(&abs))?;
            let t = e.file_type().map_err(io(&abs))?;
            let child = rel.join(e.file_name());
            if t.is_dir() {
                stack.push(child);
            } else if t.is_file() {
                out.push(child.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Copies the live database at `src` to `dst` with SQLite's online backup
/// API and checks the copy. Safe while the daemon writes to `src`.
pub fn backup_database(src: &Path, dst: &Path) -> Result<()> {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|source| StoreError::Open { path: src.into(), source })?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(StoreError::from)?;
    conn.backup(rusqlite::MAIN_DB, dst, None).map_err(StoreError::from)?;
    drop(conn);
    let copy = Connection::open(dst).map_err(|source| StoreError::Open { path: dst.into(), source })?;
    // A self-contained file: no WAL beside it in the archive.
    copy.pragma_update(None, "journal_mode", "DELETE").map_err(StoreError::from)?;
    let check: String =
        copy.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(StoreError::from)?;
    if check != "ok" {
        return Err(BackupError::Invalid(format!("the database copy fails its integrity check: {check}")));
    }
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o600)).map_err(io(dst))?;
    Ok(())
}

fn node_of(db: &Path) -> Result<(String, String, u32)> {
    let conn =
        rusqlite::Connection::open(db).map_err(|source| StoreError::Open { path: db.into(), source })?;
    let (id, name) = conn
        .query_row("SELECT uuid, name FROM node WHERE id = 1", [], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(StoreError::from)?;
    let v: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(StoreError::from)?;
    Ok((id, name, v))
}

fn tar(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("tar").args(args).output().map_err(io(Path::new("tar")))?;
    if !out.status.success() {
        return Err(BackupError::Tar(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

/// Writes a backup archive to `out` (via a temporary file renamed into
/// place, mode 0600: it holds the TLS key and token hashes). Returns the
/// manifest. Disk files are read as they are: the caller keeps guests from
/// writing to them.
pub fn create(opts: &CreateOptions, out: &Path) -> Result<Manifest> {
    let data = &opts.data_dir;
    let db = data.join("state.db");
    if !db.is_file() {
        return Err(BackupError::Invalid(format!(
            "{} has no state.db: not a node's data dir (--config or --data-dir name another; \
             --dev is the dev daemon's ./novacron-dev)",
            data.display()
        )));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = parent.join(format!(".novacron-backup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("config")).map_err(io(&staging))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700)).map_err(io(&staging))?;
    let result = create_in(opts, out, &staging);
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn create_in(opts: &CreateOptions, out: &Path, staging: &Path) -> Result<Manifest> {
    let data = &opts.data_dir;
    backup_database(&data.join("state.db"), &staging.join("state.db"))?;
    let (node_id, node_name, schema_version) = node_of(&staging.join("state.db"))?;
    let mut files = vec![entry(staging, "state.db")?];
    let mut has_config = false;
    if let Some(cfg) = opts.config.as_deref().filter(|c| c.is_file()) {
        let dst = staging.join(CONFIG_ENTRY);
        std::fs::copy(cfg, &dst).map_err(io(cfg))?;
        files.push(entry(staging, CONFIG_ENTRY)?);
        has_config = true;
    }
    // From the data dir itself (hashed there, archived from there).
    let mut live = files_under(data, "tls")?;
    if opts.include_disks {
        for dir in ["disks", "images", "boot"] {
            live.extend(files_under(data, dir)?);
        }
    }
    for rel in &live {
        files.push(entry(data, rel)?);
    }
    let now = super::now_ms();
    let manifest = Manifest {
        format: FORMAT,
        node_id,
        node_name,
        created_at: crate::util::rfc3339(now),
        created_unix: now / 1000,
        novacron_version: crate::VERSION.to_string(),
        schema_version,
        include_disks: opts.include_disks,
        data_dirs: data_dir_names(data),
        files,
    };
    let mpath = staging.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Invalid(e.to_string()))?;
    std::fs::write(&mpath, json).map_err(io(&mpath))?;

    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
    }
    let mut args: Vec<std::ffi::OsString> = vec![
        "--create".into(),
        "--sparse".into(),
        "--file".into(),
        tmp.clone().into(),
        "--directory".into(),
        staging.into(),
        MANIFEST.into(),
        "state.db".into(),
    ];
    if has_config {
        args.push(CONFIG_ENTRY.into());
    }
    if !live.is_empty() {
        args.push("--directory".into());
        args.push(data.into());
        args.extend(live.iter().map(Into::into));
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    if let Err(e) = tar(&refs) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    let marker = data.join(LAST_BACKUP_MARKER);
    std::fs::write(&marker, format!("{}\n", manifest.created_unix)).map_err(io(&marker))?;
    Ok(manifest)
}

fn data_dir_names(data: &Path) -> Vec<String> {
    let mut names = vec![data.display().to_string()];
    if let Ok(real) = std::fs::canonicalize(data) {
        if real != data {
            names.push(real.display().to_string());
        }
    }
    names
}

/// Unix seconds of the last successful backup of `data_dir`, if any.
pub fn last_backup(data_dir: &Path) -> Option<i64> {
    std::fs::read_to_string(data_dir.join(LAST_BACKUP_MARKER)).ok()?.trim().parse().ok()
}

/// A manifest path must stay inside the archive.
fn safe_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub data_dir: PathBuf,
    /// Where to write the archived configuration file; skipped when the
    /// file exists (unless `force`) or the archive has none.
    pub config: Option<PathBuf>,
    pub force: bool,
}

#[derive(Debug, Clone)]
pub struct Restored {
    pub manifest: Manifest,
    pub config_written: Option<PathBuf>,
    /// VMs and images whose paths were rewritten into the new data dir.
    pub relocated: usize,
}

/// Files that may be in a data dir that counts as empty: nothing a daemon
/// would read.
fn is_empty_dir(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                if e.map_err(io(dir))?.file_name() != super::lock::LOCK_FILE {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Reads and verifies `archive`, then moves its files into the data dir.
/// The daemon must not be running on that data dir.
pub fn restore(archive: &Path, opts: &RestoreOptions) -> Result<Restored> {
    let data = &opts.data_dir;
    if !opts.force && !is_empty_dir(data)? {
        return Err(BackupError::NotEmpty(data.clone()));
    }
    if !archive.is_file() {
        return Err(BackupError::Invalid(format!("{} is not a file", archive.display())));
    }
    let parent = data.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = parent.join(format!(".novacron-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700)).map_err(io(&staging))?;
    let result = restore_from(archive, opts, &staging);
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn restore_from(archive: &Path, opts: &RestoreOptions, staging: &Path) -> Result<Restored> {
    tar(&[
        "--extract".as_ref(),
        "--no-same-owner".as_ref(),
        "--file".as_ref(),
        archive.as_os_str(),
        "--directory".as_ref(),
        staging.as_os_str(),
    ])?;
    let mpath = staging.join(MANIFEST);
    let text = std::fs::read(&mpath).map_err(io(&mpath))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Invalid(format!("{MANIFEST} is not a NovaCron manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(BackupError::Invalid(format!(
            "archive format {} is not supported (this binary reads format {FORMAT})",
            manifest.format
        )));
    }
    // Exactly the files the manifest lists, each intact.
    let mut found = files_under(staging, ".")?;
    found.iter_mut().for_each(|f| *f = f.trim_start_matches("./").to_string());
    found.retain(|f| f != MANIFEST);
    let mut listed: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
    listed.sort();
    found.sort();
    if found != listed {
        return Err(BackupError::Invalid("the archive's files do not match its manifest".into()));
    }
    if !listed.iter().any(|f| f == "state.db") {
        return Err(BackupError::Invalid("the archive has no state.db".into()));
    }
    for f in &manifest.files {
        if !safe_relative(&f.path) {
            return Err(BackupError::Invalid(format!("unsafe path in manifest: {}", f.path)));
        }
        let (size, sha) = sha256_file(&staging.join(&f.path))?;
        if size != f.size || sha != f.sha256 {
            return Err(BackupError::Invalid(format!("{} does not match its checksum", f.path)));
        }
    }

    // Paths in the database name the node's data dir: make them name this
    // one (a restore onto another node or into another folder), or refuse
    // before anything is written.
    let relocated = relocate(&staging.join("state.db"), &manifest, &opts.data_dir)?;

    let data = &opts.data_dir;
    super::Paths::new(data).create().map_err(io(data))?;
    // No daemon may start on the data dir while it is being filled.
    let _lock = super::lock::lock_data_dir(data)?;
    if opts.force {
        // A stale WAL next to a restored database would be replayed into it.
        for suffix in ["-wal", "-shm"] {
            let p = data.join(format!("state.db{suffix}"));
            if p.exists() {
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
    }
    let mut config_written = None;
    for f in &manifest.files {
        let src = staging.join(&f.path);
        if f.path == CONFIG_ENTRY {
            if let Some(cfg) = &opts.config {
                if opts.force || !cfg.exists() {
                    if let Some(dir) = cfg.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(io(dir))?;
                    }
                    std::fs::copy(&src, cfg).map_err(io(cfg))?;
                    std::fs::set_permissions(cfg, std::fs::Permissions::from_mode(f.mode & 0o777))
                        .map_err(io(cfg))?;
                    config_written = Some(cfg.clone());
                }
            }
            continue;
        }
        let dst = data.join(&f.path);
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        // The database and keys are never readable by others, whatever the
        // archive says.
        let private = f.path == "state.db" || f.path.starts_with("tls/") && f.path.ends_with("key.pem");
        let mode = if private { 0o600 } else { f.mode & 0o777 };
        std::fs::rename(&src, &dst).map_err(io(&dst))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode)).map_err(io(&dst))?;
    }
    // Paths::create set the folder modes; the restored database must open.
    let check: String = rusqlite::Connection::open(data.join("state.db"))
        .and_then(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
        .map_err(StoreError::from)?;
    if check != "ok" {
        return Err(BackupError::Invalid(format!(
            "the restored database fails its integrity check: {check}"
        )));
    }
    Ok(Restored { manifest, config_written, relocated })
}

/// Rewrites the absolute paths in the database at `db` (VM disks, their
/// base images, kernels and initrds, image files) from the backed-up
/// node's data dir to `data_dir`, through the change stream like every
/// other change. Returns how many records changed. Refuses when a path
/// lies outside the old data dir: it could not be brought along.
fn relocate(db: &Path, manifest: &Manifest, data_dir: &Path) -> Result<usize> {
    let store = Store::open(db)?;
    let vms = store.vms()?;
    let images = store.images()?;
    let mut roots: Vec<PathBuf> = manifest.data_dirs.iter().map(PathBuf::from).collect();
    if roots.is_empty() {
        // Older archives: a disk is always DATA/disks/<vm id>/<file>.
        for vm in &vms {
            for d in &vm.disks {
                let root = Path::new(&d.path).parent().and_then(Path::parent).and_then(Path::parent);
                if let Some(r) = root.filter(|r| !roots.iter().any(|x| x == r)) {
                    roots.push(r.to_path_buf());
                }
            }
        }
    }
    let rebase = |p: &str| -> Result<String> {
        let path = Path::new(p);
        if path.starts_with(data_dir) {
            return Ok(p.to_string());
        }
        for root in &roots {
            if let Ok(rest) = path.strip_prefix(root) {
                return Ok(data_dir.join(rest).display().to_string());
            }
        }
        Err(BackupError::Invalid(format!(
            "the backup refers to {p}, outside the data dir it was taken from ({});              it cannot be restored into {}",
            if roots.is_empty() { "unknown".to_string() } else { roots[0].display().to_string() },
            data_dir.display()
        )))
    };
    let mut changes = Vec::new();
    for vm in &vms {
        let mut new = vm.clone();
        for d in &mut new.disks {
            d.path = rebase(&d.path)?;
            if let Some(i) = &d.image {
                d.image = Some(rebase(i)?);
            }
        }
        if let Some(b) = &mut new.boot {
            b.kernel = rebase(&b.kernel)?;
            if let Some(i) = &b.initrd {
                b.initrd = Some(rebase(i)?);
            }
        }
        if new != *vm {
            changes.push(super::Change::VmPut(new));
        }
    }
    for img in &images {
        let path = rebase(&img.path)?;
        if path != img.path {
            changes.push(super::Change::ImageDelete { name: img.name.clone() });
            changes.push(super::Change::ImagePut(super::ImageRecord { path, ..img.clone() }));
        }
    }
    let count = changes.iter().filter(|c| !matches!(c, super::Change::ImageDelete { .. })).count();
    store.replay(&changes)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_must_stay_inside() {
        for ok in ["state.db", "tls/key.pem", "disks/a.qcow2"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "tls/../../x", "./x"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }

    fn manifest(data_dirs: Vec<String>) -> Manifest {
        Manifest {
            format: FORMAT,
            node_id: "n".into(),
            node_name: "n".into(),
            created_at: "t".into(),
            created_unix: 0,
            novacron_version: "0".into(),
            schema_version: 1,
            include_disks: true,
            data_dirs,
            files: Vec::new(),
        }
    }

    #[test]
    fn relocate_rewrites_paths_or_refuses() {
        use crate::types::{BootSpec, Disk, VmState};
        let base = std::env::temp_dir().join(format!("novacron-relocate-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&base).unwrap();
        let (old, new, db) = (base.join("old"), base.join("new"), base.join("state.db"));
        let store = Store::open(&db).unwrap();
        let node = store.node_identity("n").unwrap();
        let id = uuid::Uuid::new_v4();
        let at = |p: &str| old.join(p).display().to_string();
        let vm = super::super::VmRecord {
            id,
            name: "web".into(),
            vcpus: 1,
            memory_mib: 64,
            disks: vec![Disk {
                device: "vda".into(),
                path: at(&format!("disks/{id}/vda.qcow2")),
                size_bytes: 1,
                image: Some(at("images/base")),
            }],
            boot: Some(BootSpec { kernel: at("boot/k"), initrd: Some(at("boot/i")), cmdline: None }),
            nics: Vec::new(),
            cloud_init: None,
            shutdown_timeout_secs: None,
            autostart: false,
            owner_node: node.id,
            epoch: 1,
            state: VmState::Stopped,
            created_at: 1,
            updated_at: 1,
            replication: None,
            autostart_priority: 0,
        };
        let image = super::super::ImageRecord {
            name: "base".into(),
            path: at("images/base"),
            format: "qcow2".into(),
            virtual_size: 1,
            file_size: 1,
            sha256: "0".into(),
            created_at: 1,
        };
        store.commit(&super::super::Change::VmPut(vm.clone())).unwrap();
        store.commit(&super::super::Change::ImagePut(image)).unwrap();
        drop(store);
        // An archive from before `data_dirs`: the old root is read off the disks.
        assert_eq!(relocate(&db, &manifest(Vec::new()), &new).unwrap(), 2);
        let store = Store::open(&db).unwrap();
        let moved = store.vms().unwrap().remove(0);
        let to = |p: &str| new.join(p).display().to_string();
        assert_eq!(moved.disks[0].path, to(&format!("disks/{id}/vda.qcow2")));
        assert_eq!(moved.disks[0].image, Some(to("images/base")));
        assert_eq!(moved.boot.as_ref().unwrap().kernel, to("boot/k"));
        assert_eq!(moved.boot.as_ref().unwrap().initrd, Some(to("boot/i")));
        assert_eq!(store.images().unwrap()[0].path, to("images/base"));
        // Through the change stream: a replay rebuilds the moved state.
        let last = store.stream(0, 100).unwrap().pop().unwrap();
        assert!(matches!(last.change, super::super::Change::ImagePut(ref i) if i.path == to("images/base")));
        drop(store);
        // Already in place: nothing to do.
        assert_eq!(relocate(&db, &manifest(vec![old.display().to_string()]), &new).unwrap(), 0);
        // A path outside the old data dir cannot follow: refused.
        let store = Store::open(&db).unwrap();
        let mut stray = moved.clone();
        stray.boot.as_mut().unwrap().kernel = "/srv/kernels/k".into();
        store.commit(&super::super::Change::VmPut(stray)).unwrap();
        drop(store);
        let other = base.join("other");
        let err = relocate(&db, &manifest(vec![new.display().to_string()]), &other).unwrap_err();
        assert!(err.to_string().contains("/srv/kernels/k"), "{err}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn backup_and_restore_round_trip() {
        let base = std::env::temp_dir().join(format!("novacron-backup-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let data = base.join("data");
        crate::store::Paths::new(&data).create().unwrap();
        {
            let store = Store::open(&data.join("state.db")).unwrap();
            store.node_identity("n1").unwrap();
            assert_eq!(store.quick_check().unwrap(), "ok");
            // The daemon keeps its connection open during a backup.
            let archive = base.join("b.tar");
            std::fs::write(data.join("tls/key.pem"), "KEY").unwrap();
            let opts = CreateOptions { data_dir: data.clone(), config: None, include_disks: true };
            let m = create(&opts, &archive).unwrap();
            assert_eq!(m.node_name, "n1");
            assert!(m.files.iter().any(|f| f.path == "tls/key.pem"));
            assert!(last_backup(&data).is_some());
        }
        let target = base.join("fresh");
        let ropts = RestoreOptions { data_dir: target.clone(), config: None, force: false };
        let r = restore(&base.join("b.tar"), &ropts).unwrap();
        assert_eq!(r.manifest.format, FORMAT);
        let mode = std::fs::metadata(target.join("tls/key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(target.join("tls/key.pem")).unwrap(), "KEY");
        let store = Store::open(&target.join("state.db")).unwrap();
        assert_eq!(store.node_identity("other").unwrap().name, "n1");
        // Not over a data dir in use.
        assert!(matches!(restore(&base.join("b.tar"), &ropts), Err(BackupError::NotEmpty(_))));
        let _ = std::fs::remove_dir_all(&base);
    }
}
