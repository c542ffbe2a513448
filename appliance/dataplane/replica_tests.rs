use super::*;
use crate::cluster::SeededRng;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

fn dir(tag: &str) -> PathBuf {
    meta::scratch(&format!("replica-{tag}"))
}

fn vm() -> Uuid {
    Uuid::from_bytes([0xC3; 16])
}

fn disk() -> DiskRef {
    DiskRef { vm: vm(), device: "vda".into() }
}

fn open(path: &Path) -> Replica {
    Replica::open(path, SIZE, vm(), "vda").unwrap()
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

fn hash(path: &Path) -> String {
    crate::util::sha256_file(path, |_| {}).unwrap().1
}

fn hash_of(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Everything durable about a replica: the file's hash, the metadata
/// file's bytes, the undo log's bytes (if any).
fn snapshot(path: &Path) -> (String, Vec<u8>, Option<Vec<u8>>) {
    (hash(path), std::fs::read(meta::meta_path(path)).unwrap(), std::fs::read(undo_path(path)).ok())
}

fn data(seq: u64, offset: u64, data: Vec<u8>) -> DiskMsg {
    DiskMsg::Data { disk: disk(), seq, offset, data }
}

/// A model of the disk next to the replica: each write applied to both.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
}

/// A replica made up to date by a full sync of a few extents, with the
/// model of its content; still attached at epoch 1.
fn up_to_date(path: &Path) -> (Replica, Model) {
    let mut r = open(path);
    assert_eq!(r.attach(1, SIZE, 7).unwrap(), ReplicaState::Inconsistent);
    r.begin_sync(SyncKind::Full).unwrap();
    assert_eq!(r.state(), ReplicaState::Inconsistent);
    let mut model = Model(vec![0; SIZE as usize]);
    let mut seq = 0;
    for (i, off) in [0, MIB, 3 * MIB + 4096].into_iter().enumerate() {
        let d = bytes(i as u64, 256 << 10);
        seq += 1;
        r.write(seq, off, &d).unwrap();
        model.write(off, &d);
    }
    r.end_sync(seq + 1).unwrap();
    assert_eq!(r.state(), ReplicaState::UpToDate);
    (r, model)
}

#[test]
fn a_full_sync_then_streamed_writes_match_the_source() {
    let d = dir("apply");
    let p = d.join("vda.raw");
    // Old content that the full sync must not leave behind: it sends only
    // allocated extents.
    std::fs::write(&p, bytes(99, SIZE as usize)).unwrap();
    let (mut r, mut model) = up_to_date(&p);
    assert_eq!(hash(&p), hash_of(&model.0));
    assert_eq!((r.generation(), r.epoch()), (7, 1));
    assert!(!r.has_undo());
    // Streaming through frames, as the data plane drives it.
    let d1 = bytes(10, 64 << 10);
    let d2 = bytes(11, 512);
    assert_eq!(r.handle(&data(10, 2 * MIB, d1.clone())).unwrap(), None);
    assert_eq!(r.handle(&data(11, 2 * MIB + 512, d2.clone())).unwrap(), None);
    model.write(2 * MIB, &d1);
    model.write(2 * MIB + 512, &d2);
    assert_eq!(r.applied_seq(), Some(11));
    let ack = r.handle(&DiskMsg::Flush { disk: disk(), seq: 12 }).unwrap();
    assert_eq!(ack, Some(DiskMsg::Ack { disk: disk(), seq: 12, durable: true }));
    assert_eq!(r.durable_seq(), Some(12));
    assert_eq!(hash(&p), hash_of(&model.0));
    drop(r);
    let mut r = open(&p);
    assert_eq!((r.state(), r.epoch(), r.generation()), (ReplicaState::UpToDate, 1, 7));
    let attached = r.handle(&DiskMsg::Attach { disk: disk(), epoch: 2, size_bytes: SIZE, generation: 8 });
    let want = DiskMsg::Attached { disk: disk(), state: ReplicaState::UpToDate, generation: 7 };
    assert_eq!(attached.unwrap(), Some(want));
    drop(r);
    assert_eq!(open(&p).epoch(), 2, "a higher epoch is stored durably");
}

#[test]
fn hostile_frames_change_nothing() {
    let d = dir("hostile");
    let p = d.join("vda.raw");
    let (mut r, _) = up_to_date(&p);
    r.attach(5, SIZE, 7).unwrap();
    r.write(1, 0, &bytes(1, 4096)).unwrap();
    r.flush(2).unwrap();
    let before = snapshot(&p);
    let other = DiskRef { vm: Uuid::from_bytes([9; 16]), device: "vda".into() };
    let cases: Vec<(DiskMsg, RejectReason)> = vec![
        (
            DiskMsg::Data { disk: other.clone(), seq: 3, offset: 0, data: vec![1; 512] },
            RejectReason::UnknownDisk,
        ),
        (
            DiskMsg::Data {
                disk: DiskRef { vm: vm(), device: "vdb".into() },
                seq: 3,
                offset: 0,
                data: vec![1; 512],
            },
            RejectReason::UnknownDisk,
        ),
        (
            DiskMsg::Attach { disk: disk(), epoch: 4, size_bytes: 2 * SIZE, generation: 1 },
            RejectReason::StaleEpoch,
        ),
        (
            DiskMsg::Attach { disk: disk(), epoch: 6, size_bytes: 1000, generation: 1 },
            RejectReason::Misaligned,
        ),
        (
            DiskMsg::Attach { disk: disk(), epoch: 6, size_bytes: MAX_DISK_SIZE + 512, generation: 1 },
            RejectReason::OutOfRange,
        ),
        (data(3, SIZE, vec![1; 512]), RejectReason::OutOfRange),
        (data(3, SIZE - 512, vec![1; 1024]), RejectReason::OutOfRange),
        (data(3, u64::MAX - 511, vec![1; 1024]), RejectReason::OutOfRange),
        (data(3, 0, vec![1; MAX_CHUNK + 512]), RejectReason::Oversized),
        (data(3, 100, vec![1; 512]), RejectReason::Misaligned),
        (data(3, 0, vec![1; 700]), RejectReason::Misaligned),
        (data(3, 0, vec![]), RejectReason::Misaligned),
        (data(2, 0, vec![1; 512]), RejectReason::BadOrder),
        (data(1, 0, vec![1; 512]), RejectReason::BadOrder),
        (DiskMsg::Flush { disk: disk(), seq: 2 }, RejectReason::BadOrder),
        (DiskMsg::SyncEnd { disk: disk(), seq: 9 }, RejectReason::BadOrder),
        (DiskMsg::Ack { disk: disk(), seq: 9, durable: true }, RejectReason::BadOrder),
    ];
    for (msg, reason) in cases {
        // Each case on a fresh attachment (a refusal breaks the one it
        // happens in), at the epoch the replica holds, seq 2 done.
        r.attach(5, SIZE, 7).unwrap();
        r.write(2, 0, &bytes(1, 4096)).unwrap();
        let e = r.handle(&msg).unwrap_err();
        assert_eq!(e.reason(), reason, "{} gave {e}", msg.kind());
        match e.rejected(&msg) {
            DiskMsg::Rejected { reason: got, seq, .. } => {
                assert_eq!(got, reason);
                assert_eq!(seq, msg.seq());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(snapshot(&p), before, "{} changed the replica ({e})", msg.kind());
    }
    // Data before Attach (a new process: nothing attached).
    drop(r);
    let mut r = open(&p);
    let e = r.handle(&data(3, 0, vec![1; 512])).unwrap_err();
    assert_eq!(e.reason(), RejectReason::NotAttached);
    assert!(matches!(r.begin_sync(SyncKind::Full), Err(ReplicaError::NotAttached)));
    // An outdated replica takes no data outside a resync.
    r.attach(5, SIZE, 7).unwrap();
    r.mark_outdated().unwrap();
    let before = snapshot(&p);
    let e = r.handle(&data(3, 0, vec![1; 512])).unwrap_err();
    assert!(matches!(&e, ReplicaError::BadOrder(m) if m.contains("outdated")), "{e}");
    assert_eq!(snapshot(&p), before);
    // A delta resync of an inconsistent replica is refused.
    r.attach(5, SIZE, 7).unwrap();
    r.begin_sync(SyncKind::Full).unwrap();
    r.attach(5, SIZE, 7).unwrap();
    let e = r.begin_sync(SyncKind::Delta).unwrap_err();
    assert!(matches!(&e, ReplicaError::BadOrder(m) if m.contains("full sync")), "{e}");
}

#[test]
fn a_refused_frame_breaks_its_attachment() {
    let d = dir("broken");
    let p = d.join("vda.raw");
    let (mut r, _) = up_to_date(&p);
    r.attach(1, SIZE, 7).unwrap();
    r.write(1, 0, &[1; 512]).unwrap();
    assert!(r.write(2, SIZE, &[1; 512]).is_err());
    // A later valid frame is refused too: an ack of seq 3 would claim
    // seq 2 was applied.
    let before = snapshot(&p);
    let e = r.write(3, 512, &[1; 512]).unwrap_err();
    assert!(matches!(&e, ReplicaError::BadOrder(m) if m.contains("attach again")), "{e}");
    assert!(r.flush(4).is_err());
    assert_eq!(snapshot(&p), before);
    assert_eq!(r.applied_seq(), Some(1));
    // A batch with one bad frame applies none of it.
    r.attach(1, SIZE, 7).unwrap();
    let batch = [data(1, 0, vec![2; 512]), data(2, 4096, vec![2; 512]), data(2, 8192, vec![2; 512])];
    assert_eq!(r.apply_batch(&batch).unwrap_err().reason(), RejectReason::BadOrder);
    assert_eq!(snapshot(&p), before);
    // A stale Attach leaves the current attachment working.
    r.attach(3, SIZE, 7).unwrap();
    assert!(r.attach(2, SIZE, 7).is_err());
    r.write(1, 0, &[3; 512]).unwrap();
}

/// Applies a delta resync's data, in batches, as the resync would; the
/// model follows.
fn delta_writes(r: &mut Replica, model: &mut Model, seed: u64, seq: &mut u64) {
    // Overlapping ranges, one written twice, one spanning extents the
    // full sync never wrote.
    let ranges = [(0, 8192), (MIB - 4096, 64 << 10), (4096, 512), (3 * MIB, MIB), (0, 4096)];
    let msgs: Vec<DiskMsg> = ranges
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| {
            *seq += 1;
            data(*seq, off, bytes(seed * 100 + i as u64, len as usize))
        })
        .collect();
    for m in &msgs {
        if let DiskMsg::Data { offset, data, .. } = m {
            model.write(*offset, data);
        }
    }
    r.apply_batch(&msgs[..2]).unwrap();
    r.apply_batch(&msgs[2..]).unwrap();
}

#[test]
fn a_broken_delta_resync_rolls_back_to_the_exact_old_image() {
    let d = dir("rollback");
    let p = d.join("vda.raw");
    let (mut r, model) = up_to_date(&p);
    let old = hash(&p);
    assert_eq!(old, hash_of(&model.0));
    r.attach(2, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    assert_eq!(r.state(), ReplicaState::Syncing);
    let mut new = Model(model.0.clone());
    let mut seq = 0;
    delta_writes(&mut r, &mut new, 1, &mut seq);
    assert_eq!(hash(&p), hash_of(&new.0));
    // The primary dies mid-resync; this node restarts.
    drop(r);
    let mut r = open(&p);
    assert_eq!(r.state(), ReplicaState::Syncing);
    assert!(r.has_undo());
    // The primary comes back and resumes the resync (the undo log goes
    // on), and dies again.
    r.attach(3, SIZE, 9).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    delta_writes(&mut r, &mut new, 2, &mut seq);
    drop(r);
    let mut r = open(&p);
    let before = snapshot(&p);
    assert!(matches!(r.rollback_to_consistent(false), Err(ReplicaError::RollbackNeedsForce)));
    assert_eq!(snapshot(&p), before, "refused without force: nothing changes");
    assert_eq!(r.rollback_to_consistent(true).unwrap(), ReplicaState::Outdated);
    assert_eq!(hash(&p), old, "the pre-resync image, byte for byte");
    assert!(!r.has_undo());
    assert_eq!(r.generation(), 7, "the old image's generation");
    drop(r);
    let mut r = open(&p);
    assert_eq!(r.state(), ReplicaState::Outdated);
    assert!(matches!(
        r.rollback_to_consistent(true),
        Err(ReplicaError::NothingToRollBack(ReplicaState::Outdated))
    ));
    // An outdated replica can take a delta resync again, to the end.
    r.attach(3, SIZE, 9).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    let mut again = Model(model.0.clone());
    let mut seq = 0;
    delta_writes(&mut r, &mut again, 3, &mut seq);
    r.end_sync(seq + 1).unwrap();
    assert_eq!((r.state(), r.generation()), (ReplicaState::UpToDate, 9));
    assert!(!r.has_undo());
    assert_eq!(hash(&p), hash_of(&again.0));
}

#[test]
fn a_broken_full_sync_has_nothing_to_roll_back_to() {
    let d = dir("full");
    let p = d.join("vda.raw");
    let (mut r, _) = up_to_date(&p);
    r.attach(2, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Full).unwrap();
    r.write(1, 0, &bytes(5, 4096)).unwrap();
    drop(r);
    let mut r = open(&p);
    assert_eq!(r.state(), ReplicaState::Inconsistent);
    for force in [false, true] {
        let e = r.rollback_to_consistent(force).unwrap_err();
        assert!(matches!(e, ReplicaError::NoConsistentCopy), "{e}");
        assert!(e.to_string().contains("no older consistent copy"), "{e}");
    }
    assert_eq!(r.state(), ReplicaState::Inconsistent);
    assert_eq!(
        r.mark_outdated().unwrap(),
        ReplicaState::Inconsistent,
        "never outdated: it is not consistent"
    );
}

#[test]
fn the_undo_log_is_durable_before_the_data_is_overwritten() {
    let d = dir("undo");
    let p = d.join("vda.raw");
    let (mut r, model) = up_to_date(&p);
    let old = hash(&p);
    r.attach(2, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    let ranges = [(0u64, 8192usize), (MIB, 4096), (2 * MIB, 64 << 10)];
    let batch: Vec<DiskMsg> = ranges
        .iter()
        .enumerate()
        .map(|(i, &(off, len))| data(i as u64 + 1, off, bytes(50 + i as u64, len)))
        .collect();
    // A crash right after the undo log's fdatasync: no data written yet,
    // and the log holds the old content of the whole batch.
    r.fail_at = Some(Step::UndoSynced);
    assert!(r.apply_batch(&batch).is_err());
    assert_eq!(hash(&p), old);
    let log = File::open(undo_path(&p)).unwrap();
    let records = UndoLog::records(&log, SIZE).unwrap();
    assert_eq!(records.len(), ranges.len());
    for (rec, &(off, len)) in records.iter().zip(&ranges) {
        assert_eq!((rec.offset, rec.len), (off, len));
        let mut saved = vec![0; len];
        log.read_exact_at(&mut saved, rec.at).unwrap();
        assert_eq!(saved, model.0[off as usize..off as usize + len]);
    }
    drop(r);
    // A crash after the first chunk of the next try (a new process; the
    // log grows on): the file is half new, the rollback still exact.
    let mut r = open(&p);
    r.attach(3, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    r.fail_at = Some(Step::FirstChunkWritten);
    assert!(r.apply_batch(&batch).is_err());
    assert_ne!(hash(&p), old);
    drop(r);
    // A torn record at the end of the log (a crash during its write) is
    // ignored: its range was never overwritten.
    let mut torn = 0u64.to_le_bytes().to_vec();
    torn.extend(4096u32.to_le_bytes());
    torn.extend([0x42; 100]);
    let mut log = OpenOptions::new().append(true).open(undo_path(&p)).unwrap();
    std::io::Write::write_all(&mut log, &torn).unwrap();
    drop(log);
    let mut r = open(&p);
    assert_eq!(r.rollback_to_consistent(true).unwrap(), ReplicaState::Outdated);
    assert_eq!(hash(&p), old);
}

#[test]
fn a_crash_inside_end_sync_leaves_syncing_with_undo_or_up_to_date() {
    for step in [Step::EndSyncDataSynced, Step::EndSyncStateWritten] {
        let d = dir(&format!("end-{step:?}"));
        let p = d.join("vda.raw");
        let (mut r, model) = up_to_date(&p);
        let old = hash(&p);
        r.attach(2, SIZE, 8).unwrap();
        r.begin_sync(SyncKind::Delta).unwrap();
        let mut new = Model(model.0.clone());
        let mut seq = 0;
        delta_writes(&mut r, &mut new, 4, &mut seq);
        r.fail_at = Some(step);
        assert!(r.end_sync(seq + 1).is_err());
        drop(r);
        let mut r = open(&p);
        match r.state() {
            ReplicaState::Syncing => {
                assert_eq!(step, Step::EndSyncDataSynced);
                assert!(r.has_undo(), "syncing without its undo log");
                assert_eq!(r.rollback_to_consistent(true).unwrap(), ReplicaState::Outdated);
                assert_eq!(hash(&p), old);
            }
            ReplicaState::UpToDate => {
                assert_eq!(step, Step::EndSyncStateWritten);
                assert!(!r.has_undo(), "open deletes the finished resync's log");
                assert_eq!(r.generation(), 8);
                assert_eq!(hash(&p), hash_of(&new.0));
            }
            other => panic!("{step:?}: {other}"),
        }
    }
}

#[test]
fn leftovers_of_a_crash_are_cleaned_at_open() {
    let d = dir("leftover");
    let p = d.join("vda.raw");
    let (r, _) = up_to_date(&p);
    drop(r);
    // begin_sync(Delta) crashed after creating the log, before Syncing.
    UndoLog::create(&undo_path(&p)).unwrap();
    let r = open(&p);
    assert!(!r.has_undo());
    assert_eq!(r.state(), ReplicaState::UpToDate);
    drop(r);
    // Syncing with no log at all (lost): there is no consistent copy.
    let mut m = Meta::open(&meta::meta_path(&p)).unwrap();
    m.set_header(|h| h.state = ReplicaState::Syncing).unwrap();
    drop(m);
    assert_eq!(open(&p).state(), ReplicaState::Inconsistent);
    // A full sync's zeroing cut between truncate and extend.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(0).unwrap();
    assert_eq!(open(&p).size_bytes(), SIZE);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), SIZE);
    // The same on a consistent replica is a lost file, not a state.
    let mut m = Meta::open(&meta::meta_path(&p)).unwrap();
    m.set_header(|h| h.state = ReplicaState::Outdated).unwrap();
    drop(m);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(4096).unwrap();
    let e = Replica::open(&p, SIZE, vm(), "vda").unwrap_err();
    assert!(matches!(&e, ReplicaError::Mismatch(m) if m.contains("4096 bytes")), "{e}");
}

#[test]
fn open_refuses_another_disks_files_and_a_primary() {
    let d = dir("mismatch");
    let p = d.join("vda.raw");
    drop(open(&p));
    let e = Replica::open(&p, SIZE, vm(), "vdb").unwrap_err();
    assert!(matches!(&e, ReplicaError::Mismatch(m) if m.contains("not vdb")), "{e}");
    let mut m = Meta::open(&meta::meta_path(&p)).unwrap();
    m.set_header(|h| h.role = DiskRole::Primary).unwrap();
    drop(m);
    let e = Replica::open(&p, SIZE, vm(), "vda").unwrap_err();
    assert!(matches!(&e, ReplicaError::Mismatch(m) if m.contains("primary")), "{e}");
}

#[test]
fn attach_resizes_the_replica() {
    let d = dir("resize");
    let p = d.join("vda.raw");
    let (mut r, model) = up_to_date(&p);
    r.attach(1, 2 * SIZE, 7).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * SIZE);
    r.write(1, 2 * SIZE - 512, &[9; 512]).unwrap();
    r.attach(1, MIB, 7).unwrap();
    drop(r);
    let r = open(&p);
    assert_eq!(r.size_bytes(), MIB);
    assert_eq!(hash(&p), hash_of(&model.0[..MIB as usize]));
    drop(r);
    // Not during a broken resync: its log covers the old size.
    let mut r = open(&p);
    r.attach(2, MIB, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    r.write(1, 0, &[1; 512]).unwrap();
    let e = r.attach(3, SIZE, 8).unwrap_err();
    assert!(matches!(&e, ReplicaError::BadOrder(m) if m.contains("resize")), "{e}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), MIB);
}

#[test]
fn a_range_rewritten_during_a_resync_is_saved_once() {
    let d = dir("once");
    let p = d.join("vda.raw");
    let (mut r, _) = up_to_date(&p);
    let old = hash(&p);
    r.attach(2, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    // A guest rewriting the same 8 KiB 50 times, and ranges overlapping
    // it on either side.
    for seq in 1..=50 {
        r.write(seq, MIB, &bytes(seq, 8192)).unwrap();
    }
    let batch = [data(51, MIB - 4096, bytes(51, 16384)), data(52, MIB + 4096, bytes(52, 4096))];
    r.apply_batch(&batch).unwrap();
    let log = File::open(undo_path(&p)).unwrap();
    let records = UndoLog::records(&log, SIZE).unwrap();
    let spans: Vec<(u64, usize)> = records.iter().map(|r| (r.offset, r.len)).collect();
    // 8 KiB once, then only the 4 KiB on each side the first did not cover.
    assert_eq!(spans, vec![(MIB, 8192), (MIB - 4096, 4096), (MIB + 8192, 4096)]);
    drop(r);
    // Resumed, the log's records count as saved.
    let mut r = open(&p);
    r.attach(3, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    r.write(1, MIB - 4096, &bytes(60, 20480)).unwrap();
    r.write(2, MIB + 16384, &bytes(61, 512)).unwrap();
    let records = UndoLog::records(&File::open(undo_path(&p)).unwrap(), SIZE).unwrap();
    let spans: Vec<(u64, usize)> = records.iter().map(|r| (r.offset, r.len)).collect();
    assert_eq!(spans[3..], [(MIB + 12288, 4096), (MIB + 16384, 512)]);
    drop(r);
    let mut r = open(&p);
    r.rollback_to_consistent(true).unwrap();
    assert_eq!(hash(&p), old);
}

#[test]
fn unsaved_parts_of_a_range() {
    let mut log = UndoLog::create(&dir("gaps").join("u")).unwrap();
    log.note_saved(100, 200);
    log.note_saved(300, 400);
    assert_eq!(log.unsaved(0, 500), vec![(0, 100), (200, 300), (400, 500)]);
    assert_eq!(log.unsaved(150, 350), vec![(200, 300)]);
    assert_eq!(log.unsaved(100, 200), vec![]);
    assert_eq!(log.unsaved(120, 130), vec![]);
    assert_eq!(log.unsaved(200, 300), vec![(200, 300)]);
    log.note_saved(200, 300);
    assert_eq!(log.saved.iter().collect::<Vec<_>>(), vec![(&100, &400)]);
    log.note_saved(50, 120);
    log.note_saved(390, 450);
    assert_eq!(log.saved.iter().collect::<Vec<_>>(), vec![(&50, &450)]);
    log.note_saved(500, 600);
    assert_eq!(log.unsaved(0, 700), vec![(0, 50), (450, 500), (600, 700)]);
}

/// Seeded random runs of the protocol with process crashes (drop and
/// reopen) between any two steps, against a model: an up-to-date or
/// outdated replica holds exactly what was applied; a syncing one rolls
/// back to exactly the image from before its delta resync began.
#[test]
fn seeded_runs_with_crashes_keep_the_states_honest() {
    const SMALL: u64 = 256 << 10;
    let d = dir("seeded");
    for seed in 0..150 {
        let p = d.join(format!("r{seed}.raw"));
        let mut rng = SeededRng::new(seed);
        let mut r = Replica::open(&p, SMALL, vm(), "vda").unwrap();
        // What the file holds, and the image a rollback must restore.
        let mut current = vec![0u8; SMALL as usize];
        let mut pre_sync: Option<Vec<u8>> = None;
        let (mut epoch, mut seq) = (1u64, 0u64);
        r.attach(epoch, SMALL, 1).unwrap();
        for step in 0..40 {
            let what = format!("seed {seed} step {step}");
            match rng.below(11) {
                0 | 1 => {
                    let kind = if rng.below(4) == 0 { SyncKind::Full } else { SyncKind::Delta };
                    let state = r.state();
                    match (kind, r.begin_sync(kind)) {
                        (SyncKind::Full, Ok(())) => {
                            current.fill(0);
                            pre_sync = None;
                        }
                        (SyncKind::Delta, Ok(())) => {
                            if state != ReplicaState::Syncing {
                                pre_sync = Some(current.clone());
                            }
                        }
                        (_, Err(e)) => {
                            assert!(
                                matches!(e, ReplicaError::SyncRunning | ReplicaError::BadOrder(_)),
                                "{what}: {e}"
                            );
                            r.attach(epoch, SMALL, 1).unwrap();
                        }
                    }
                }
                2..=5 => {
                    let off = rng.below(SMALL / 512) * 512;
                    let len = (1 + rng.below(32)).min((SMALL - off) / 512) * 512;
                    let data = bytes(rng.next_u64(), len as usize);
                    seq += 1;
                    match r.write(seq, off, &data) {
                        Ok(()) => current[off as usize..(off + len) as usize].copy_from_slice(&data),
                        Err(ReplicaError::BadOrder(_)) => {
                            assert!(r.state() != ReplicaState::UpToDate, "{what}");
                            r.attach(epoch, SMALL, 1).unwrap();
                        }
                        Err(e) => panic!("{what}: {e}"),
                    }
                }
                6 => {
                    seq += 1;
                    if r.end_sync(seq).is_ok() {
                        pre_sync = None;
                        assert_eq!(r.state(), ReplicaState::UpToDate, "{what}");
                    } else {
                        r.attach(epoch, SMALL, 1).unwrap();
                    }
                }
                7 => {
                    seq += 1;
                    r.flush(seq).unwrap();
                }
                8 => {
                    let before = r.state();
                    let after = r.mark_outdated().unwrap();
                    let want = if before == ReplicaState::UpToDate { ReplicaState::Outdated } else { before };
                    assert_eq!(after, want, "{what}");
                }
                _ => {
                    // A crash, then the primary attaches again (sometimes
                    // with a new epoch), or the operator rolls back.
                    drop(r);
                    r = Replica::open(&p, SMALL, vm(), "vda").unwrap();
                    match r.state() {
                        ReplicaState::UpToDate | ReplicaState::Outdated => {
                            assert_eq!(hash(&p), hash_of(&current), "{what}: {}", r.state());
                            assert!(!r.has_undo(), "{what}");
                        }
                        ReplicaState::Syncing => {
                            assert!(r.has_undo(), "{what}");
                            if rng.below(2) == 0 {
                                r.rollback_to_consistent(true).unwrap();
                                current = pre_sync.take().expect("a delta resync began");
                                assert_eq!(hash(&p), hash_of(&current), "{what}: rolled back");
                            }
                        }
                        ReplicaState::Inconsistent => assert!(pre_sync.is_none(), "{what}"),
                    }
                    epoch += rng.below(2);
                    seq = 0;
                    r.attach(epoch, SMALL, 1).unwrap();
                }
            }
        }
        drop(r);
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn a_former_primarys_dirty_blocks_are_kept_until_a_sync_ends() {
    let d = dir("failback");
    let p = d.join("vda.raw");
    let (r, _) = up_to_date(&p);
    drop(r);
    // This node was primary and wrote blocks the peer lacks; it comes back
    // as the secondary (the data plane demotes it in its metadata).
    let mut m = Meta::open(&meta::meta_path(&p)).unwrap();
    m.set_header(|h| h.role = DiskRole::Primary).unwrap();
    m.mark_dirty_durable(&[(MIB, 8192), (2 * MIB, 4096)]).unwrap();
    m.set_header(|h| h.role = DiskRole::Secondary).unwrap();
    drop(m);
    let mut r = open(&p);
    let dirty: Vec<(u64, u64)> = r.meta().dirty_ranges().collect();
    assert_eq!(dirty, vec![(MIB, 8192), (2 * MIB, 4096)]);
    r.attach(2, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    r.write(1, MIB, &bytes(1, 8192)).unwrap();
    r.write(2, 2 * MIB, &bytes(2, 4096)).unwrap();
    assert_eq!(r.meta().dirty_bytes(), 12288, "kept while the resync runs");
    r.end_sync(3).unwrap();
    assert_eq!(r.meta().dirty_bytes(), 0);
    drop(r);
    assert_eq!(open(&p).meta().dirty_bytes(), 0, "the clear is on disk");
}

#[test]
fn promotion_takes_only_what_may_be_promoted() {
    let d = dir("promote");
    // Up to date: promoted without force; the role, epoch and peer mark are durable.
    let p = d.join("vda.raw");
    let (r, model) = up_to_date(&p);
    drop(r);
    assert!(matches!(promote(&p, vm(), "vda", 1, false), Err(ReplicaError::StaleEpoch { .. })));
    let done = promote(&p, vm(), "vda", 2, false).unwrap();
    assert_eq!(done, Promoted { was: ReplicaState::UpToDate, rolled_back: false });
    let h = Meta::open(&meta::meta_path(&p)).unwrap().header().clone();
    assert_eq!(
        (h.role, h.epoch, h.state, h.peer_outdated),
        (DiskRole::Primary, 2, ReplicaState::UpToDate, true)
    );
    assert_eq!(hash(&p), hash_of(&model.0), "the data is untouched");
    // Promoting again is a no-op; a primary is not a replica any more.
    assert_eq!(promote(&p, vm(), "vda", 3, false).unwrap().was, ReplicaState::UpToDate);
    assert!(Replica::open(&p, SIZE, vm(), "vda").is_err());

    // Outdated: only with force.
    let q = d.join("vdb.raw");
    let (mut r, _) = up_to_date(&q);
    r.mark_outdated().unwrap();
    drop(r);
    let before = snapshot(&q);
    assert!(matches!(
        promote(&q, vm(), "vda", 2, false),
        Err(ReplicaError::PromoteNeedsForce(ReplicaState::Outdated))
    ));
    assert_eq!(snapshot(&q), before, "a refused promotion changes nothing");
    assert!(promote(&q, vm(), "vda", 2, true).is_ok());

    // Syncing: with force, rolled back to the pre-resync image first.
    let s = d.join("vdc.raw");
    let (mut r, model) = up_to_date(&s);
    let old = hash(&s);
    r.attach(2, SIZE, 8).unwrap();
    r.begin_sync(SyncKind::Delta).unwrap();
    let mut seq = 0;
    delta_writes(&mut r, &mut Model(model.0.clone()), 1, &mut seq);
    drop(r);
    assert!(matches!(promote(&s, vm(), "vda", 3, false), Err(ReplicaError::PromoteNeedsForce(_))));
    let done = promote(&s, vm(), "vda", 3, true).unwrap();
    assert_eq!(done, Promoted { was: ReplicaState::Syncing, rolled_back: true });
    assert_eq!(hash(&s), old, "the copy from before the resync is what is served");
    assert!(!undo_path(&s).exists());

    // Inconsistent: never, not even with force.
    let i = d.join("vdd.raw");
    let mut r = open(&i);
    r.attach(1, SIZE, 7).unwrap();
    drop(r);
    assert!(matches!(promote(&i, vm(), "vda", 2, true), Err(ReplicaError::NoConsistentCopy)));
}

#[test]
fn demotion_keeps_the_blocks_the_new_primary_overwrites() {
    let d = dir("demote");
    let p = d.join("vda.raw");
    let (r, _) = up_to_date(&p);
    drop(r);
    promote(&p, vm(), "vda", 2, false).unwrap();
    let mut m = Meta::open(&meta::meta_path(&p)).unwrap();
    m.mark_dirty_durable(&[(MIB, 8192)]).unwrap();
    drop(m);
    // Not by an older or equal epoch: this node's primary stands.
    assert!(demote(&p, vm(), "vda", 2).is_err());
    assert_eq!(demote(&p, vm(), "vda", 3).unwrap(), Some(8192));
    assert_eq!(demote(&p, vm(), "vda", 4).unwrap(), None, "already a replica");
    let r = open(&p);
    assert_eq!(r.state(), ReplicaState::Outdated);
    assert_eq!(r.meta().dirty_ranges().collect::<Vec<_>>(), vec![(MIB, 8192)]);
}
