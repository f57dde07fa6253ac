//! Replays the committed corpus of the `frame_decode` fuzz target (`fuzz/corpus/`) through the
//! same checks the fuzzer runs, so every finding stays fixed without cargo-fuzz or nightly.

use openrun_protocol::fuzzing::replay_corpus;

#[test]
fn frame_decode_corpus() {
    replay_corpus("frame_decode", openrun_protocol::fuzzing::frame_decode);
}
