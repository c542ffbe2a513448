//! Per-disk durable metadata beside the disk file (`<disk>.meta`): who the
//! node is for the disk (role, epoch, generation), the disk's own
//! consistency state, the primary's "peer replica outdated" mark, and the
//! dirty bitmap (one bit per [`GRANULARITY`] bytes) of writes the peer may
//! not hold. Survives a crash at any point:
//!
//! - The header is written to two alternating 4 KiB slots, each with a
//!   sequence number and a CRC-32, and fdatasync'd; load takes the valid
//!   slot with the highest sequence, so a torn write of one slot leaves the
//!   other (the previous header).
//! - The bitmap follows the slots. Setting bits is write-ahead: the touched
//!   bitmap pages are written and fdatasync'd before
//!   [`Meta::mark_dirty_durable`] returns, and only then may the caller
//!   write the guest data. Clears are lazy (a stale set bit costs an extra
//!   resync of one block, nothing more), so they reach the file with the
//!   next page write or [`Meta::persist_clears`].
//! - The file is sparse: a 1 TiB disk's 32 MiB bitmap takes no blocks
//!   until bits are set, and load reads only the allocated parts.
//! - One writer at a time: a [`Meta`] holds an exclusive `flock` on the
//!   file for its life, and a second `open` fails. Each writer counts slot
//!   sequences from what it loaded, so a second, stale writer would put
//!   its next header into the slot of a newer one and bring an older
//!   header back (it happened: a retired primary's late write turned a
//!   replica's `up_to_date` back into `syncing`). Readers use [`peek`].

use super::config::DiskRole;
use crate::cluster::ReplicaState;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Bytes of disk per bitmap bit.
pub const GRANULARITY: u64 = 4096;

/// Version of the slot layout and of [`MetaHeader`]'s encoding.
pub const META_FORMAT: u32 = 1;

const MAGIC: [u8; 8] = *b"NCDMETA\0";
/// Bytes of one header slot; two slots, then the bitmap.
const SLOT: u64 = 4096;
const BITMAP_AT: u64 = 2 * SLOT;
/// Unit in which bitmap bytes are written (and the bitmap area rounded).
const PAGE: usize = 4096;
/// magic, format, seq, granularity, body length.
const SLOT_FIXED: usize = 8 + 4 + 8 + 4 + 4;
/// Longest device name kept (a slot must hold the header).
pub const MAX_DEVICE_LEN: usize = 255;

/// The durable header of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaHeader {
    pub vm: Uuid,
    pub device: String,
    /// What this node is for the disk (the config's role, same encoding).
    pub role: DiskRole,
    /// Highest epoch this node has seen for the disk.
    pub epoch: u64,
    /// Data generation: of the primary's data (primary), or of the last
    /// sync completed from it (secondary).
    pub generation: u64,
    /// This copy's own state.
    pub state: ReplicaState,
    /// Primary only: the peer's replica misses acknowledged writes (set
    /// before the first write the peer did not get is acknowledged).
    pub peer_outdated: bool,
    /// Disk size; a multiple of 512.
    pub size_bytes: u64,
}

/// `<disk>.meta`, beside the disk file.
pub fn meta_path(disk: &Path) -> PathBuf {
    let mut name = disk.file_name().unwrap_or_default().to_os_string();
    name.push(".meta");
    disk.with_file_name(name)
}

