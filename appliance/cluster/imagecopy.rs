//! Copying base image files to the peer by content hash, as a plain state
//! machine (inputs and the time in, outputs out, no I/O): the driver
//! (`drivers/image_copy.rs`) reads and writes the files and the link.
//!
//! Each node is both a *fetcher* of the contents it lacks (an image record
//! whose file is missing or has another SHA-256) and a *server* of the
//! contents it holds. One file at a time each way, in chunks of at most
//! [`CHUNK`] bytes, at most [`WINDOW`] chunks unacknowledged: the link's
//! data queue and the peer's received queue stay bounded and state
//! replication's batches still get through. A cut copy restarts from byte
//! 0 (the partial file is dropped): simple, and base images are copied
//! once.

use super::frame::{Message, MAX_BATCH_BYTES};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Largest `ImageData` payload.
pub const CHUNK: u64 = MAX_BATCH_BYTES as u64;
/// Chunks the server sends ahead of the receiver's ack.
pub const WINDOW: u64 = 4;
/// No data for this long while copying: start the file again.
pub const STALL: Duration = Duration::from_secs(30);
/// A content the peer does not have, or that failed to verify, is asked
/// for again after this long.
pub const RETRY: Duration = Duration::from_secs(10);

/// A content this node lacks: its hash and its size (from the record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug)]
pub enum Input {
    LinkUp,
    LinkDown,
    /// Replaces the set of contents this node lacks (in the order to fetch).
    Wanted(Vec<Wanted>),
    /// An image message from the peer (others are ignored).
    Message(Message),
    /// The driver opened the verified file of `sha256` for serving.
    Opened {
        sha256: String,
        size: u64,
    },
    OpenFailed {
        sha256: String,
        reason: String,
    },
    /// The fetched file was verified and linked into place.
    Finished {
        sha256: String,
    },
    /// Writing or verifying the fetched file failed; the partial is gone.
    Failed {
        sha256: String,
        error: String,
    },
    Tick,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Send(Message),
    /// Start a new temporary file for `sha256` (dropping any other).
    Begin {
        sha256: String,
    },
    Write {
        sha256: String,
        data: Vec<u8>,
    },
    /// Verify the temporary file and link it into place; answer
    /// `Finished` or `Failed`.
    Finish {
        sha256: String,
    },
    /// Drop the temporary file.
    Abort {
        sha256: String,
    },
    /// Open the local file of that content; answer `Opened`/`OpenFailed`.
    Open {
        sha256: String,
    },
    /// Read `len` bytes at `offset` of the open file and send them as
    /// `ImageData`.
    SendChunk {
        sha256: String,
        offset: u64,
        len: u64,
        last: bool,
    },
    /// Serving that file ended.
    Close {
        sha256: String,
    },
}

/// What `GET /v1/peer` and `/metrics` show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStatus {
    /// The content being fetched: hash, bytes received, size.
    pub copying: Option<(String, u64, u64)>,
    /// Bytes of files fetched and verified since the daemon started.
    pub bytes_copied: u64,
    pub files_copied: u64,
    pub last_error: Option<String>,
}

struct Fetch {
    sha256: String,
    size: u64,
    received: u64,
    last_progress: Instant,
    finishing: bool,
}

struct Serve {
    sha256: String,
    size: u64,
    next: u64,
    acked: u64,
}

#[derive(Default)]
pub struct ImageCopy {
    up: bool,
    wanted: Vec<Wanted>,
    retry_at: HashMap<String, Instant>,
    fetch: Option<Fetch>,
    /// Asked for, being opened: (hash, offset).
    opening: Option<(String, u64)>,
    serve: Option<Serve>,
    status: CopyStatus,
}

