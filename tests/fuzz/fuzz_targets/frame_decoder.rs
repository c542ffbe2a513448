//! The peer-link frame decoder on arbitrary bytes: splitting frames off a
//! buffer and decoding them must return a message or an error, never panic,
//! and never allocate for a body the length limit refuses. A decoded
//! message must survive its own round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron::cluster::frame::{split, Message};

fuzz_target!(|data: &[u8]| {
    // A small limit, so that oversized frames are common inputs.
    let mut rest = data;
    while let Ok(Some((msg, used))) = split(rest, 64 << 10) {
        let again = split(&msg.encode(), usize::MAX).expect("own encoding decodes");
        assert_eq!(again.map(|(m, _)| m).as_ref(), Some(&msg), "round trip differs");
        rest = &rest[used..];
    }
    let _ = Message::decode(data);
});
