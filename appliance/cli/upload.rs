//! `novacron image upload`: hashes the file, then streams it to
//! `PUT /v1/images/{name}` in fixed-size chunks (constant memory whatever
//! the image size), with progress on stderr.

use super::client::{collect, Client, ClientError};
use crate::core::Action;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::StatusCode;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};

const CHUNK: usize = 256 * 1024;

/// A request body reading exactly `remaining` bytes of a file, counting
/// what hyper has taken in `sent` for the progress display.
struct FileBody {
    /// Holds the data back until the daemon says `100 Continue` (or a
    /// second passed): a request it refuses up front (token, name) then gets
    /// its error answer instead of a broken pipe halfway through the file.
    gate: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    file: tokio::fs::File,
    buf: Box<[u8]>,
    remaining: u64,
    sent: Arc<AtomicU64>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        if let Some(gate) = &mut this.gate {
            if gate.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.gate = None;
        }
        let want = (this.buf.len() as u64).min(this.remaining) as usize;
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            // The Content-Length already went out: a file that shrank
            // must fail the upload rather than leave the server waiting.
            Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file became shorter while it was being sent",
            )))),
            Poll::Ready(Ok(())) => {
                let chunk = Bytes::copy_from_slice(rb.filled());
                this.remaining -= chunk.len() as u64;
                this.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Human byte counts: `512 B`, `1.5 MiB`, `2.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

pub fn clock(secs: u64) -> String {
    if secs >= 3600 {
        format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
    } else {
        format!("{}:{:02}", secs / 60, secs % 60)
    }
}

/// One progress line: `what: done / total (pct%)  rate/s  ETA m:ss`. The
/// rate is the average since the start, which is steadier than the last
/// interval's.
pub fn progress_line(what: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let pct = (done as u128 * 100).checked_div(total as u128).unwrap_or(100);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let eta = if done >= total {
        "done".to_string()
    } else if rate >= 1.0 {
        format!("ETA {}", clock(((total - done) as f64 / rate).ceil() as u64))
    } else {
        "ETA --:--".to_string()
    };
    format!(
        "{what}: {} / {} ({pct}%)  {}/s  {eta}",
        human_bytes(done),
        human_bytes(total),
        human_bytes(rate as u64)
    )
}

/// The 10% step `done` has reached, for plain (non-terminal) progress.
pub fn decile(done: u64, total: u64) -> u64 {
    (done.min(total) as u128 * 10).checked_div(total as u128).map_or(10, |d| d as u64)
}

/// Reports `done` (updated by someone else) on stderr until dropped: one
/// rewritten line ~5 times a second on a terminal, a line per 10% step
/// otherwise.
struct Progress {
    task: tokio::task::JoinHandle<()>,
    tty: bool,
}

impl Progress {
    fn start(what: &'static str, done: Arc<AtomicU64>, total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut last_step = 0;
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                if tty {
                    eprint!("\r{}\x1b[K", progress_line(what, d, total, started.elapsed()));
                } else {
                    let step = decile(d, total);
                    // 100% is printed once by `finish`.
                    if step > last_step && step < 10 {
                        last_step = step;
                        eprintln!("{}", progress_line(what, d, total, started.elapsed()));
                    }
                }
                let _ = std::io::stderr().flush();
            }
        });
        Progress { task, tty }
    }

    /// Stops the display, printing the final state once.
    fn finish(self, what: &str, done: u64, total: u64, started: Instant) {
        self.task.abort();
        let line = progress_line(what, done, total, started.elapsed());
        if self.tty {
            eprintln!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    /// Stops the display after a failure, clearing the unfinished line.
    fn abandon(self) {
        self.task.abort();
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// SHA-256 of a file, hex, read in chunks on a blocking thread.
pub async fn sha256_file(path: &Path, total: u64) -> std::io::Result<String> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = Progress::start("checksum", done.clone(), total);
    let path = path.to_path_buf();
    let counter = done.clone();
    let hex = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let count = |n: usize| {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        };
        Ok(crate::util::sha256_file(&path, count)?.1)
    })
    .await
    .map_err(std::io::Error::other)??;
    progress.finish("checksum", done.load(Ordering::Relaxed), total, started);
    Ok(hex)
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}: {1}")]
    File(String, std::io::Error),
    #[error("image {0:?} already exists")]
    Exists(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Uploads `file` as image `name`; returns the daemon's answer.
pub async fn upload(
    c: &Client,
    name: &str,
    file: &Path,
    checksum: bool,
) -> Result<(StatusCode, Bytes), UploadError> {
    let shown = file.display().to_string();
    let f = tokio::fs::File::open(file).await.map_err(|e| UploadError::File(shown.clone(), e))?;
    let meta = f.metadata().await.map_err(|e| UploadError::File(shown.clone(), e))?;
    if !meta.is_file() {
        let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
        return Err(UploadError::File(shown, e));
    }
    let total = meta.len();
    // Refusals the daemon makes while the body is already flowing can reach
    // us only as a broken pipe, so the likely ones (name taken, no access)
    // are asked first, which also spares hashing a large file for nothing.
    let (status, body) = c.call(Action::ImageGet, &[name], "", None).await?;
    if status.is_success() {
        return Err(UploadError::Exists(name.to_string()));
    }
    if status != StatusCode::NOT_FOUND {
        return Ok((status, body));
    }
    let sha = if checksum {
        Some(sha256_file(file, total).await.map_err(|e| UploadError::File(shown.clone(), e))?)
    } else {
        None
    };
    send_file(c, (Action::ImageUpload, &[name], ""), file, sha).await
}

/// Streams `file` as the body of `action`'s request (octet-stream, with
/// `X-Checksum-Sha256: sha` when given) showing progress; returns the
/// daemon's answer.
pub async fn send_file(
    c: &Client,
    (action, params, query): (Action, &[&str], &str),
    file: &Path,
    sha: Option<String>,
) -> Result<(StatusCode, Bytes), UploadError> {
    let shown = file.display().to_string();
    let f = tokio::fs::File::open(file).await.map_err(|e| UploadError::File(shown.clone(), e))?;
    let total = f.metadata().await.map_err(|e| UploadError::File(shown.clone(), e))?.len();
    let sent = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let gate = Box::pin(async move {
        // Servers that ignore Expect still get the data after a moment.
        let _ = tokio::time::timeout(Duration::from_secs(1), go_rx).await;
    });
    let body = FileBody {
        gate: Some(gate),
        file: f,
        buf: vec![0u8; CHUNK].into_boxed_slice(),
        remaining: total,
        sent: sent.clone(),
    };
    let mut req = c
        .builder(action, params, query)
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .header(hyper::header::CONTENT_LENGTH, total)
        .header(hyper::header::EXPECT, "100-continue");
    if let Some(sha) = sha {
        req = req.header("x-checksum-sha256", sha);
    }
    let mut req = req.body(body).map_err(|e| ClientError::Http(e.to_string()))?;
    let go = std::sync::Mutex::new(Some(go_tx));
    hyper::ext::on_informational(&mut req, move |res| {
        if res.status() == StatusCode::CONTINUE {
            if let Some(tx) = go.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(());
            }
        }
    });
    let started = Instant::now();
    let progress = Progress::start("upload", sent.clone(), total);
    let result = match c.send(req, false).await {
        Ok(resp) => collect(resp).await,
        Err(ClientError::Http(e)) => Err(ClientError::Http(format!(
            "{e} (the daemon stopped the upload; `novacron events` shows why)"
        ))),
        Err(e) => Err(e),
    };
    let done = sent.load(Ordering::Relaxed);
    match &result {
        Ok((status, _)) if status.is_success() => progress.finish("upload", done, total, started),
        // The error that follows is what matters: clear the progress line.
        _ => progress.abandon(),
    }
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_humanized() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2 << 30), "2.0 GiB");
    }

    #[test]
    fn progress_lines() {
        let mib = 1 << 20;
        assert_eq!(
            progress_line("upload", 50 * mib, 100 * mib, Duration::from_secs(5)),
            "upload: 50.0 MiB / 100.0 MiB (50%)  10.0 MiB/s  ETA 0:05"
        );
        assert_eq!(
            progress_line("upload", 100 * mib, 100 * mib, Duration::from_secs(10)),
            "upload: 100.0 MiB / 100.0 MiB (100%)  10.0 MiB/s  done"
        );
        assert!(progress_line("upload", 0, 10, Duration::ZERO).ends_with("ETA --:--"));
        assert!(progress_line("upload", 2, 7202, Duration::from_secs(2)).ends_with("ETA 2:00:00"));
        assert!(progress_line("upload", 0, 0, Duration::ZERO).contains("(100%)"));
    }

    #[test]
    fn deciles() {
        assert_eq!(decile(0, 1000), 0);
        assert_eq!(decile(99, 1000), 0);
        assert_eq!(decile(100, 1000), 1);
        assert_eq!(decile(1000, 1000), 10);
        assert_eq!(decile(0, 0), 10);
        assert_eq!(decile(u64::MAX, u64::MAX), 10);
    }
}
