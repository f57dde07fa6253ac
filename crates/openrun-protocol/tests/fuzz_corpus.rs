//! Replays the committed corpus of the `frame_decode` fuzz target (`fuzz/corpus/`) through the
//! same checks the fuzzer runs, so every finding stays fixed without cargo-fuzz or nightly.

use std::path::PathBuf;

/// Runs `check` on every file of `fuzz/corpus/<target>/`, naming the files that fail.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    openrun_protocol::fuzzing::replay_corpus(&dir, check);
}

#[test]
fn frame_decode_corpus() {
    replay("frame_decode", openrun_protocol::fuzzing::frame_decode);
}
