use super::*;

fn sha(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// A fetcher (`a`) and a server (`b`) joined by a queue each way; files
/// are byte vectors. `run` carries out outputs until both are quiet.
struct Pair {
    a: ImageCopy,
    b: ImageCopy,
    to_a: Vec<Message>,
    to_b: Vec<Message>,
    /// b's files by hash.
    files: HashMap<String, Vec<u8>>,
    /// The content each hash stands for (what a verifies against).
    expected: HashMap<String, Vec<u8>>,
    /// a's temporary file and its finished files.
    tmp: Option<(String, Vec<u8>)>,
    done: HashMap<String, Vec<u8>>,
    /// Most chunks b had sent and a not yet acknowledged.
    max_in_flight: u64,
    aborts: usize,
}

impl Pair {
    fn new(files: &[(String, Vec<u8>)]) -> Pair {
        Pair {
            a: ImageCopy::new(),
            b: ImageCopy::new(),
            to_a: Vec::new(),
            to_b: Vec::new(),
            files: files.iter().cloned().collect(),
            expected: files.iter().cloned().collect(),
            tmp: None,
            done: HashMap::new(),
            max_in_flight: 0,
            aborts: 0,
        }
    }

    fn wanted(&self) -> Vec<Wanted> {
        let mut w: Vec<Wanted> =
            self.files.iter().map(|(s, d)| Wanted { sha256: s.clone(), size: d.len() as u64 }).collect();
        w.sort_by(|x, y| x.sha256.cmp(&y.sha256));
        w
    }

    fn a_do(&mut self, now: Instant, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send(m) => self.to_b.push(m),
                Output::Begin { sha256 } => self.tmp = Some((sha256, Vec::new())),
                Output::Write { sha256, data } => {
                    let t = self.tmp.as_mut().expect("a temporary file");
                    assert_eq!(t.0, sha256);
                    t.1.extend(data);
                }
                Output::Finish { sha256 } => {
                    let (s, data) = self.tmp.take().expect("a temporary file");
                    assert_eq!(s, sha256);
                    let next = if self.expected.get(&s) == Some(&data) {
                        self.done.insert(s.clone(), data);
                        Input::Finished { sha256: s }
                    } else {
                        Input::Failed { sha256: s, error: "checksum mismatch".into() }
                    };
                    let outs = self.a.handle(now, next);
                    self.a_do(now, outs);
                }
                Output::Abort { .. } => {
                    self.tmp = None;
                    self.aborts += 1;
                }
                o => panic!("the fetcher asked {o:?}"),
            }
        }
    }

    fn b_do(&mut self, now: Instant, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send(m) => self.to_a.push(m),
                Output::Open { sha256 } => {
                    let next = match self.files.get(&sha256) {
                        Some(d) => Input::Opened { sha256, size: d.len() as u64 },
                        None => Input::OpenFailed { sha256, reason: "no such file".into() },
                    };
                    let outs = self.b.handle(now, next);
                    self.b_do(now, outs);
                }
                Output::SendChunk { sha256, offset, len, last } => {
                    let d = &self.files[&sha256];
                    let data = d[offset as usize..(offset + len) as usize].to_vec();
                    self.to_a.push(Message::ImageData { sha256, offset, last, data });
                    let in_flight =
                        self.to_a.iter().filter(|m| matches!(m, Message::ImageData { .. })).count();
                    self.max_in_flight = self.max_in_flight.max(in_flight as u64);
                }
                Output::Close { .. } => {}
                o => panic!("the server asked {o:?}"),
            }
        }
    }

    fn up(&mut self, now: Instant) {
        let outs = self.b.handle(now, Input::LinkUp);
        self.b_do(now, outs);
        let w = self.wanted();
        let outs = self.a.handle(now, Input::Wanted(w));
        self.a_do(now, outs);
        let outs = self.a.handle(now, Input::LinkUp);
        self.a_do(now, outs);
    }

    /// Delivers one message each way per round, `rounds` times.
    fn step(&mut self, now: Instant, rounds: usize) {
        for _ in 0..rounds {
            if !self.to_b.is_empty() {
                let m = self.to_b.remove(0);
                let outs = self.b.handle(now, Input::Message(m));
                self.b_do(now, outs);
            }
            if !self.to_a.is_empty() {
                let m = self.to_a.remove(0);
                let outs = self.a.handle(now, Input::Message(m));
                self.a_do(now, outs);
            }
        }
    }

    fn cut(&mut self, now: Instant) {
        self.to_a.clear();
        self.to_b.clear();
        let outs = self.a.handle(now, Input::LinkDown);
        self.a_do(now, outs);
        let outs = self.b.handle(now, Input::LinkDown);
        self.b_do(now, outs);
    }
}

fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn files_are_copied_whole_within_the_window() {
    let now = Instant::now();
    let files = vec![(sha(1), content(5 * CHUNK as usize + 123, 1)), (sha(2), content(10, 2))];
    let mut p = Pair::new(&files);
    p.up(now);
    p.step(now, 200);
    assert_eq!(p.done.len(), 2);
    for (s, d) in &files {
        assert_eq!(&p.done[s], d);
    }
    assert!(p.max_in_flight <= WINDOW, "{} chunks in flight", p.max_in_flight);
    assert_eq!(p.max_in_flight, WINDOW, "the window was used");
    let st = p.a.status();
    assert_eq!((st.files_copied, st.bytes_copied, st.copying), (2, 5 * CHUNK + 133, None));
    assert_eq!(p.aborts, 0);
}