/// The metadata of one disk, open for update. Not shared: the owner
/// serializes calls (`&mut self`).
#[derive(Debug)]
pub struct Meta {
    file: File,
    /// The writer's lock, held on a clone of `file` (same open file
    /// description) for as long as this value lives; see the module's comment.
    _lock: nix::fcntl::Flock<File>,
    path: PathBuf,
    header: MetaHeader,
    /// Sequence number of the slot holding `header`.
    seq: u64,
    /// In-memory bitmap: bit `b % 8` of byte `b / 8` is block `b`; its
    /// length is the on-disk bitmap area (whole pages).
    bits: Vec<u8>,
    /// Set bits.
    dirty_blocks: u64,
    /// Pages changed by clears and not written since.
    cleared_pages: BTreeSet<usize>,
    /// Pages with set bits whose write failed: written with the next mark.
    unsynced_pages: BTreeSet<usize>,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn bad_input(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

fn blocks_of(size: u64) -> u64 {
    size.div_ceil(GRANULARITY)
}

/// Bytes of the bitmap area for a disk of `size`: whole pages.
fn bitmap_len(size: u64) -> usize {
    (blocks_of(size).div_ceil(8) as usize).div_ceil(PAGE) * PAGE
}

fn check_header(h: &MetaHeader) -> io::Result<()> {
    if h.size_bytes % 512 != 0 {
        return Err(bad_input(format!("disk size {} is not a multiple of 512", h.size_bytes)));
    }
    if h.device.is_empty() || h.device.len() > MAX_DEVICE_LEN {
        return Err(bad_input(format!("device name of {} bytes (1 to {MAX_DEVICE_LEN})", h.device.len())));
    }
    Ok(())
}

/// Syncs the folder holding `path`, so a file created or removed there
/// stays so after a crash (unlike `util::sync_dir`, an error is an error:
/// the callers' ordering depends on it).
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// The header of `path` as it is on disk, for a reader (the API daemon,
/// a check before a promotion) while a writer may hold it.
pub fn peek(path: &Path) -> io::Result<MetaHeader> {
    Ok(load_header(&File::open(path)?, path)?.0)
}

/// The valid slot with the highest sequence.
fn load_header(file: &File, path: &Path) -> io::Result<(MetaHeader, u64)> {
    let mut slots = vec![0u8; BITMAP_AT as usize];
    let got = read_up_to(file, &mut slots, 0)?;
    slots.truncate(got);
    let a = decode_slot(slots.get(..SLOT as usize).unwrap_or(&[]));
    let b = decode_slot(slots.get(SLOT as usize..).unwrap_or(&[]));
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if a.1 >= b.1 { a } else { b }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(ea), Err(eb)) => {
            Err(invalid(format!("{}: no valid header (slot 0: {ea}; slot 1: {eb})", path.display())))
        }
    }
}

/// Takes the writer's lock of `path` (open as `file`), or says who may
/// hold it.
fn lock(file: &File, path: &Path) -> io::Result<nix::fcntl::Flock<File>> {
    nix::fcntl::Flock::lock(file.try_clone()?, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use (the disk is still open as a primary or a replica)",
                        path.display()
                    ),
                )
            } else {
                io::Error::from(e)
            }
        },
    )
}

