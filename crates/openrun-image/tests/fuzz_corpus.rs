//! Replays the committed corpora of the image crate's fuzz targets (`fuzz/corpus/`) through the
//! same checks the fuzzer runs, so every finding stays fixed without cargo-fuzz or nightly.
//! `tar_unpack` needs root (owners, whiteout devices), as the layer tests do.

use openrun_protocol::fuzzing::replay_corpus;

#[test]
fn tar_unpack_corpus() {
    replay_corpus("tar_unpack", openrun_image::fuzzing::tar_unpack);
}

#[test]
fn oci_manifest_corpus() {
    replay_corpus("oci_manifest", openrun_image::fuzzing::oci_manifest);
}

#[test]
fn dockerfile_parse_corpus() {
    replay_corpus("dockerfile_parse", openrun_image::fuzzing::dockerfile_parse);
}