#[test]
fn a_cut_restarts_the_file_from_zero() {
    let now = Instant::now();
    let data = content(8 * CHUNK as usize, 3);
    let mut p = Pair::new(&[(sha(3), data.clone())]);
    p.up(now);
    p.step(now, 5);
    let (_, got, size) = p.a.status().copying.expect("copying");
    assert!(got > 0 && got < size, "{got} of {size}");
    p.cut(now);
    assert_eq!(p.aborts, 1, "the partial file is dropped");
    assert!(p.tmp.is_none());
    assert_eq!(p.a.status().copying, None);
    // Back up: asked again from byte 0, into a new temporary file.
    p.up(now);
    assert_eq!(p.to_b, vec![Message::ImageFetch { sha256: sha(3), offset: 0 }]);
    p.step(now, 200);
    assert_eq!(p.done[&sha(3)], data);
    assert_eq!(p.a.status().bytes_copied, data.len() as u64);
}

#[test]
fn unavailable_content_is_asked_again_later() {
    let now = Instant::now();
    let mut p = Pair::new(&[]);
    p.up(now);
    let outs = p.a.handle(now, Input::Wanted(vec![Wanted { sha256: sha(4), size: 100 }]));
    p.a_do(now, outs);
    p.step(now, 4);
    assert!(p.a.status().last_error.unwrap().contains("cannot send"), "the server said why");
    assert_eq!(p.a.status().copying, None);
    assert_eq!(p.a.next_timeout(), Some(now + RETRY));
    let outs = p.a.handle(now + RETRY / 2, Input::Tick);
    assert!(outs.is_empty(), "not before the retry: {outs:?}");
    p.files.insert(sha(4), content(100, 4));
    p.expected.insert(sha(4), content(100, 4));
    let outs = p.a.handle(now + RETRY, Input::Tick);
    p.a_do(now + RETRY, outs);
    p.step(now + RETRY, 10);
    assert_eq!(p.done[&sha(4)], content(100, 4));
}

#[test]
fn a_stalled_copy_starts_again() {
    let now = Instant::now();
    let mut p = Pair::new(&[(sha(5), content(3 * CHUNK as usize, 5))]);
    p.up(now);
    p.step(now, 1);
    // The server's chunks are lost without a cut (they never arrive).
    p.to_a.clear();
    assert_eq!(p.a.next_timeout(), Some(now + STALL));
    let outs = p.a.handle(now + STALL, Input::Tick);
    assert_eq!(
        outs,
        vec![
            Output::Abort { sha256: sha(5) },
            Output::Begin { sha256: sha(5) },
            Output::Send(Message::ImageFetch { sha256: sha(5), offset: 0 }),
        ]
    );
    p.a_do(now + STALL, outs);
    p.step(now + STALL, 100);
    assert_eq!(p.done[&sha(5)], content(3 * CHUNK as usize, 5));
}

#[test]
fn a_checksum_mismatch_is_retried_and_bad_data_aborts() {
    let now = Instant::now();
    let mut p = Pair::new(&[(sha(6), content(1000, 6))]);
    p.up(now);
    // The record says 1000 bytes, the server's file has other content of
    // that size: the finished file fails to verify.
    let real = p.files.insert(sha(6), content(1000, 7)).unwrap();
    p.step(now, 10);
    assert!(p.done.is_empty());
    assert!(p.a.status().last_error.unwrap().contains("checksum"));
    p.files.insert(sha(6), real.clone());
    let outs = p.a.handle(now + RETRY, Input::Tick);
    p.a_do(now + RETRY, outs);
    p.step(now + RETRY, 10);
    assert_eq!(p.done[&sha(6)], real);

    // Data past the size, or at a gap, drops the file.
    let mut a = ImageCopy::new();
    a.handle(now, Input::Wanted(vec![Wanted { sha256: sha(7), size: 10 }]));
    a.handle(now, Input::LinkUp);
    let data = vec![0; 11];
    let outs =
        a.handle(now, Input::Message(Message::ImageData { sha256: sha(7), offset: 0, last: true, data }));
    assert_eq!(outs, vec![Output::Abort { sha256: sha(7) }]);
    let outs = a.handle(now + RETRY, Input::Tick);
    assert_eq!(outs[0], Output::Begin { sha256: sha(7) });
    let data = vec![0; 5];
    let outs =
        a.handle(now, Input::Message(Message::ImageData { sha256: sha(7), offset: 3, last: false, data }));
    assert_eq!(outs, vec![Output::Abort { sha256: sha(7) }]);
}

#[test]
fn a_content_no_longer_wanted_is_dropped_and_bad_hashes_refused() {
    let now = Instant::now();
    let mut p = Pair::new(&[(sha(8), content(4 * CHUNK as usize, 8))]);
    p.up(now);
    p.step(now, 2);
    let outs = p.a.handle(now, Input::Wanted(Vec::new()));
    assert_eq!(outs, vec![Output::Abort { sha256: sha(8) }]);
    assert_eq!(p.a.next_timeout(), None);

    let mut b = ImageCopy::new();
    b.handle(now, Input::LinkUp);
    let outs = b.handle(now, Input::Message(Message::ImageFetch { sha256: "../etc".into(), offset: 0 }));
    assert!(matches!(&outs[..], [Output::Send(Message::ImageUnavailable { .. })]), "{outs:?}");
}
