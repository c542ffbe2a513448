//! What the decoder fuzz targets share (included with `#[path]`: the fuzz
//! crate has no library of its own).

use std::fmt::Debug;
use std::path::Path;

/// Writes the seeds into `dir`: each frame as `seed-NAME`, and one buffer
/// of the first `count` of them (the samples, one of each variant) as
/// `seed-v{version}-all`. `variants` are the variant indices of the
/// samples: every one of `0..count` must be there, so a new message variant
/// cannot go unseeded.
pub fn write_seeds(
    dir: &Path,
    mut variants: Vec<usize>,
    count: usize,
    frames: &[(String, Vec<u8>)],
    version: u8,
) {
    variants.sort_unstable();
    assert_eq!(variants, (0..count).collect::<Vec<_>>(), "samples() must hold one message of every variant");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut all = Vec::new();
    for (i, (name, frame)) in frames.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{name}")), frame).unwrap();
        if i < count {
            all.extend(frame);
        }
    }
    std::fs::write(dir.join(format!("seed-v{version}-all")), &all).unwrap();
    eprintln!("wrote {} seeds (wire version {version}) to {}", frames.len() + 1, dir.display());
}

/// Splits frames off `data` until the first error or incomplete frame;
/// each decoded message must survive its own round trip.
pub fn split_all<T: PartialEq + Debug, E: Debug>(
    data: &[u8],
    split: fn(&[u8], usize) -> Result<Option<(T, usize)>, E>,
    encode: fn(&T) -> Vec<u8>,
) {
    // A small limit, so that oversized frames are common inputs.
    let mut rest = data;
    while let Ok(Some((msg, used))) = split(rest, 64 << 10) {
        let again = split(&encode(&msg), usize::MAX).expect("own encoding decodes");
        assert_eq!(again.map(|(m, _)| m).as_ref(), Some(&msg), "round trip differs");
        rest = &rest[used..];
    }
}
