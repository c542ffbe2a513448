//! What a vhost-user export reads and writes: a `BlockDevice`. `LocalFile`
//! is the raw image on this node; the replicating device wraps it.

use super::DataplaneError;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// O_DIRECT wants buffer address, length and offset aligned to the logical
/// block size of the storage below; 4 KiB covers every device we meet and
/// is the block size the guest is told to use.
pub const ALIGN: usize = 4096;

/// A disk as the vhost worker threads see it. Blocking calls; one request at
/// a time per virtqueue, so an implementation may block until its data is
/// safe (the replicating device waits for the peer here).
pub trait BlockDevice: Send + Sync + 'static {
    /// Capacity in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Fills `buf` from `off`. `off + buf.len()` is within `size()`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes `data` at `off`; with `fua` it is durable when this returns.
    fn write_at(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
}

/// A heap buffer whose start is `ALIGN`-aligned, in safe code: over-allocate
/// by `ALIGN` and start at the first aligned byte.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let addr = raw.as_ptr() as usize;
        let start = (ALIGN - addr % ALIGN) % ALIGN;
        AlignedBuf { raw, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn aligned(buf: &[u8], off: u64) -> bool {
    (buf.as_ptr() as usize) % ALIGN == 0 && buf.len() % ALIGN == 0 && off % ALIGN as u64 == 0
}

/// A raw image file opened with O_DIRECT: no host page cache, so a write
/// that completed is in the device (and durable after `flush`), and the
/// guest's own cache is the only one.
pub struct LocalFile {
    file: File,
    size: u64,
    path: PathBuf,
    uid: u32,
    /// Serialises the read-modify-write of requests that do not cover whole
    /// aligned blocks (two of them on one block would lose an update).
    partial: Mutex<()>,
}

impl LocalFile {
    /// Opens `path` read-write. Refused: a missing file, anything but a
    /// regular file, a size that is not a multiple of 4 KiB.
    /// The open file (for SEEK_DATA/SEEK_HOLE: a full sync sends only
    /// allocated extents).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    pub fn open(path: &Path) -> Result<Self, DataplaneError> {
        let err = |e: io::Error| DataplaneError::OpenDisk(path.to_path_buf(), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(path)
            .map_err(err)?;
        // Checked on the open file, not the path: nothing can swap it between.
        let meta = file.metadata().map_err(err)?;
        if !meta.file_type().is_file() {
            return Err(DataplaneError::NotRegularFile(path.to_path_buf()));
        }
        if meta.len() % ALIGN as u64 != 0 {
            return Err(DataplaneError::UnalignedSize(path.to_path_buf(), meta.len()));
        }
        use std::os::unix::fs::MetadataExt;
        Ok(LocalFile {
            file,
            size: meta.len(),
            path: path.to_path_buf(),
            uid: meta.uid(),
            partial: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Owner of the open file (not of whatever the path names now).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    fn check_range(&self, len: usize, off: u64) -> io::Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {off} beyond the end ({} bytes)", self.size),
            )),
        }
    }

    /// The aligned block range around `[off, off + len)`, read into a bounce buffer.
    fn read_around(&self, len: usize, off: u64) -> io::Result<(AlignedBuf, usize)> {
        let start = off - off % ALIGN as u64;
        let end = (off + len as u64).next_multiple_of(ALIGN as u64);
        let mut bounce = AlignedBuf::new((end - start) as usize);
        self.file.read_exact_at(bounce.as_mut_slice(), start)?;
        Ok((bounce, (off - start) as usize))
    }
}

impl BlockDevice for LocalFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check_range(buf.len(), off)?;
        if aligned(buf, off) {
            return self.file.read_exact_at(buf, off);
        }
        let (bounce, at) = self.read_around(buf.len(), off)?;
        let n = buf.len();
        buf.copy_from_slice(&bounce.as_slice()[at..at + n]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()> {
        self.check_range(data.len(), off)?;
        if aligned(data, off) {
            self.file.write_all_at(data, off)?;
        } else if (off % ALIGN as u64 == 0) && data.len() % ALIGN == 0 {
            // Whole blocks from an unaligned buffer: copy, no read needed.
            let mut bounce = AlignedBuf::new(data.len());
            bounce.as_mut_slice().copy_from_slice(data);
            self.file.write_all_at(bounce.as_slice(), off)?;
        } else {
            let _one = self.partial.lock().unwrap_or_else(|p| p.into_inner());
            let (mut bounce, at) = self.read_around(data.len(), off)?;
            bounce.as_mut_slice()[at..at + data.len()].copy_from_slice(data);
            self.file.write_all_at(bounce.as_slice(), off - at as u64)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scratch folder on a file system with O_DIRECT (not tmpfs).
    pub(crate) fn scratch(tag: &str) -> PathBuf {
        let base =
            std::env::var_os("NOVACRON_TEST_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
        let dir = base.join(format!("nc-dp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub(crate) fn raw_file(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("disk.raw");
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [0, 1, 512, 4096, 1 << 20] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
        }
    }

    #[test]
    fn local_file_round_trips_aligned_and_partial_io() {
        let dir = scratch("local");
        let path = raw_file(&dir, 1 << 20);
        let f = LocalFile::open(&path).unwrap();
        assert_eq!(f.size(), 1 << 20);
        let mut block = AlignedBuf::new(8192);
        block.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
        f.write_at(block.as_slice(), 4096, false).unwrap();
        // 512-byte aligned but not 4 KiB aligned, from a plain Vec.
        f.write_at(&[7u8; 512], 512, true).unwrap();
        // Crossing a block boundary, odd offset and length.
        f.write_at(&[9u8; 100], 4096 * 3 - 50, false).unwrap();
        f.flush().unwrap();
        drop(f);

        let disk = std::fs::read(&path).unwrap();
        assert_eq!(&disk[512..1024], &[7u8; 512]);
        assert!(
            disk[..512].iter().chain(&disk[1024..4096]).all(|&b| b == 0),
            "neighbours of a partial write"
        );
        let mut want = block.as_slice().to_vec();
        want[8192 - 50..].fill(9);
        assert_eq!(&disk[4096..4096 * 3], &want[..]);
        assert_eq!(&disk[4096 * 3..4096 * 3 + 50], &[9u8; 50]);

        let f = LocalFile::open(&path).unwrap();
        let mut back = AlignedBuf::new(8192);
        f.read_at(back.as_mut_slice(), 4096).unwrap();
        assert_eq!(back.as_slice(), &want[..]);
        let mut odd = vec![0u8; 3];
        f.read_at(&mut odd, 1023).unwrap();
        assert_eq!(odd, [7, 0, 0]);
        // Past the end: an error, not a short read.
        assert!(f.read_at(&mut [0u8; 4096], (1 << 20) - 2048).is_err());
        assert!(f.write_at(&[0u8; 4096], 1 << 20, false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_refuses_what_is_not_a_block_sized_regular_file() {
        let dir = scratch("refuse");
        assert!(matches!(LocalFile::open(&dir.join("missing.raw")), Err(DataplaneError::OpenDisk(..))));
        // A folder cannot be opened read-write at all; a FIFO can.
        assert!(LocalFile::open(&dir).is_err());
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = LocalFile::open(&fifo).err().expect("a FIFO was accepted");
        assert!(matches!(e, DataplaneError::NotRegularFile(_) | DataplaneError::OpenDisk(..)), "{e}");
        let odd = dir.join("odd.raw");
        std::fs::File::create(&odd).unwrap().set_len(4096 + 512).unwrap();
        assert!(matches!(LocalFile::open(&odd), Err(DataplaneError::UnalignedSize(_, 4608))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
