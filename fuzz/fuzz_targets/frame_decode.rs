//! Fuzz target `frame_decode`: the checks live in `openrun_protocol::fuzzing::frame_decode`, which the corpus replay test
//! runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openrun_protocol::fuzzing::frame_decode(data);
});
