//! Images subsystem: base images under the data dir's `images/`, received
//! by streaming upload or imported from a host folder.
//!
//! An uploaded file is untrusted. Its format is detected by `qemu-img info`,
//! never taken from the client, and a qcow2 that names a backing file or an
//! external data file (either could make QEMU open any host file, including
//! through the `json:` pseudo-protocol) is refused: only overlays the daemon
//! itself creates have backing files.
//!
//! Images and cloud-init seeds (user-data holds passwords and keys) are
//! readable only by their owner and QEMU's group ([`share_with_qemu`]).

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is larger than the {max} byte upload limit")]
    TooLarge { max: u64 },
    #[error("checksum mismatch: the upload has SHA-256 {actual}, the client announced {expected}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("X-Checksum-Sha256 must be 64 hexadecimal digits")]
    BadChecksum,
    #[error("unsupported image format {0:?}: upload raw or qcow2")]
    UnsupportedFormat(String),
    #[error("the image names a backing file ({0}); only images without one are accepted")]
    BackingFile(String),
    #[error("the image uses an external data file ({0}); only self-contained images are accepted")]
    DataFile(String),
    #[error("the upload ended early: {0}")]
    Truncated(String),
    /// qemu-img calls any file "raw", so a raw image must at least look
    /// like a disk.
    #[error("a raw image must be at least {MIN_RAW_BYTES} bytes and a whole number of 512-byte sectors; this file has {0} bytes (not a disk image?)")]
    NotADisk(u64),
    #[error("cannot inspect the image: {0}")]
    Inspect(String),
    #[error("image storage: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, ImageError>;

/// Smallest raw image accepted: 1 MiB (no bootable disk is smaller; text
/// files and HTML error pages mostly are).
pub const MIN_RAW_BYTES: u64 = 1 << 20;

/// Groups QEMU runs as under libvirt, in order of preference: Debian's
/// `libvirt-qemu`, then `qemu` (Fedora and most others).
const QEMU_GROUPS: [&str; 2] = ["libvirt-qemu", "qemu"];

/// QEMU's group id, looked up once; `None` when no such group exists.
fn qemu_gid() -> Option<nix::unistd::Gid> {
    static GID: std::sync::OnceLock<Option<nix::unistd::Gid>> = std::sync::OnceLock::new();
    *GID.get_or_init(|| {
        QEMU_GROUPS.iter().find_map(|name| nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid))
    })
}

/// Makes a file QEMU reads (an image, a seed, a frozen base) mode `mode`
/// (0640 or 0440) with QEMU's group, so nobody else can read it. The group
/// is what keeps the daemon's access when libvirt's DAC labelling hands the
/// file to QEMU's user and, for read-only disks, never hands it back: the
/// daemon's user is a member (systemd/sysusers.d). Where the group cannot be
/// set (no such group, or a daemon user outside it) the file keeps the
/// daemon's group and QEMU gets it through libvirt's labelling alone.
pub fn share_with_qemu(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = qemu_gid() {
        if let Err(e) = nix::unistd::chown(path, None, Some(gid)) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(error = %e, "cannot give image files QEMU's group; is the daemon's user a member?")
            });
        }
    }
    Ok(())
}

/// Creates `path` as an empty 0600 file (failing if it exists), so that a
/// tool writing into it later never leaves it readable by others, even
/// briefly.
fn reserve(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

/// What the daemon knows about a stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `raw` or `qcow2`.
    pub format: String,
    pub virtual_size: u64,
    /// Bytes of the file itself.
    pub file_size: u64,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

#[derive(Deserialize)]
struct QemuInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    data: Option<serde_json::Value>,
}

