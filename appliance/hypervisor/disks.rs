//! qcow2 disk files, made with `qemu-img`.
//!
//! Every path handed to `qemu-img` is made absolute first: a relative name
//! could start with `-` (read as an option) or contain `proto:` (read as a
//! block protocol), and a relative backing file would be resolved against the
//! overlay's folder rather than ours.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

use super::{HypervisorError, Result};

const QEMU_IMG: &str = "qemu-img";

/// Grows a disk of a stopped VM to `bytes`.
pub fn resize(path: &Path, bytes: u64) -> Result<()> {
    let path = absolute(path)?;
    run(
        "resize",
        &path,
        Command::new(QEMU_IMG).args(["resize", "-q", "-f", "qcow2"]).arg(&path).arg(bytes.to_string()),
    )
    .map(drop)
}

/// What `qemu-img info` reports about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Detected format (`qcow2`, `raw`, ...), probed from the content.
    pub format: String,
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// Backing file of an overlay, as an absolute path when qemu-img can
    /// resolve it.
    pub backing_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
}

fn disk_err(what: &str, path: &Path, detail: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::Disk(format!("{what} {}: {}", path.display(), detail.to_string().trim()))
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| disk_err("resolve", path, e))
}

fn run(what: &str, path: &Path, cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| disk_err(what, path, format!("cannot run {QEMU_IMG}: {e}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = if stderr.trim().is_empty() { out.status.to_string() } else { stderr.into_owned() };
        Err(disk_err(what, path, detail))
    }
}

/// Creates `path` as an empty 0600 file, refusing to clobber an existing
/// disk, so that qemu-img (which keeps the mode of an existing file) never
/// leaves a world-readable image behind, even briefly.
fn reserve(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| disk_err("create", path, e))
}

/// Runs `qemu-img create` into a reserved file; removes the file on failure.
fn create_with(path: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    reserve(path)?;
    let result = run("create", path, Command::new(QEMU_IMG).arg("create").args(args)).and_then(|_| {
        // The umask cannot widen it, but make the contract explicit.
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|e| disk_err("chmod", path, e))
    });
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// Creates an empty qcow2 image of `size_bytes` (guest-visible size).
/// Fails if `path` already exists.
pub fn create_blank(path: &Path, size_bytes: u64) -> Result<()> {
    let path = absolute(path)?;
    let size = size_bytes.to_string();
    create_with(&path, &["-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str(), size.as_ref()])
}

/// Creates a sparse raw file of `size_bytes` (a data-plane disk). Fails if
/// `path` already exists.
pub fn create_blank_raw(path: &Path, size_bytes: u64) -> Result<()> {
    let path = absolute(path)?;
    let size = size_bytes.to_string();
    create_with(&path, &["-q".as_ref(), "-f".as_ref(), "raw".as_ref(), path.as_os_str(), size.as_ref()])
}

/// Creates a qcow2 overlay on top of `base`, with the same virtual size.
/// The base's format is probed from its content, never guessed from its name.
/// Fails if `path` already exists.
pub fn create_overlay(path: &Path, base: &Path) -> Result<()> {
    let path = absolute(path)?;
    let base = absolute(base)?;
    let base_info = info(&base)?;
    create_with(
        &path,
        &[
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            "-F".as_ref(),
            base_info.format.as_ref(),
            path.as_os_str(),
        ],
    )
}

/// Reads an image's format, sizes and backing file.
///
/// Uses `-U` (force-share) so it also works on disks of running guests,
/// whose image lock would otherwise make qemu-img fail.
pub fn info(path: &Path) -> Result<DiskInfo> {
    let path = absolute(path)?;
    let out = run("info", &path, Command::new(QEMU_IMG).args(["info", "-U", "--output=json"]).arg(&path))?;
    let raw: QemuImgInfo =
        serde_json::from_slice(&out.stdout).map_err(|e| disk_err("parse qemu-img info of", &path, e))?;
    Ok(DiskInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size,
        backing_file: raw.full_backing_filename.or(raw.backing_filename).map(PathBuf::from),
    })
}

/// Deletes a disk file; a missing file is not an error.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(disk_err("remove", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("novacron-disks-{}", Uuid::new_v4()));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn blank_disk() {
        let dir = TempDir::new();
        let p = dir.join("blank.qcow2");
        create_blank(&p, 64 * MIB).unwrap();
        assert_eq!(mode(&p), 0o600);
        let i = info(&p).unwrap();
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 64 * MIB);
        assert!(i.actual_size > 0);
        assert_eq!(i.backing_file, None);

        // An existing disk is never overwritten.
        let err = create_blank(&p, MIB).unwrap_err();
        assert!(matches!(err, HypervisorError::Disk(_)), "{err}");
        assert_eq!(info(&p).unwrap().virtual_size, 64 * MIB);
    }

    #[test]
    fn overlay_on_qcow2_base() {
        let dir = TempDir::new();
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        create_blank(&base, 32 * MIB).unwrap();
        create_overlay(&top, &base).unwrap();
        assert_eq!(mode(&top), 0o600);
        let i = info(&top).unwrap();
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 32 * MIB);
        assert_eq!(i.backing_file.as_deref(), Some(base.as_path()));
    }

    #[test]
    fn overlay_detects_base_format_from_content() {
        let dir = TempDir::new();
        // A raw image misleadingly named .qcow2.
        let base = dir.join("liar.qcow2");
        fs::File::create(&base).unwrap().set_len(16 * MIB).unwrap();
        let top = dir.join("top.qcow2");
        create_overlay(&top, &base).unwrap();
        let out = Command::new(QEMU_IMG).args(["info", "-U", "--output=json"]).arg(&top).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["backing-filename-format"], "raw");
        assert_eq!(info(&top).unwrap().virtual_size, 16 * MIB);
    }

    #[test]
    fn errors_carry_qemu_img_stderr() {
        let dir = TempDir::new();
        let missing = dir.join("missing.qcow2");
        let err = info(&missing).unwrap_err();
        match &err {
            HypervisorError::Disk(msg) => assert!(msg.contains("No such file"), "{msg}"),
            other => panic!("unexpected {other:?}"),
        }
        let top = dir.join("top.qcow2");
        assert!(matches!(create_overlay(&top, &missing), Err(HypervisorError::Disk(_))));
        assert!(!top.exists());

        // A failing qemu-img run leaves no half-made file behind.
        let bad = dir.join("bad.qcow2");
        match create_blank(&bad, u64::MAX).unwrap_err() {
            HypervisorError::Disk(msg) => assert!(msg.contains("size"), "{msg}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!bad.exists());
    }

    #[test]
    fn remove_is_idempotent() {
        let dir = TempDir::new();
        let p = dir.join("gone.qcow2");
        create_blank(&p, MIB).unwrap();
        remove(&p).unwrap();
        assert!(!p.exists());
        remove(&p).unwrap();
    }
}
