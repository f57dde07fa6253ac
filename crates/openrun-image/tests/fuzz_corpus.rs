//! Replays the committed corpora of the image crate's fuzz targets (`fuzz/corpus/`) through the
//! same checks the fuzzer runs, so every finding stays fixed without cargo-fuzz or nightly.
//! `tar_unpack` needs root (owners, whiteout devices), as the layer tests do.

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