/// 64 lower-case hex digits: the only hashes either side asks for or serves.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl ImageCopy {
    pub fn new() -> ImageCopy {
        ImageCopy::default()
    }

    pub fn status(&self) -> CopyStatus {
        let mut s = self.status.clone();
        s.copying = self.fetch.as_ref().map(|f| (f.sha256.clone(), f.received, f.size));
        s
    }

    /// When to send `Tick`.
    pub fn next_timeout(&self) -> Option<Instant> {
        let stall = self.fetch.as_ref().filter(|f| !f.finishing).map(|f| f.last_progress + STALL);
        let retry = if self.up && self.fetch.is_none() {
            self.wanted.iter().filter_map(|w| self.retry_at.get(&w.sha256)).min().copied()
        } else {
            None
        };
        stall.into_iter().chain(retry).min()
    }

    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::LinkUp => self.up = true,
            Input::LinkDown => {
                self.up = false;
                self.abort(&mut out);
                self.opening = None;
                if let Some(s) = self.serve.take() {
                    out.push(Output::Close { sha256: s.sha256 });
                }
            }
            Input::Wanted(list) => {
                self.wanted = list;
                let gone =
                    self.fetch.as_ref().is_some_and(|f| !self.wanted.iter().any(|w| w.sha256 == f.sha256));
                if gone {
                    self.abort(&mut out);
                }
                self.retry_at.retain(|sha, _| self.wanted.iter().any(|w| &w.sha256 == sha));
            }
            Input::Message(m) => self.message(now, m, &mut out),
            Input::Opened { sha256, size } => {
                if let Some((sha, offset)) = self.opening.take_if(|(s, _)| *s == sha256) {
                    let offset = offset.min(size);
                    let serve = Serve { sha256: sha, size, next: offset, acked: offset };
                    if size == 0 {
                        out.push(Output::SendChunk {
                            sha256: serve.sha256.clone(),
                            offset: 0,
                            len: 0,
                            last: true,
                        });
                    }
                    self.serve = Some(serve);
                    self.pump(&mut out);
                }
            }
            Input::OpenFailed { sha256, reason } => {
                if self.opening.take_if(|(s, _)| *s == sha256).is_some() {
                    out.push(Output::Send(Message::ImageUnavailable { sha256, reason }));
                }
            }
            Input::Finished { sha256 } => {
                if let Some(f) = self.fetch.take_if(|f| f.sha256 == sha256) {
                    self.status.bytes_copied += f.size;
                    self.status.files_copied += 1;
                    self.wanted.retain(|w| w.sha256 != sha256);
                }
            }
            Input::Failed { sha256, error } => {
                if self.fetch.take_if(|f| f.sha256 == sha256).is_some() {
                    self.status.last_error = Some(format!("image {sha256}: {error}"));
                    self.retry_at.insert(sha256, now + RETRY);
                }
            }
            Input::Tick => {
                let stalled =
                    self.fetch.as_ref().is_some_and(|f| !f.finishing && now >= f.last_progress + STALL);
                if stalled {
                    // Start the file again: the chunks in flight are lost.
                    self.status.last_error = Some("no image data for 30 s: copying the file again".into());
                    self.abort(&mut out);
                }
            }
        }
        self.start_next(now, &mut out);
        out
    }

    fn message(&mut self, now: Instant, m: Message, out: &mut Vec<Output>) {
        match m {
            Message::ImageFetch { sha256, offset } => {
                if let Some(s) = self.serve.take() {
                    out.push(Output::Close { sha256: s.sha256 });
                }
                if !valid_sha256(&sha256) {
                    let reason = "not a SHA-256".to_string();
                    out.push(Output::Send(Message::ImageUnavailable { sha256, reason }));
                    return;
                }
                self.opening = Some((sha256.clone(), offset));
                out.push(Output::Open { sha256 });
            }
            Message::ImageAck { sha256, offset } => {
                let Some(s) = self.serve.as_mut().filter(|s| s.sha256 == sha256) else { return };
                if offset > s.acked && offset <= s.next {
                    s.acked = offset;
                }
                if s.acked >= s.size {
                    let s = self.serve.take().expect("serving");
                    out.push(Output::Close { sha256: s.sha256 });
                } else {
                    self.pump(out);
                }
            }
            Message::ImageData { sha256, offset, last, data } => {
                let Some(f) = self.fetch.as_mut().filter(|f| f.sha256 == sha256 && !f.finishing) else {
                    return;
                };
                if offset < f.received {
                    return; // sent again before a restart reached the peer
                }
                let len = data.len() as u64;
                let fits = offset == f.received && len <= CHUNK && f.received + len <= f.size;
                if !fits || (last && f.received + len != f.size) {
                    self.status.last_error = Some(format!(
                        "image {sha256}: unexpected data at {offset} ({len} bytes): copying again"
                    ));
                    self.abort(out);
                    self.retry_at.insert(sha256, now + RETRY);
                    return;
                }
                f.received += len;
                f.last_progress = now;
                let received = f.received;
                out.push(Output::Write { sha256: sha256.clone(), data });
                out.push(Output::Send(Message::ImageAck { sha256: sha256.clone(), offset: received }));
                if last {
                    f.finishing = true;
                    out.push(Output::Finish { sha256 });
                }
            }
            Message::ImageUnavailable { sha256, reason }
                if self.fetch.as_ref().is_some_and(|f| f.sha256 == sha256) =>
            {
                self.status.last_error = Some(format!("the peer cannot send image {sha256}: {reason}"));
                self.abort(out);
                self.retry_at.insert(sha256, now + RETRY);
            }
            _ => {}
        }
    }

    /// Drops the fetch in progress, if any, and its temporary file.
    fn abort(&mut self, out: &mut Vec<Output>) {
        if let Some(f) = self.fetch.take() {
            out.push(Output::Abort { sha256: f.sha256 });
        }
    }

    fn start_next(&mut self, now: Instant, out: &mut Vec<Output>) {
        if !self.up || self.fetch.is_some() {
            return;
        }
        let due = |w: &&Wanted| !self.retry_at.get(&w.sha256).is_some_and(|at| now < *at);
        let Some(w) = self.wanted.iter().find(due).cloned() else { return };
        self.retry_at.remove(&w.sha256);
        out.push(Output::Begin { sha256: w.sha256.clone() });
        out.push(Output::Send(Message::ImageFetch { sha256: w.sha256.clone(), offset: 0 }));
        self.fetch =
            Some(Fetch { sha256: w.sha256, size: w.size, received: 0, last_progress: now, finishing: false });
    }

    /// Sends chunks while the window has room.
    fn pump(&mut self, out: &mut Vec<Output>) {
        let Some(s) = self.serve.as_mut() else { return };
        while s.next < s.size && s.next - s.acked < WINDOW * CHUNK {
            let len = CHUNK.min(s.size - s.next);
            let last = s.next + len == s.size;
            out.push(Output::SendChunk { sha256: s.sha256.clone(), offset: s.next, len, last });
            s.next += len;
        }
    }
}

#[cfg(test)]
#[path = "imagecopy_tests.rs"]
mod tests;
