//! Replays the committed corpora of the image crate's fuzz targets (`fuzz/corpus/`) through the
//! same checks the fuzzer runs, so every finding stays fixed without cargo-fuzz or nightly.
//! `tar_unpack` needs root (owners, whiteout devices), as the layer tests do.

use std::path::PathBuf;

/// Runs `check` on every file of `fuzz/corpus/<target>/`, naming the files that fail.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    openrun_protocol::fuzzing::replay_corpus(&dir, check);
}

#[test]
fn tar_unpack_corpus() {
    replay("tar_unpack", openrun_image::fuzzing::tar_unpack);
}

#[test]
fn oci_manifest_corpus() {
    replay("oci_manifest", openrun_image::fuzzing::oci_manifest);
}

#[test]
fn dockerfile_parse_corpus() {
    replay("dockerfile_parse", openrun_image::fuzzing::dockerfile_parse);
}