/// Checks an image file and reports its format and size. Refuses anything
/// that would make QEMU open another file.
pub fn inspect(path: &Path) -> Result<(String, u64)> {
    let path = std::path::absolute(path)?;
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&path)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| ImageError::Inspect(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(ImageError::Inspect(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let info: QemuInfo =
        serde_json::from_slice(&out.stdout).map_err(|e| ImageError::Inspect(e.to_string()))?;
    if let Some(b) = info.backing_filename {
        return Err(ImageError::BackingFile(b));
    }
    if let Some(data) = info.format_specific.and_then(|f| f.data) {
        if let Some(file) = data.get("data-file").and_then(|v| v.as_str()) {
            return Err(ImageError::DataFile(file.to_string()));
        }
        if data.get("data-file-raw").is_some() {
            return Err(ImageError::DataFile("(raw external data)".into()));
        }
    }
    match info.format.as_str() {
        "raw" => {
            let len = std::fs::metadata(&path)?.len();
            if len < MIN_RAW_BYTES || len % 512 != 0 {
                return Err(ImageError::NotADisk(len));
            }
            Ok((info.format, info.virtual_size))
        }
        "qcow2" => Ok((info.format, info.virtual_size)),
        other => Err(ImageError::UnsupportedFormat(other.to_string())),
    }
}

/// Parses an announced checksum.
pub fn parse_checksum(s: &str) -> Result<String> {
    let s = s.trim().to_ascii_lowercase();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(ImageError::BadChecksum)
    }
}

/// Deletes the temporary files of uploads and peer copies that a crash
/// (`kill -9`, power loss) left in the images folder; run at start.
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".upload-") || name.starts_with(".link-") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!(FILE = %name, "removed an unfinished image file"),
                Err(err) => {
                    tracing::warn!(FILE = %name, error = %err, "cannot remove an unfinished image file")
                }
            }
        }
    }
}

/// An image being received. Data goes to a hidden temporary file next to
/// its final place; dropping an unfinished upload removes it, so a failed
/// or interrupted upload leaves nothing behind.
pub struct Upload {
    tmp: PathBuf,
    /// Chunks go to a writer thread, so hashing one chunk overlaps writing
    /// the previous ones (each alone costs about as much as the transfer).
    writer: Option<Writer>,
    hasher: Sha256,
    written: u64,
    max: u64,
}

struct Writer {
    // tokio's channel: the async upload path awaits a full queue instead of
    // parking a runtime worker (a `block_in_place` per 16 KiB HTTP/2 frame
    // cost more CPU than hashing it).
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    done: std::thread::JoinHandle<std::io::Result<std::fs::File>>,
}

/// Chunks in flight to the writer: bounds memory whatever the image size.
const WRITE_QUEUE: usize = 8;

