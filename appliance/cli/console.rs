//! `novacron vm console`: the serial console over a WebSocket. The HTTP/1.1
//! upgrade is done by hand on the client's own connection, so it works the
//! same over the Unix socket and over pinned HTTPS.

use super::client::{collect, Client, ClientError};
use super::output;
use crate::core::Action;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::header::{CONNECTION, UPGRADE};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

/// Ctrl-]: leaves the console (as telnet and virsh do).
const ESCAPE: u8 = 0x1d;
/// How long output is still shown after piped input ended.
const GRACE: Duration = Duration::from_secs(1);

/// Puts the terminal on stdin in raw mode; restores it when dropped, which
/// also happens when unwinding from a panic.
struct RawMode(Termios);

impl RawMode {
    fn enter() -> nix::Result<RawMode> {
        let stdin = std::io::stdin();
        let orig = tcgetattr(&stdin)?;
        let mut raw = orig.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawMode(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.0);
    }
}

/// Reads stdin on a plain thread (a blocked read must not keep the tokio
/// runtime from shutting down); the channel closes at EOF.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    });
    rx
}

/// Splits typed input at the escape byte: what to send, and whether the
/// user asked to leave.
pub fn split_escape(chunk: &[u8]) -> (&[u8], bool) {
    match chunk.iter().position(|&b| b == ESCAPE) {
        Some(i) => (&chunk[..i], true),
        None => (chunk, false),
    }
}

enum End {
    Left,
    Closed,
    Failed(String),
}

/// Runs a console session; returns the exit code.
pub async fn run(c: &Client, vm: &str, json: bool) -> i32 {
    let key = generate_key();
    let req = c
        .builder(Action::VmConsole, &[vm], "")
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header("sec-websocket-key", &key)
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("static request parts are valid");
    let resp = match c.send(req, true).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("novacron: {e}");
            return if matches!(e, ClientError::Connect { .. }) { 6 } else { 1 };
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return match collect(resp).await {
            Ok((status, _)) if status.is_success() => {
                eprintln!("novacron: the daemon did not open a console (HTTP {status})");
                1
            }
            Ok((status, body)) => output::print(status, &body, output::Kind::Raw, json),
            Err(e) => {
                eprintln!("novacron: {e}");
                1
            }
        };
    }
    let accept = resp.headers().get("sec-websocket-accept").and_then(|v| v.to_str().ok());
    if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
        eprintln!("novacron: the daemon answered the console upgrade with a wrong Sec-WebSocket-Accept");
        return 1;
    }
    let upgraded = match hyper::upgrade::on(resp).await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("novacron: console upgrade failed: {e}");
            return 1;
        }
    };
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    let tty = std::io::stdin().is_terminal();
    eprintln!("Connected to {vm} (Ctrl-] to leave)");
    let raw = if tty {
        match RawMode::enter() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("novacron: cannot put the terminal in raw mode: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let end = pump(ws, tty).await;
    drop(raw);
    match end {
        End::Left => {
            if tty {
                eprintln!("\nDisconnected from {vm}");
            }
            0
        }
        End::Closed => {
            eprintln!("\nThe console of {vm} was closed");
            0
        }
        End::Failed(e) => {
            eprintln!("\nnovacron: console connection lost: {e}");
            1
        }
    }
}

async fn pump<S>(ws: WebSocketStream<S>, tty: bool) -> End
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut source) = ws.split();
    let mut input = stdin_chunks();
    let mut stdin_open = true;
    // Armed once piped input ends; far in the future until then.
    let grace = tokio::time::sleep(Duration::from_secs(365 * 86_400));
    tokio::pin!(grace);
    let mut grace_armed = false;
    // In raw mode these signals would otherwise kill us with the terminal
    // still raw.
    let (mut term, mut hup) = match (signal(SignalKind::terminate()), signal(SignalKind::hangup())) {
        (Ok(t), Ok(h)) => (t, h),
        (Err(e), _) | (_, Err(e)) => return End::Failed(e.to_string()),
    };
    let mut stdout = std::io::stdout();
    let end = loop {
        tokio::select! {
            chunk = input.recv(), if stdin_open => match chunk {
                Some(chunk) => {
                    // Piped input is data, never an escape.
                    let (data, leave) = if tty { split_escape(&chunk) } else { (&chunk[..], false) };
                    if !data.is_empty() {
                        if let Err(e) = sink.send(Message::Binary(Bytes::copy_from_slice(data))).await {
                            break End::Failed(e.to_string());
                        }
                    }
                    if leave {
                        break End::Left;
                    }
                }
                None if tty => break End::Left,
                None => {
                    stdin_open = false;
                    grace.as_mut().reset(tokio::time::Instant::now() + GRACE);
                    grace_armed = true;
                }
            },
            msg = source.next() => {
                let data = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => Bytes::copy_from_slice(t.as_bytes()),
                    Some(Ok(Message::Close(_))) | None => break End::Closed,
                    Some(Ok(_)) => continue, // ping/pong: answered by tungstenite
                    Some(Err(e)) => break End::Failed(e.to_string()),
                };
                if stdout.write_all(&data).and_then(|()| stdout.flush()).is_err() {
                    break End::Left; // stdout closed (e.g. `| head`)
                }
            },
            _ = &mut grace, if grace_armed => break End::Left,
            _ = term.recv() => break End::Left,
            _ = hup.recv() => break End::Left,
        }
    };
    if matches!(end, End::Left) {
        // A clean closing handshake: send Close, wait briefly for the echo.
        let _ = sink.send(Message::Close(None)).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(Ok(msg)) = source.next().await {
                if msg.is_close() {
                    break;
                }
            }
        })
        .await;
    }
    end
}

#[cfg(test)]
mod tests {
    #[test]
    fn escape_splits_input() {
        assert_eq!(super::split_escape(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(super::split_escape(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(super::split_escape(b"\x1d"), (&b""[..], true));
    }
}
