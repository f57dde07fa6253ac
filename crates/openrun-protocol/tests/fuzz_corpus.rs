//! Replays the committed corpus of the `frame_decode` fuzz target (`fuzz/corpus/`) through the
//! same checks the fuzzer runs, so every finding stays fixed without cargo-fuzz or nightly.

use std::path::PathBuf;

/// Runs `check` on every file of `fuzz/corpus/<target>/`, naming the files that fail.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the {target} corpus is missing");
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target} fails on {failed:#?}");
}

#[test]
fn frame_decode_corpus() {
    replay("frame_decode", openrun_protocol::fuzzing::frame_decode);
}