impl Upload {
    pub fn begin(dir: &Path, max: u64) -> Result<Upload> {
        let tmp = dir.join(format!(".upload-{}", uuid::Uuid::new_v4()));
        let mut file = reserve(&tmp)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITE_QUEUE);
        let done = std::thread::Builder::new().name("image-writer".into()).spawn(move || {
            while let Some(chunk) = rx.blocking_recv() {
                file.write_all(&chunk)?;
            }
            Ok(file)
        })?;
        Ok(Upload { tmp, writer: Some(Writer { tx, done }), hasher: Sha256::new(), written: 0, max })
    }

    /// Appends one chunk; blocks while the writer is `WRITE_QUEUE` behind.
    /// Not for async code: use [`Upload::write_async`] there.
    pub fn write(&mut self, chunk: bytes::Bytes) -> Result<()> {
        self.account(&chunk)?;
        let sent = self.writer.as_ref().expect("upload is open").tx.blocking_send(chunk);
        self.sent(sent.is_ok())
    }

    /// Appends one chunk from async code; waits while the writer is
    /// `WRITE_QUEUE` behind. Hashes in place: a chunk is one network frame
    /// or read, tens of microseconds of SHA-256.
    pub async fn write_async(&mut self, chunk: bytes::Bytes) -> Result<()> {
        self.account(&chunk)?;
        let sent = self.writer.as_ref().expect("upload is open").tx.send(chunk).await;
        self.sent(sent.is_ok())
    }

    fn account(&mut self, chunk: &[u8]) -> Result<()> {
        self.written += chunk.len() as u64;
        if self.written > self.max {
            return Err(ImageError::TooLarge { max: self.max });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn sent(&mut self, ok: bool) -> Result<()> {
        if ok {
            return Ok(());
        }
        // The writer stopped on an I/O error; closing it reports the error.
        Err(self.close_writer().err().unwrap_or_else(|| std::io::Error::other("writer stopped").into()))
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Waits for every queued chunk to be written and returns the file.
    fn close_writer(&mut self) -> Result<std::fs::File> {
        let Writer { tx, done } = self.writer.take().expect("upload is open");
        drop(tx);
        let file = done.join().map_err(|_| std::io::Error::other("image writer panicked"))??;
        Ok(file)
    }

    /// Flushes the file and checks its SHA-256; returns the actual one.
    fn seal(&mut self, expected_sha256: Option<&str>) -> Result<String> {
        let file = self.close_writer()?;
        file.sync_all()?;
        drop(file);
        let actual = hex::encode(self.hasher.finalize_reset());
        if let Some(expected) = expected_sha256 {
            if expected != actual {
                return Err(ImageError::ChecksumMismatch { expected: expected.into(), actual });
            }
        }
        Ok(actual)
    }

    /// Verifies and renames the upload to `dest` (replacing it), without
    /// looking inside: for files that are not disk images.
    pub fn finish_file(mut self, expected_sha256: &str, dest: &Path) -> Result<()> {
        self.seal(Some(expected_sha256))?;
        std::fs::rename(&self.tmp, dest)?;
        if let Some(dir) = dest.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Verifies and moves the upload to `dest`, which must not exist: an
    /// `io::ErrorKind::AlreadyExists` error means another image took the
    /// name first.
    pub fn finish(self, expected_sha256: Option<&str>, dest: &Path) -> Result<ImageInfo> {
        self.finish_into(expected_sha256, dest, false)
    }

    /// Like [`Upload::finish`], but atomically replaces a `dest` that
    /// exists (a peer's copy of an image whose local file went bad).
    pub fn finish_replace(self, expected_sha256: &str, dest: &Path) -> Result<ImageInfo> {
        self.finish_into(Some(expected_sha256), dest, true)
    }

    fn finish_into(mut self, expected_sha256: Option<&str>, dest: &Path, replace: bool) -> Result<ImageInfo> {
        let actual = self.seal(expected_sha256)?;
        let (format, virtual_size) = inspect(&self.tmp)?;
        share_with_qemu(&self.tmp, 0o640)?;
        if replace {
            std::fs::rename(&self.tmp, dest)?;
        } else {
            // link + unlink instead of rename: never replace an existing image.
            std::fs::hard_link(&self.tmp, dest)?;
            let _ = std::fs::remove_file(&self.tmp);
        }
        if let Some(dir) = dest.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(ImageInfo { format, virtual_size, file_size: self.written, sha256: actual })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.close_writer();
        }
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Makes `dest` an independent qcow2 copy of the image `base`.
pub fn copy_to_qcow2(base: &Path, format: &str, dest: &Path) -> Result<()> {
    convert(base, format, dest, "qcow2")
}

/// A full, sparse raw copy (zero runs are not written): the disk format the
/// data plane serves.
pub fn copy_to_raw(base: &Path, format: &str, dest: &Path) -> Result<()> {
    convert(base, format, dest, "raw")
}

fn convert(base: &Path, format: &str, dest: &Path, out_format: &str) -> Result<()> {
    // qemu-img keeps the mode of the file it overwrites: never 0644.
    drop(reserve(dest)?);
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", format, "-O", out_format])
        .arg(std::path::absolute(base)?)
        .arg(std::path::absolute(dest)?)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| ImageError::Inspect(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(dest);
        return Err(ImageError::Inspect(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    std::fs::set_permissions(dest, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

/// Copies a host file into the image store through the same checks as an
/// upload.
pub fn import(src: &Path, images_dir: &Path, dest: &Path, max: u64) -> Result<ImageInfo> {
    let mut input = std::fs::File::open(src)?;
    let mut up = Upload::begin(images_dir, max)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut input, &mut buf)?;
        if n == 0 {
            break;
        }
        up.write(bytes::Bytes::copy_from_slice(&buf[..n]))?;
    }
    up.finish(None, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nc-images-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn qemu_img(args: &[&str]) {
        assert!(Command::new("qemu-img").args(args).status().unwrap().success());
    }

    #[test]
    fn upload_checks_checksum_and_format() {
        let d = dir("up");
        let data = vec![7u8; 3 * 1024 * 1024];
        let sha = hex::encode(Sha256::digest(&data));
        let mut up = Upload::begin(&d, 1 << 30).unwrap();
        for c in data.chunks(65536) {
            up.write(bytes::Bytes::copy_from_slice(c)).unwrap();
        }
        let info = up.finish(Some(&sha), &d.join("disk.raw")).unwrap();
        assert_eq!(
            (info.format.as_str(), info.virtual_size, info.sha256.clone()),
            ("raw", data.len() as u64, sha)
        );

        let mut up = Upload::begin(&d, 1 << 30).unwrap();
        up.write(bytes::Bytes::from_static(b"abc")).unwrap();
        let wrong = "0".repeat(64);
        assert!(matches!(up.finish(Some(&wrong), &d.join("x")), Err(ImageError::ChecksumMismatch { .. })));
        let mut up = Upload::begin(&d, 10).unwrap();
        assert!(matches!(up.write(bytes::Bytes::from_static(&[0u8; 11])), Err(ImageError::TooLarge { .. })));
        drop(up);
        // Only the finished image is left.
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("disk.raw")]);
    }

    #[test]
    fn qcow2_with_backing_or_data_file_is_refused() {
        let d = dir("evil");
        let base = d.join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
        assert_eq!(inspect(&base).unwrap(), ("qcow2".to_string(), 16 << 20));
        let overlay = d.join("overlay.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ]);
        assert!(matches!(inspect(&overlay), Err(ImageError::BackingFile(_))));
        let json = d.join("json.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "raw",
            "-b",
            "json:{\"file.filename\":\"/etc/shadow\"}",
            json.to_str().unwrap(),
            "16M",
        ]);
        assert!(matches!(inspect(&json), Err(ImageError::BackingFile(_))));
        let ext = d.join("ext.qcow2");
        let ext_data = d.join("ext.data");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", ext_data.display()),
            ext.to_str().unwrap(),
            "16M",
        ]);
        assert!(matches!(inspect(&ext), Err(ImageError::DataFile(_))));
        let vmdk = d.join("x.vmdk");
        qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "16M"]);
        assert!(matches!(inspect(&vmdk), Err(ImageError::UnsupportedFormat(_))));
    }

    #[test]
    fn leftovers_of_a_crash_are_removed_and_images_kept() {
        let d = dir("left");
        for name in [".upload-1", ".link-2", "disk.raw", ".hidden"] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        remove_leftovers(&d);
        let mut names: Vec<_> =
            std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, vec![".hidden".to_string(), "disk.raw".to_string()]);
    }

    #[test]
    fn checksums_parse() {
        assert!(parse_checksum(&"A".repeat(64)).is_ok());
        assert!(parse_checksum("abc").is_err());
        assert!(parse_checksum(&"g".repeat(64)).is_err());
    }
}

/// Builds a cloud-init NoCloud seed: an ISO 9660 image labelled `cidata`
/// holding `files` (name, content). Made with Debian's `genisoimage`, the
/// tool cloud-init's own docs use for NoCloud seeds; a seed is a few KiB,
/// so an external process costs nothing and needs no ISO writer in-tree.
pub fn build_seed(dest: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let work = dest.with_extension("d");
    let _ = std::fs::remove_dir_all(&work);
    // The user-data is secret from its first byte on disk.
    std::fs::DirBuilder::new().mode(0o700).create(&work)?;
    let result = (|| {
        let mut names = Vec::new();
        for (name, content) in files {
            std::fs::write(work.join(name), content)?;
            names.push(work.join(name));
        }
        let tmp = dest.with_extension("iso.tmp");
        let _ = std::fs::remove_file(&tmp);
        // genisoimage truncates the file and keeps its 0600 mode.
        drop(reserve(&tmp)?);
        let out = Command::new("genisoimage")
            .args(["-quiet", "-output"])
            .arg(&tmp)
            .args(["-volid", "cidata", "-joliet", "-rock"])
            .args(&names)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| ImageError::Inspect(format!("cannot run genisoimage: {e}")))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(ImageError::Inspect(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        share_with_qemu(&tmp, 0o640)?;
        std::fs::rename(&tmp, dest)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

#[cfg(test)]
mod seed_tests {
    #[test]
    fn seed_is_a_cidata_iso() {
        let d = std::env::temp_dir().join(format!("nc-seed-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        let iso = d.join("seed.iso");
        super::build_seed(&iso, &[("user-data", b"#cloud-config\n"), ("meta-data", b"instance-id: x\n")])
            .unwrap();
        let bytes = std::fs::read(&iso).unwrap();
        // ISO 9660 primary volume descriptor at 32 KiB: "CD001", volume id at +40.
        assert_eq!(&bytes[32769..32774], b"CD001");
        assert!(String::from_utf8_lossy(&bytes[32808..32840]).starts_with("cidata"));
        let _ = std::fs::remove_dir_all(d);
    }
}
