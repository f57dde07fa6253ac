//! Fuzz target `tar_unpack`: the checks live in `openrun_image::fuzzing::tar_unpack`, which the corpus replay test
//! runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openrun_image::fuzzing::tar_unpack(data);
});
