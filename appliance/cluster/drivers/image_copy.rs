//! The tokio driver of the image copy ([`ImageCopy`]): finds the image
//! contents this node lacks, writes what the peer sends through the upload
//! path (a hidden temporary file in the images folder, hashed as it is
//! written, checked by `qemu-img`, mode 0640, linked into place only once
//! its SHA-256 matches) and serves its own verified files. Runs beside
//! state replication for one peer link, on the link's bulk connection.

use super::replicator::{follow_sender, sleep_until};
use super::NodeCore;
use crate::cluster::frame::Message;
use crate::cluster::imagecopy::{CopyStatus, ImageCopy, Input, Output, Wanted};
use crate::cluster::transport::DataSender;
use crate::images::Upload;
use crate::tasks::Stop;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

/// How often the records are compared with the files.
const SCAN: Duration = Duration::from_secs(2);

/// What `GET /v1/images` and `/metrics` read.
#[derive(Debug, Clone, Default)]
pub struct FileView {
    pub status: CopyStatus,
    /// Contents whose local file exists but has another SHA-256.
    pub bad: HashSet<String>,
}

pub type FilesCell = Arc<std::sync::RwLock<FileView>>;

/// A file's SHA-256 as last computed, keyed by its size and mtime: a file
/// is hashed once per daemon run unless it changes.
type Verified = HashMap<PathBuf, (u64, SystemTime, String)>;

struct Io<C> {
    core: Arc<C>,
    peer: Uuid,
    upload: Option<(String, Upload)>,
    serving: Option<(String, std::fs::File)>,
    /// Verified local files by content.
    present: HashMap<String, PathBuf>,
    verified: Verified,
}

/// Runs the image copy with `peer` over the bulk connection (`data` while
/// it is up, `messages` what came over it) until `done` fires or is
/// dropped (replication with that peer ended), the link stops, or `stop`.
pub async fn run<C: NodeCore>(
    core: Arc<C>,
    peer: Uuid,
    mut data: watch::Receiver<Option<DataSender>>,
    mut messages: tokio::sync::OwnedMutexGuard<mpsc::Receiver<Message>>,
    mut done: tokio::sync::oneshot::Receiver<()>,
    mut stop: Stop,
) {
    let mut m = ImageCopy::new();
    let mut io =
        Io { core, peer, upload: None, serving: None, present: HashMap::new(), verified: HashMap::new() };
    let mut link: Option<DataSender> = None;
    let mut scan = tokio::time::interval(SCAN);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut inputs = Vec::new();
        let wake = m.next_timeout().map(tokio::time::Instant::from_std);
        if link.is_none() {
            if let Some(d) = data.borrow_and_update().clone() {
                link = Some(d);
                inputs.push(Input::LinkUp);
            }
        }
        if inputs.is_empty() {
            // A new connection is seen before a message that came over it:
            // a fetch from a restarted peer must not be dropped as the old
            // connection's serving ends.
            tokio::select! {
                biased;
                _ = stop.wait() => break,
                _ = &mut done => break,
                changed = data.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let (down, up) = follow_sender(&mut link, data.borrow_and_update().clone());
                    inputs.extend(down.then_some(Input::LinkDown).into_iter().chain(up.then_some(Input::LinkUp)));
                }
                msg = messages.recv() => match msg {
                    Some(msg) => inputs.push(Input::Message(msg)),
                    None => break,
                },
                _ = scan.tick() => inputs.push(Input::Wanted(io.scan().await)),
                _ = sleep_until(wake) => inputs.push(Input::Tick),
            }
        }
        let mut queue: std::collections::VecDeque<Input> = inputs.into();
        while let Some(input) = queue.pop_front() {
            for o in m.handle(Instant::now(), input) {
                if let Some(next) = io.carry_out(link.as_ref(), o).await {
                    queue.push_back(next);
                }
            }
        }
        let cell = io.core.image_view();
        let mut view = cell.write().unwrap();
        view.status = m.status();
    }
    io.core.image_view().write().unwrap().status.copying = None;
}

