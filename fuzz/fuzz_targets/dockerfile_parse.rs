//! Fuzz target `dockerfile_parse`: the checks live in `openrun_image::fuzzing::dockerfile_parse`, which the corpus replay test
//! runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openrun_image::fuzzing::dockerfile_parse(data);
});
