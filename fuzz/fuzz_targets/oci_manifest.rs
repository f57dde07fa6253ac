//! Fuzz target `oci_manifest`: the checks live in `openrun_image::fuzzing::oci_manifest`, which the corpus replay test
//! runs too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openrun_image::fuzzing::oci_manifest(data);
});