/// SHA-256 of a file, read in 1 MiB blocks.
fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Links `from` to `dest` through a hidden name, then renames it into
/// place: `dest` is either the old file or the whole new one.
fn link_into_place(from: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    let dir = dest.parent().unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(".link-{}", Uuid::new_v4()));
    std::fs::hard_link(from, &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

impl<C: NodeCore> Io<C> {
    /// Compares the image records with the local files: records whose
    /// file is verified, contents wanted from the peer. A content already
    /// here under another record's name is linked, not copied.
    async fn scan(&mut self) -> Vec<Wanted> {
        let records = self.core.image_files();
        let mut missing: Vec<(PathBuf, String, u64)> = Vec::new();
        let mut bad = HashSet::new();
        self.present.clear();
        for r in records {
            let path = r.path.clone();
            let Ok(meta) = std::fs::metadata(&path) else {
                missing.push((path, r.sha256, r.size));
                continue;
            };
            let key = (meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            let sha = match self.verified.get(&path) {
                Some((len, at, sha)) if (*len, *at) == key => sha.clone(),
                _ => {
                    let p = path.clone();
                    match tokio::task::spawn_blocking(move || hash_file(&p)).await {
                        Ok(Ok(sha)) => {
                            self.verified.insert(path.clone(), (key.0, key.1, sha.clone()));
                            sha
                        }
                        _ => String::new(),
                    }
                }
            };
            if sha == r.sha256 {
                self.present.insert(sha, path);
            } else {
                bad.insert(r.sha256.clone());
                missing.push((path, r.sha256, r.size));
            }
        }
        let mut wanted: Vec<Wanted> = Vec::new();
        for (path, sha, size) in missing {
            if let Some(have) = self.present.get(&sha) {
                match link_into_place(have, &path) {
                    Ok(()) => {
                        bad.remove(&sha);
                        tracing::info!(PEER_ID = %self.peer, IMAGE = %path.display(), "image content already here: linked");
                    }
                    Err(e) => tracing::warn!(IMAGE = %path.display(), "linking an image file: {e}"),
                }
            } else if !wanted.iter().any(|w| w.sha256 == sha) {
                wanted.push(Wanted { sha256: sha, size });
            }
        }
        self.core.image_view().write().unwrap().bad = bad;
        wanted
    }

    async fn carry_out(&mut self, link: Option<&DataSender>, o: Output) -> Option<Input> {
        match o {
            Output::Send(msg) => {
                let link = link?;
                let sent = match msg {
                    Message::ImageData { .. } => link.send(&msg).await,
                    _ => link.send_control(&msg),
                };
                if let Err(e) = sent {
                    tracing::debug!(PEER_ID = %self.peer, "image frame not sent: {e}");
                }
                None
            }
            Output::Begin { sha256 } => {
                self.upload = None;
                let dir = self.core.images_dir();
                match Upload::begin(&dir, self.core.max_image_bytes()) {
                    Ok(up) => {
                        tracing::info!(PEER_ID = %self.peer, SHA256 = %sha256, "copying an image file from the peer");
                        self.upload = Some((sha256, up));
                        None
                    }
                    Err(e) => Some(Input::Failed { sha256, error: e.to_string() }),
                }
            }
            Output::Write { sha256, data } => {
                let (_, up) = self.upload.as_mut().filter(|(s, _)| *s == sha256)?;
                match up.write_async(bytes::Bytes::from(data)).await {
                    Ok(()) => None,
                    Err(e) => {
                        self.upload = None;
                        Some(Input::Failed { sha256, error: e.to_string() })
                    }
                }
            }
            Output::Finish { sha256 } => {
                let (_, up) = self.upload.take().filter(|(s, _)| *s == sha256)?;
                let dests: Vec<PathBuf> = self
                    .core
                    .image_files()
                    .into_iter()
                    .filter(|r| r.sha256 == sha256)
                    .map(|r| r.path)
                    .collect();
                let Some(first) = dests.first().cloned() else {
                    return Some(Input::Failed { sha256, error: "no image record names it any more".into() });
                };
                let sha = sha256.clone();
                let done = tokio::task::spawn_blocking(move || {
                    up.finish_replace(&sha, &first)?;
                    for d in &dests[1..] {
                        link_into_place(&first, d)?;
                    }
                    Ok::<_, crate::images::ImageError>(())
                })
                .await;
                match done {
                    Ok(Ok(())) => {
                        tracing::info!(PEER_ID = %self.peer, SHA256 = %sha256, "image file copied from the peer and verified");
                        Some(Input::Finished { sha256 })
                    }
                    Ok(Err(e)) => Some(Input::Failed { sha256, error: e.to_string() }),
                    Err(e) => Some(Input::Failed { sha256, error: e.to_string() }),
                }
            }
            Output::Abort { sha256 } => {
                if self.upload.as_ref().is_some_and(|(s, _)| *s == sha256) {
                    self.upload = None;
                }
                None
            }
            Output::Open { sha256 } => {
                self.serving = None;
                let opened = self.present.get(&sha256).map(std::fs::File::open);
                Some(match opened {
                    Some(Ok(f)) => match f.metadata() {
                        Ok(meta) => {
                            self.serving = Some((sha256.clone(), f));
                            Input::Opened { sha256, size: meta.len() }
                        }
                        Err(e) => Input::OpenFailed { sha256, reason: e.to_string() },
                    },
                    Some(Err(e)) => Input::OpenFailed { sha256, reason: e.to_string() },
                    None => Input::OpenFailed { sha256, reason: "no verified file of that content".into() },
                })
            }
            Output::SendChunk { sha256, offset, len, last } => {
                let (_, f) = self.serving.as_ref().filter(|(s, _)| *s == sha256)?;
                let mut data = vec![0u8; len as usize];
                if let Err(e) = tokio::task::block_in_place(|| f.read_exact_at(&mut data, offset)) {
                    self.serving = None;
                    let reason = format!("reading the file: {e}");
                    if let Some(link) = link {
                        let _ = link.send_control(&Message::ImageUnavailable { sha256, reason });
                    }
                    return None;
                }
                let link = link?;
                let msg = Message::ImageData { sha256, offset, last, data };
                if let Err(e) = link.send(&msg).await {
                    tracing::debug!(PEER_ID = %self.peer, "image frame not sent: {e}");
                }
                None
            }
            Output::Close { sha256 } => {
                if self.serving.as_ref().is_some_and(|(s, _)| *s == sha256) {
                    self.serving = None;
                }
                None
            }
        }
    }
}