/// CRC-32 (IEEE, as zlib), table built at compile time.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// The bytes of a slot: `[magic][format u32][seq u64][granularity u32]
/// [len u32][postcard header][crc32 of all before]`, little-endian, zero
/// padded to [`SLOT`].
fn encode_slot(h: &MetaHeader, seq: u64) -> io::Result<Vec<u8>> {
    let body = postcard::to_allocvec(h).map_err(|e| invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(SLOT as usize);
    out.extend(MAGIC);
    out.extend(META_FORMAT.to_le_bytes());
    out.extend(seq.to_le_bytes());
    out.extend((GRANULARITY as u32).to_le_bytes());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(body);
    out.extend(crc32(&out).to_le_bytes());
    if out.len() > SLOT as usize {
        return Err(bad_input("header does not fit its slot"));
    }
    out.resize(SLOT as usize, 0);
    Ok(out)
}

/// A slot's header and sequence, or why it is not valid.
fn decode_slot(slot: &[u8]) -> Result<(MetaHeader, u64), String> {
    let u32_at = |i: usize| u32::from_le_bytes(slot[i..i + 4].try_into().expect("4 bytes"));
    if slot.len() < SLOT_FIXED + 4 || slot[..8] != MAGIC {
        return Err("no header".into());
    }
    if u32_at(8) != META_FORMAT {
        return Err(format!("format {} (this build reads {META_FORMAT})", u32_at(8)));
    }
    let seq = u64::from_le_bytes(slot[12..20].try_into().expect("8 bytes"));
    let len = u32_at(24) as usize;
    let end = SLOT_FIXED.checked_add(len).filter(|e| e + 4 <= slot.len()).ok_or("bad length")?;
    if u32_at(end) != crc32(&slot[..end]) {
        return Err("CRC mismatch (torn write)".into());
    }
    if u32_at(20) as u64 != GRANULARITY {
        return Err(format!("granularity {} (this build uses {GRANULARITY})", u32_at(20)));
    }
    let h: MetaHeader = postcard::from_bytes(&slot[SLOT_FIXED..end]).map_err(|e| e.to_string())?;
    check_header(&h).map_err(|e| e.to_string())?;
    Ok((h, seq))
}

impl Meta {
    /// Creates the metadata of a new disk: no bit set, the header in slot
    /// 1 (sequence 1; sequence `n` goes to slot `n % 2`). Written under a temporary name and renamed, so a crash leaves
    /// either no file or a valid one. Refuses to replace an existing file.
    pub fn create(path: &Path, header: MetaHeader) -> io::Result<Meta> {
        check_header(&header)?;
        if path.exists() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())));
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".new");
        let tmp = path.with_file_name(name);
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&tmp)?;
        let _lock = lock(&file, path)?;
        let len = bitmap_len(header.size_bytes);
        // Sparse: the bitmap area takes no blocks until bits are written.
        file.set_len(BITMAP_AT + len as u64)?;
        file.write_all_at(&encode_slot(&header, 1)?, SLOT)?;
        file.sync_data()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)?;
        Ok(Meta {
            file,
            _lock,
            path: path.to_owned(),
            header,
            seq: 1,
            bits: vec![0; len],
            dirty_blocks: 0,
            cleared_pages: BTreeSet::new(),
            unsynced_pages: BTreeSet::new(),
        })
    }

    /// Loads `path`: the valid slot with the highest sequence, and the
    /// bitmap (its allocated parts only).
    pub fn open(path: &Path) -> io::Result<Meta> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let _lock = lock(&file, path)?;
        let (header, seq) = load_header(&file, path)?;
        let len = bitmap_len(header.size_bytes);
        let file_len = file.metadata()?.len();
        if file_len < BITMAP_AT + len as u64 {
            return Err(invalid(format!(
                "{}: bitmap truncated ({file_len} bytes, a disk of {} needs {})",
                path.display(),
                header.size_bytes,
                BITMAP_AT + len as u64
            )));
        }
        let mut bits = vec![0u8; len];
        read_allocated(&file, &mut bits, BITMAP_AT)?;
        let mut meta = Meta {
            file,
            _lock,
            path: path.to_owned(),
            header,
            seq,
            bits,
            dirty_blocks: 0,
            cleared_pages: BTreeSet::new(),
            unsynced_pages: BTreeSet::new(),
        };
        // Bits beyond the disk (left by a shrink) mean nothing.
        meta.clear_from_block(blocks_of(meta.header.size_bytes));
        meta.cleared_pages.clear();
        meta.dirty_blocks = meta.bits.iter().map(|b| b.count_ones() as u64).sum();
        Ok(meta)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &MetaHeader {
        &self.header
    }

    /// Changes the header durably (the next slot, fdatasync'd) before it
    /// changes here. The size changes only through [`Meta::resize`].
    pub fn set_header(&mut self, change: impl FnOnce(&mut MetaHeader)) -> io::Result<()> {
        let mut next = self.header.clone();
        change(&mut next);
        if next.size_bytes != self.header.size_bytes {
            return Err(bad_input("the size changes only through resize"));
        }
        self.write_header(next)
    }

    fn write_header(&mut self, next: MetaHeader) -> io::Result<()> {
        check_header(&next)?;
        let seq = self.seq + 1;
        let slot = encode_slot(&next, seq)?;
        // On failure nothing advances: the retry writes the same slot again
        // and never the other one, which holds the last good header.
        self.file.write_all_at(&slot, (seq % 2) * SLOT)?;
        self.file.sync_data()?;
        self.seq = seq;
        self.header = next;
        Ok(())
    }

    /// Blocks `[first, end)` touched by `off..off+len`, checked against the
    /// disk.
    fn blocks(&self, off: u64, len: u64) -> io::Result<(u64, u64)> {
        let end = off.checked_add(len).filter(|&e| e <= self.header.size_bytes).ok_or_else(|| {
            bad_input(format!("range {off}+{len} beyond the disk ({})", self.header.size_bytes))
        })?;
        Ok((off / GRANULARITY, end.div_ceil(GRANULARITY)))
    }

    fn bit(&self, block: u64) -> bool {
        self.bits[(block / 8) as usize] & (1 << (block % 8)) != 0
    }

    /// Sets the bits of every block the ranges touch and, if any bit was
    /// clear, writes the touched bitmap pages and fdatasyncs them before it
    /// returns (`true`). Write-ahead: the caller writes the guest data only
    /// after this returned `Ok`. `Ok(false)`: all were set already (and
    /// durable), nothing written.
    pub fn mark_dirty_durable(&mut self, ranges: &[(u64, u64)]) -> io::Result<bool> {
        let mut spans = Vec::with_capacity(ranges.len());
        for &(off, len) in ranges {
            if len > 0 {
                spans.push(self.blocks(off, len)?);
            }
        }
        let mut pages = std::mem::take(&mut self.unsynced_pages);
        for (first, end) in spans {
            // Byte by byte (a whole-disk mark of 1 TiB is 2^25 bytes, not
            // 2^28 bits), each page noted once.
            let mut block = first;
            let mut last_page = None;
            while block < end {
                let byte = (block / 8) as usize;
                let upto = end.min((byte as u64 + 1) * 8);
                let mask = ((0xffu16 << (block % 8)) & (0xffu16 >> ((byte as u64 + 1) * 8 - upto))) as u8;
                let new = mask & !self.bits[byte];
                if new != 0 {
                    self.bits[byte] |= new;
                    self.dirty_blocks += new.count_ones() as u64;
                    if last_page != Some(byte / PAGE) {
                        last_page = Some(byte / PAGE);
                        pages.insert(byte / PAGE);
                    }
                }
                block = upto;
            }
        }
        if pages.is_empty() {
            return Ok(false);
        }
        match self.write_pages(&pages).and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                for p in &pages {
                    self.cleared_pages.remove(p);
                }
                Ok(true)
            }
            Err(e) => {
                // Set in memory but maybe not on disk: a later mark of the
                // same blocks must not skip the write.
                self.unsynced_pages = pages;
                Err(e)
            }
        }
    }

    fn write_pages(&self, pages: &BTreeSet<usize>) -> io::Result<()> {
        for &p in pages {
            let bytes = &self.bits[p * PAGE..(p + 1) * PAGE];
            self.file.write_all_at(bytes, BITMAP_AT + (p * PAGE) as u64)?;
        }
        Ok(())
    }

    /// Clears, in memory, the bits of the blocks `off..off+len` covers
    /// entirely (a block only partly in the range may hold another write
    /// the peer lacks), and the disk's last block when the range reaches
    /// the end. The file learns it lazily (see [`Meta::persist_clears`]).
    /// The caller clears only what the peer holds durably.
    pub fn clear(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.blocks(off, len)?;
        let size = self.header.size_bytes;
        let stop = if off + len == size { blocks_of(size) } else { (off + len) / GRANULARITY };
        for block in off.div_ceil(GRANULARITY)..stop {
            self.clear_block(block);
        }
        Ok(())
    }

    fn clear_block(&mut self, block: u64) {
        let (byte, mask) = ((block / 8) as usize, 1u8 << (block % 8));
        if self.bits[byte] & mask != 0 {
            self.bits[byte] &= !mask;
            self.dirty_blocks -= 1;
            self.cleared_pages.insert(byte / PAGE);
        }
    }

    /// Clears every bit from `block` to the end of the bitmap.
    fn clear_from_block(&mut self, block: u64) {
        let total = (self.bits.len() * 8) as u64;
        let mut b = block;
        while b < total && b % 8 != 0 {
            self.clear_block(b);
            b += 1;
        }
        for byte in (b / 8) as usize..self.bits.len() {
            if self.bits[byte] != 0 {
                self.dirty_blocks -= self.bits[byte].count_ones() as u64;
                self.bits[byte] = 0;
                self.cleared_pages.insert(byte / PAGE);
            }
        }
    }

    /// Writes the bitmap pages changed by clears since they were last
    /// written, and fdatasyncs.
    pub fn persist_clears(&mut self) -> io::Result<()> {
        if self.cleared_pages.is_empty() {
            return Ok(());
        }
        self.write_pages(&self.cleared_pages)?;
        self.file.sync_data()?;
        self.cleared_pages.clear();
        Ok(())
    }

    /// The dirty parts of the disk as merged `(offset, length)` runs in
    /// bytes, in disk order, the last one cut at the disk's end.
    pub fn dirty_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let blocks = blocks_of(self.header.size_bytes);
        let size = self.header.size_bytes;
        let mut block = 0u64;
        std::iter::from_fn(move || {
            let start = self.next_block(block, blocks, true)?;
            let end = self.next_block(start, blocks, false).unwrap_or(blocks);
            block = end;
            let off = start * GRANULARITY;
            Some((off, (end * GRANULARITY).min(size) - off))
        })
    }

    /// The first block at or after `from` whose bit is `set`, skipping
    /// whole bytes that cannot hold it.
    fn next_block(&self, from: u64, blocks: u64, set: bool) -> Option<u64> {
        let skip = if set { 0x00 } else { 0xff };
        let mut b = from;
        while b < blocks {
            if b % 64 == 0 && b + 64 <= blocks {
                let word = &self.bits[(b / 8) as usize..(b / 8) as usize + 8];
                if word.iter().all(|&x| x == skip) {
                    b += 64;
                    continue;
                }
            }
            if b % 8 == 0 && self.bits[(b / 8) as usize] == skip {
                b += 8;
                continue;
            }
            if self.bit(b) == set {
                return Some(b);
            }
            b += 1;
        }
        None
    }

    /// Bytes of the disk the dirty bits cover.
    pub fn dirty_bytes(&self) -> u64 {
        let blocks = blocks_of(self.header.size_bytes);
        let mut bytes = self.dirty_blocks * GRANULARITY;
        if blocks > 0 && self.bit(blocks - 1) {
            bytes -= blocks * GRANULARITY - self.header.size_bytes;
        }
        bytes
    }

    /// Changes the disk size. Growing extends the (sparse) bitmap area
    /// before the header says the new size; shrinking writes the header
    /// first, then drops the bits beyond the end and truncates. A crash in
    /// between leaves a file longer than needed, which load accepts.
    pub fn resize(&mut self, new_size: u64) -> io::Result<()> {
        let mut next = self.header.clone();
        next.size_bytes = new_size;
        check_header(&next)?;
        let len = bitmap_len(new_size);
        if new_size >= self.header.size_bytes {
            if len > self.bits.len() {
                self.file.set_len(BITMAP_AT + len as u64)?;
                self.file.sync_data()?;
                self.bits.resize(len, 0);
            }
            return self.write_header(next);
        }
        self.write_header(next)?;
        self.clear_from_block(blocks_of(new_size));
        self.cleared_pages.retain(|&p| p < len / PAGE);
        self.persist_clears()?;
        self.bits.truncate(len);
        self.file.set_len(BITMAP_AT + len as u64)?;
        self.file.sync_data()
    }
}

/// Reads into `buf` from `at` until it is full or the file ends; the
/// bytes read.
fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Fills `buf` (zeroed) with the file's bytes from `at` on, reading only
/// the allocated extents (SEEK_DATA/SEEK_HOLE): holes are zeros already,
/// and the pages of `buf` never touched stay unallocated in memory too.
fn read_allocated(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    use nix::unistd::{lseek, Whence};
    let end = at + buf.len() as u64;
    let mut pos = at;
    while pos < end {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data after pos.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = lseek(file, data as i64, Whence::SeekHole).map_err(io::Error::from)? as u64;
        let stop = hole.min(end);
        let range = (data - at) as usize..(stop - at) as usize;
        let want = range.len();
        if read_up_to(file, &mut buf[range], data)? < want {
            return Err(invalid("bitmap shorter than its file"));
        }
        pos = stop;
    }
    Ok(())
}

/// An empty folder for a test's files, under NOVACRON_TEST_DIR when set.
#[cfg(test)]
pub(super) fn scratch(tag: &str) -> PathBuf {
    let base = std::env::var_os("NOVACRON_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("novacron-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn dir(tag: &str) -> PathBuf {
        scratch(&format!("meta-{tag}"))
    }

    fn header(size: u64) -> MetaHeader {
        MetaHeader {
            vm: Uuid::from_bytes([7; 16]),
            device: "vda".into(),
            role: DiskRole::Primary,
            epoch: 1,
            generation: 1,
            state: ReplicaState::UpToDate,
            peer_outdated: false,
            size_bytes: size,
        }
    }

    fn ranges(m: &Meta) -> Vec<(u64, u64)> {
        m.dirty_ranges().collect()
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn meta_path_is_beside_the_disk() {
        assert_eq!(meta_path(Path::new("/d/vm/vda.raw")), PathBuf::from("/d/vm/vda.raw.meta"));
    }

    #[test]
    fn header_and_bits_survive_reopen() {
        let d = dir("reopen");
        let p = d.join("vda.raw.meta");
        let mut m = Meta::create(&p, header(64 << 20)).unwrap();
        assert!(m.mark_dirty_durable(&[(0, 512), (8192, 4096), (10 << 20, 1 << 20)]).unwrap());
        // Already set: nothing to write.
        assert!(!m.mark_dirty_durable(&[(512, 512), (10 << 20, 4096)]).unwrap());
        m.set_header(|h| {
            h.epoch = 5;
            h.peer_outdated = true;
            h.state = ReplicaState::Outdated;
        })
        .unwrap();
        let want = vec![(0, 4096), (8192, 4096), (10 << 20, 1 << 20)];
        assert_eq!(ranges(&m), want);
        drop(m);
        let m = Meta::open(&p).unwrap();
        assert_eq!(m.header().epoch, 5);
        assert!(m.header().peer_outdated);
        assert_eq!(m.header().state, ReplicaState::Outdated);
        assert_eq!(ranges(&m), want);
        assert_eq!(m.dirty_bytes(), 2 * 4096 + (1 << 20));
        assert!(Meta::create(&p, header(4096)).is_err(), "create must not replace a meta");
    }

    #[test]
    fn a_torn_slot_leaves_the_other() {
        let d = dir("torn");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 20)).unwrap();
        for epoch in 2..=4 {
            m.set_header(|h| h.epoch = epoch).unwrap();
        }
        // seq 4 (epoch 4) is in slot 0, seq 3 (epoch 3) in slot 1.
        drop(m);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        // Tear slot 0 inside its header bytes (it uses well under 512).
        f.write_all_at(&[0x5a; 16], 40).unwrap();
        assert_eq!(Meta::open(&p).unwrap().header().epoch, 3);
        // A half-written slot: the first bytes of a new header only.
        let mut m = Meta::open(&p).unwrap();
        m.set_header(|h| h.epoch = 9).unwrap(); // seq 4 again, into slot 0
        drop(m);
        let good = Meta::open(&p).unwrap();
        assert_eq!(good.header().epoch, 9);
        drop(good);
        f.write_all_at(&[0; 20], SLOT + 20).unwrap(); // slot 1 (epoch 3): seq and more zeroed
        assert_eq!(Meta::open(&p).unwrap().header().epoch, 9);
        // Both torn: refused, not taken as a fresh disk.
        f.write_all_at(&[0xff; 8], 30).unwrap();
        let e = Meta::open(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("no valid header"), "{e}");
    }

    /// Found by the second planned move of tests/failover.rs: the old
    /// primary's still open value wrote its next header (seq n+1) over the
    /// replica's newer one (n+3, `up_to_date`), which brought back n+2
    /// (`syncing`). A second writer is refused now; readers peek.
    #[test]
    fn one_writer_at_a_time() {
        let d = dir("writer");
        let p = d.join("m");
        let mut first = Meta::create(&p, header(1 << 20)).unwrap();
        let e = Meta::open(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        first.set_header(|h| h.epoch = 7).unwrap();
        assert_eq!(peek(&p).unwrap().epoch, 7, "a reader sees the writer's header");
        drop(first);
        let mut second = Meta::open(&p).unwrap();
        second.set_header(|h| h.epoch = 8).unwrap();
        drop(second);
        assert_eq!(Meta::open(&p).unwrap().header().epoch, 8);
    }

    #[test]
    fn a_crash_between_bitmap_and_header_keeps_the_bits_and_the_old_header() {
        let d = dir("crash");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(16 << 20)).unwrap();
        m.set_header(|h| h.epoch = 2).unwrap(); // seq 2, slot 0
        m.mark_dirty_durable(&[(4 << 20, 8192)]).unwrap();
        // The next header write (seq 3, slot 1) was cut after 40 bytes,
        // in the middle of the header's body.
        let mut next = m.header().clone();
        next.peer_outdated = true;
        next.epoch = 3;
        let slot = encode_slot(&next, 3).unwrap();
        drop(m);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&slot[..40], SLOT).unwrap();
        let m = Meta::open(&p).unwrap();
        assert_eq!(m.header().epoch, 2);
        assert!(!m.header().peer_outdated);
        assert_eq!(ranges(&m), vec![(4 << 20, 8192)]);
        drop(m);
        // The whole slot written: the new header wins.
        f.write_all_at(&slot, SLOT).unwrap();
        let m = Meta::open(&p).unwrap();
        assert_eq!((m.header().epoch, m.header().peer_outdated), (3, true));
    }

    #[test]
    fn clears_are_lazy_and_only_whole_blocks() {
        let d = dir("clear");
        let p = d.join("m");
        // 10 KiB + 512: the last block is partial.
        let size = 10 * 1024 + 512;
        let mut m = Meta::create(&p, header(size)).unwrap();
        m.mark_dirty_durable(&[(0, size)]).unwrap();
        assert_eq!(ranges(&m), vec![(0, size)]);
        assert_eq!(m.dirty_bytes(), size);
        // Half of block 0 and the start of block 1: block 0 stays dirty.
        m.clear(2048, 4096).unwrap();
        assert_eq!(ranges(&m), vec![(0, size)]);
        m.clear(0, 8192).unwrap();
        assert_eq!(ranges(&m), vec![(8192, size - 8192)]);
        // Not persisted: reopen has them all.
        drop(m);
        let mut m = Meta::open(&p).unwrap();
        assert_eq!(ranges(&m), vec![(0, size)]);
        // The disk's partial last block clears with a range to the end.
        m.clear(0, size).unwrap();
        assert_eq!(m.dirty_bytes(), 0);
        m.persist_clears().unwrap();
        drop(m);
        let m = Meta::open(&p).unwrap();
        assert_eq!(ranges(&m), vec![]);
        assert!(m.bitmap_is_zero());
    }

    impl Meta {
        fn bitmap_is_zero(&self) -> bool {
            self.bits.iter().all(|&b| b == 0)
        }
    }

    #[test]
    fn a_mark_writes_over_pending_clears_of_its_page() {
        let d = dir("mixed");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 30)).unwrap();
        m.mark_dirty_durable(&[(0, 8192), (1 << 20, 4096)]).unwrap();
        m.clear(0, 8192).unwrap();
        // Same page: the mark writes the clear too, which is true already.
        m.mark_dirty_durable(&[(2 << 20, 4096)]).unwrap();
        drop(m);
        let m = Meta::open(&p).unwrap();
        assert_eq!(ranges(&m), vec![(1 << 20, 4096), (2 << 20, 4096)]);
    }

    #[test]
    fn dirty_ranges_merge_across_bytes_and_pages() {
        let d = dir("ranges");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 40)).unwrap();
        // Blocks 5..70 (crosses bytes), 1 block at 4 KiB * 32768 * 8 - 1
        // and the next one (the last of page 0 and the first of page 1).
        let page_edge = (PAGE as u64 * 8 - 1) * GRANULARITY;
        m.mark_dirty_durable(&[(5 * 4096, 65 * 4096), (page_edge, 4096), (page_edge + 4096, 512)]).unwrap();
        // Adjacent ranges given separately merge; a range ending mid-block
        // covers the block.
        m.mark_dirty_durable(&[(70 * 4096, 100), (71 * 4096, 4096)]).unwrap();
        let last = (1u64 << 40) - 4096;
        m.mark_dirty_durable(&[(last, 4096)]).unwrap();
        assert_eq!(ranges(&m), vec![(5 * 4096, 67 * 4096), (page_edge, 8192), (last, 4096)]);
        assert_eq!(m.dirty_bytes(), (67 + 2 + 1) * 4096);
        assert!(m.mark_dirty_durable(&[(last, 8192)]).is_err(), "beyond the end");
        assert!(m.mark_dirty_durable(&[(u64::MAX - 10, 100)]).is_err(), "overflow");
    }

    #[test]
    fn marks_of_every_alignment_set_exactly_their_blocks() {
        let d = dir("align");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 20)).unwrap();
        let mut want = std::collections::BTreeSet::new();
        let mut rng = crate::cluster::SeededRng::new(3);
        for _ in 0..200 {
            let first = rng.below(250);
            let n = 1 + rng.below(20).min(255 - first);
            m.mark_dirty_durable(&[(first * GRANULARITY, n * GRANULARITY)]).unwrap();
            want.extend(first..first + n);
            let got: std::collections::BTreeSet<u64> =
                ranges(&m).iter().flat_map(|&(o, l)| o / GRANULARITY..(o + l) / GRANULARITY).collect();
            assert_eq!(got, want);
            assert_eq!(m.dirty_blocks, want.len() as u64);
        }
        // The whole of a 1 TiB disk in one mark: 8192 pages written.
        let mut m = Meta::create(&d.join("big"), header(1 << 40)).unwrap();
        assert!(m.mark_dirty_durable(&[(0, 1 << 40)]).unwrap());
        assert_eq!(ranges(&m), vec![(0, 1 << 40)]);
        assert_eq!(m.dirty_bytes(), 1 << 40);
    }

    #[test]
    fn a_one_tib_disk_gets_a_sparse_meta() {
        let d = dir("sparse");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 40)).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), BITMAP_AT + (32 << 20));
        assert!(md.blocks() * 512 <= 64 << 10, "{} bytes allocated at creation", md.blocks() * 512);
        m.mark_dirty_durable(&[(0, 4096), (1 << 39, 1 << 20), ((1 << 40) - 512, 512)]).unwrap();
        drop(m);
        let md = std::fs::metadata(&p).unwrap();
        assert!(md.blocks() * 512 <= 256 << 10, "{} bytes allocated after 3 marks", md.blocks() * 512);
        let m = Meta::open(&p).unwrap();
        assert_eq!(ranges(&m), vec![(0, 4096), (1 << 39, 1 << 20), ((1 << 40) - 4096, 4096)]);
    }

    #[test]
    fn resize_grows_and_shrinks_the_bitmap() {
        let d = dir("resize");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 20)).unwrap();
        m.mark_dirty_durable(&[(0, 4096), ((1 << 20) - 4096, 4096)]).unwrap();
        m.resize(1 << 30).unwrap();
        m.mark_dirty_durable(&[((1 << 30) - 4096, 4096)]).unwrap();
        drop(m);
        let mut m = Meta::open(&p).unwrap();
        assert_eq!(m.header().size_bytes, 1 << 30);
        assert_eq!(ranges(&m), vec![(0, 4096), ((1 << 20) - 4096, 4096), ((1 << 30) - 4096, 4096)]);
        m.resize(6144).unwrap();
        assert_eq!(ranges(&m), vec![(0, 4096)]);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), BITMAP_AT + PAGE as u64);
        // Growing again does not bring the dropped bits back.
        m.resize(1 << 20).unwrap();
        drop(m);
        let m = Meta::open(&p).unwrap();
        assert_eq!(ranges(&m), vec![(0, 4096)]);
        drop(m);
        assert!(Meta::open(&p).unwrap().resize(1000).is_err(), "not a multiple of 512");
    }

    #[test]
    fn set_header_refuses_a_size_change_and_bad_names() {
        let d = dir("hdr");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 20)).unwrap();
        assert!(m.set_header(|h| h.size_bytes = 1 << 21).is_err());
        assert!(m.set_header(|h| h.device = "x".repeat(MAX_DEVICE_LEN + 1)).is_err());
        assert_eq!(m.header(), &header(1 << 20));
        assert!(Meta::create(&d.join("n"), MetaHeader { size_bytes: 100, ..header(0) }).is_err());
    }

    /// The slot layout is an on-disk format: a change here must come with
    /// a new META_FORMAT (and a reader of the old one).
    #[test]
    fn golden_bytes_of_a_slot() {
        let h = MetaHeader {
            role: DiskRole::Secondary,
            epoch: 3,
            generation: 300,
            state: ReplicaState::Syncing,
            peer_outdated: true,
            ..header(1 << 20)
        };
        let slot = encode_slot(&h, 5).unwrap();
        let want = [
            "4e43444d45544100 01000000 0500000000000000 00100000 1e000000",
            // vm (length 16 + bytes), "vda", Secondary, epoch 3, generation
            // 300, Syncing, peer_outdated, size 1 MiB; then the CRC.
            "10 07070707070707070707070707070707 03766461 01 03 ac02 01 01 808040 750d5db2",
        ]
        .concat()
        .replace(' ', "");
        assert_eq!(hex::encode(&slot[..want.len() / 2]), want);
        assert!(slot[want.len() / 2..].iter().all(|&b| b == 0));
        assert_eq!(slot.len(), SLOT as usize);
        assert_eq!(decode_slot(&slot).unwrap(), (h, 5));
    }

    #[test]
    fn a_failed_mark_is_written_by_the_next_one() {
        let d = dir("retry");
        let p = d.join("m");
        let mut m = Meta::create(&p, header(1 << 20)).unwrap();
        // A read-only handle: the page write fails (EBADF).
        let rw = std::mem::replace(&mut m.file, File::open(&p).unwrap());
        assert!(m.mark_dirty_durable(&[(8192, 4096)]).is_err());
        m.file = rw;
        // The bit is set in memory, but the retry must still write it.
        assert!(m.mark_dirty_durable(&[(8192, 4096)]).unwrap());
        drop(m);
        assert_eq!(ranges(&Meta::open(&p).unwrap()), vec![(8192, 4096)]);
    }
}
