//! Import of OCI image layouts (a directory or a tar of one) and `docker save` archives.
//!
//! The index (nested indexes and Docker manifest lists included) picks the linux/amd64 image,
//! or the only one; its manifest, config and layers are read as blobs whose sha256 and size
//! must match their descriptors, and every layer's uncompressed tar must hash to the diff id
//! the config lists for it (for `docker save`, whose layers are not content-addressed, that is
//! the check). Layers are tar, tar+gzip or tar+zstd; unknown media types are refused by name.
//! Layers already in the store (same diff id) are not unpacked again. The config's `Env`,
//! `WorkingDir`, `User`, `Entrypoint`, `Cmd` and `Labels` become the image's defaults.
//!
//! Nothing becomes visible until every layer is unpacked and verified: the layers and the
//! record are committed together (see [`Store::commit`]), so a bad archive leaves the store as
//! it was.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use crate::digest::{sha256_hex, sha256_of, Hashing};
use crate::error::{ImageError, IoContext, Result};
use crate::name::ImageRef;
use crate::store::{ImageConfig, ImageRecord, StagedLayer, Store, WorkDir, MAX_LAYERS};

/// Largest JSON document (index, manifest, config) read from an archive.
const MAX_JSON: u64 = 8 << 20;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
    /// Not announced (`docker save`): told by the first bytes.
    Detect,
}

/// The compression of a layer media type, or `None` for a type this importer does not know.
fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// Progress of an import, for a progress bar.
pub trait ImportProgress {
    /// Layer `index` (from 0) of `count` starts: `size` bytes of blob to read.
    fn layer_started(&mut self, _index: usize, _count: usize, _digest: &str, _size: u64) {}
    /// `read` bytes of the current layer's blob have been read.
    fn layer_progress(&mut self, _read: u64) {}
    /// The current layer is done (`reused`: it was already in the store).
    fn layer_finished(&mut self, _reused: bool) {}
}

impl ImportProgress for () {}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The image recorded.
    pub image: ImageRef,
    /// Its record.
    pub record: ImageRecord,
    /// `oci` or `docker-archive`.
    pub format: &'static str,
    /// Layers unpacked by this import.
    pub layers_added: usize,
    /// Layers that were already in the store.
    pub layers_reused: usize,
}

/// Imports the image at `path` (an OCI layout directory, a tar of one, or a `docker save`
/// archive, the tars possibly gzip- or zstd-compressed) into `store` as `image`.
pub fn import(
    store: &Store,
    path: &Path,
    image: &ImageRef,
    progress: &mut dyn ImportProgress,
) -> Result<ImportReport> {
    if image.is_host() {
        return Err(ImageError::InvalidName {
            name: image.to_string(),
            reason: "\"host\" is the built-in image".into(),
        });
    }
    let source = Source::open(store, path)?;
    let (format, plan) = plan(&source, &path.display().to_string())?;
    let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let origin = format!("{format}:{}", shown.display());
    let record = ImageRecord {
        layers: plan.layers.iter().map(|l| l.diff_id.clone()).collect(),
        config: plan.config,
        created_at: crate::store::now(),
        source: origin.clone(),
        parent: None,
        base: None,
    };
    let count = plan.layers.len();
    let mut staged: Vec<StagedLayer> = Vec::new();
    let mut reused = 0;
    for (index, layer) in plan.layers.iter().enumerate() {
        progress.layer_started(index, count, &layer.diff_id, layer.size.unwrap_or(0));
        if store.has_layer(&layer.diff_id) || staged.iter().any(|s| s.digest == layer.diff_id) {
            reused += 1;
            progress.layer_finished(true);
            continue;
        }
        staged.push(stage_layer(store, &source, layer, &origin, progress)?);
        progress.layer_finished(false);
    }
    let added = staged.len();
    // A layer found in the store may be pruned before the commit takes the lock: unpack
    // whatever went missing and try again.
    let mut attempts = 0;
    loop {
        match store.commit(std::mem::take(&mut staged), Some((image, &record))) {
            Ok(()) => break,
            Err(ImageError::MissingLayers(missing)) if attempts < 3 => {
                attempts += 1;
                for layer in plan.layers.iter().filter(|l| missing.contains(&l.diff_id)) {
                    staged.push(stage_layer(store, &source, layer, &origin, &mut ())?);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ImportReport {
        image: image.clone(),
        record,
        format,
        layers_added: added,
        layers_reused: reused,
    })
}

/// One layer to import.
#[derive(Debug)]
pub(crate) struct LayerPlan {
    /// "layer 2 of 5" (for errors).
    pub(crate) what: String,
    /// Path of its blob in the source.
    pub(crate) blob: String,
    /// The blob's sha256 and size, when the format gives them (OCI).
    pub(crate) digest: Option<String>,
    pub(crate) size: Option<u64>,
    pub(crate) compression: Compression,
    /// sha256 of its uncompressed tar, from the config.
    pub(crate) diff_id: String,
}

/// What an archive holds: the layers to import and the defaults.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) layers: Vec<LayerPlan>,
    pub(crate) config: ImageConfig,
}

/// Tells the format of `source` (`shown` names it in errors) and reads its plan.
pub(crate) fn plan(source: &Source, shown: &str) -> Result<(&'static str, Plan)> {
    if source.exists("index.json") && source.exists("oci-layout") {
        Ok(("oci", plan_oci(source)?))
    } else if source.exists("manifest.json") {
        Ok(("docker-archive", plan_docker(source)?))
    } else {
        Err(ImageError::Invalid(format!(
            "{shown} is neither an OCI image layout (index.json and oci-layout) nor a docker save archive (manifest.json)"
        )))
    }
}

fn stage_layer(
    store: &Store,
    source: &Source,
    layer: &LayerPlan,
    origin: &str,
    progress: &mut dyn ImportProgress,
) -> Result<StagedLayer> {
    let reader = source.open_file(&layer.blob, &layer.what)?;
    let counting = Counting {
        inner: reader,
        read: 0,
        reported: 0,
        progress,
    };
    let mut blob = Hashing::new(counting);
    let staged = {
        let decompressed = decompress(&mut blob, layer.compression, &layer.what)?;
        store.stage_tar(decompressed, origin, &layer.what)?
    };
    blob.drain()
        .map_err(|e| ImageError::corrupt(&layer.what, e))?;
    let (blob_hex, blob_size) = blob.finish();
    if let Some(expected) = &layer.digest {
        if &blob_hex != expected {
            return Err(ImageError::DigestMismatch {
                what: layer.what.clone(),
                expected: format!("sha256:{expected}"),
                actual: format!("sha256:{blob_hex}"),
            });
        }
    }
    if let Some(size) = layer.size {
        if size != blob_size {
            return Err(ImageError::corrupt(
                &layer.what,
                format!("the descriptor says {size} bytes, the blob has {blob_size}"),
            ));
        }
    }
    if staged.digest != layer.diff_id {
        return Err(ImageError::DigestMismatch {
            what: format!("the uncompressed tar (diff id) of {}", layer.what),
            expected: format!("sha256:{}", layer.diff_id),
            actual: format!("sha256:{}", staged.digest),
        });
    }
    Ok(staged)
}

/// Reports bytes read to the progress sink (every 256 KiB and at the end).
struct Counting<'a, R> {
    inner: R,
    read: u64,
    reported: u64,
    progress: &'a mut dyn ImportProgress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if n == 0 || self.read - self.reported >= 256 << 10 {
            self.progress.layer_progress(self.read);
            self.reported = self.read;
        }
        Ok(n)
    }
}

/// A reader of the decompressed stream.
pub(crate) fn decompress<'a>(
    reader: impl Read + 'a,
    compression: Compression,
    what: &str,
) -> Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let compression = match compression {
        Compression::Detect => {
            let head = reader
                .fill_buf()
                .map_err(|e| ImageError::corrupt(what, e))?;
            if head.starts_with(&[0x1f, 0x8b]) {
                Compression::Gzip
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Compression::Zstd
            } else {
                Compression::None
            }
        }
        other => other,
    };
    Ok(match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(Zstd {
            source: reader,
            decoder: FrameDecoder::new(),
            in_frame: false,
        }),
        _ => Box::new(reader),
    })
}

/// A zstd stream of any number of frames (skippable ones skipped): ruzstd's streaming decoder
/// reads one frame.
struct Zstd<R: BufRead> {
    source: R,
    decoder: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> Read for Zstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.decoder.can_collect() < buf.len() && !self.decoder.is_finished() {
                    let wanted = buf.len() - self.decoder.can_collect();
                    self.decoder
                        .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(wanted))
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                let n = self.decoder.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if !self.decoder.is_finished() {
                    continue;
                }
                self.in_frame = false;
            }
            if self.source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.source).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "truncated skippable zstd frame",
                        ));
                    }
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ImageJson {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, serde::Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::corrupt(what, e))
}

/// The architecture name OCI uses for this host.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// Reads a blob named by `desc`, checking its size and sha256.
fn read_blob(source: &Source, desc: &Descriptor, what: &str) -> Result<Vec<u8>> {
    let hex = sha256_hex(&desc.digest, what)?;
    let size = u64::try_from(desc.size)
        .map_err(|_| ImageError::Invalid(format!("{what} has a negative size")))?;
    if size > MAX_JSON {
        return Err(ImageError::Invalid(format!(
            "{what} is {size} bytes; at most {MAX_JSON} are accepted"
        )));
    }
    let bytes = source.read_small(&format!("blobs/sha256/{hex}"), what)?;
    let actual = sha256_of(&bytes);
    if actual != hex {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: desc.digest.clone(),
            actual: format!("sha256:{actual}"),
        });
    }
    if bytes.len() as u64 != size {
        return Err(ImageError::corrupt(
            what,
            format!(
                "the descriptor says {size} bytes, the blob has {}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Follows indexes from `index.json` down to one image manifest.
fn pick_manifest(source: &Source, index: &Index, what: &str, depth: usize) -> Result<Descriptor> {
    if depth > 4 {
        return Err(ImageError::Invalid(format!(
            "{what}: indexes nested too deep"
        )));
    }
    let ours = host_architecture();
    let matches = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == ours)
    };
    let explicit: Vec<&Descriptor> = index.manifests.iter().filter(matches).collect();
    let chosen = match (index.manifests.as_slice(), explicit.as_slice()) {
        ([], _) => return Err(ImageError::Invalid(format!("{what} lists no manifest"))),
        ([only], _) => only,
        (_, [one]) => *one,
        (all, []) => {
            let platforms: Vec<String> = all
                .iter()
                .map(|d| match &d.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => "unspecified".to_string(),
                })
                .collect();
            return Err(ImageError::Invalid(format!(
                "{what} holds {} images and none for linux/{ours} (platforms: {})",
                all.len(),
                platforms.join(", ")
            )));
        }
        (_, several) => {
            return Err(ImageError::Invalid(format!(
                "{what} holds {} linux/{ours} images; import an archive with one",
                several.len()
            )))
        }
    };
    match chosen.media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(chosen.clone()),
        OCI_INDEX | DOCKER_LIST => {
            let nested_what = format!("index {}", chosen.digest);
            let bytes = read_blob(source, chosen, &nested_what)?;
            let nested: Index = parse_json(&bytes, &nested_what)?;
            pick_manifest(source, &nested, &nested_what, depth + 1)
        }
        "" => Err(ImageError::Invalid(format!(
            "{what}: the manifest {} has no media type",
            chosen.digest
        ))),
        other => Err(ImageError::UnsupportedMediaType {
            media_type: other.to_string(),
            what: format!("manifest {}", chosen.digest),
        }),
    }
}

fn plan_oci(source: &Source) -> Result<Plan> {
    let layout: serde_json::Value = parse_json(
        &source.read_small("oci-layout", "oci-layout")?,
        "oci-layout",
    )?;
    match layout.get("imageLayoutVersion").and_then(|v| v.as_str()) {
        Some(v) if v.starts_with("1.") => {}
        other => {
            return Err(ImageError::Invalid(format!(
                "unsupported OCI layout version {other:?} (expected 1.x)"
            )))
        }
    }
    let index: Index = parse_json(
        &source.read_small("index.json", "index.json")?,
        "index.json",
    )?;
    if let Some(t) = index.media_type.as_deref() {
        if t != OCI_INDEX {
            return Err(ImageError::UnsupportedMediaType {
                media_type: t.to_string(),
                what: "index.json".into(),
            });
        }
    }
    let desc = pick_manifest(source, &index, "index.json", 0)?;
    let what = format!("manifest {}", desc.digest);
    let manifest: Manifest = parse_json(&read_blob(source, &desc, &what)?, &what)?;
    if let Some(t) = manifest.media_type.as_deref() {
        if t != desc.media_type {
            return Err(ImageError::Invalid(format!(
                "{what} says it is {t} but its descriptor says {}",
                desc.media_type
            )));
        }
    }
    let config_what = format!("config {}", manifest.config.digest);
    if !CONFIG_TYPES.contains(&manifest.config.media_type.as_str()) {
        return Err(ImageError::UnsupportedMediaType {
            media_type: manifest.config.media_type.clone(),
            what: config_what,
        });
    }
    let image: ImageJson = parse_json(
        &read_blob(source, &manifest.config, &config_what)?,
        &config_what,
    )?;
    let (diff_ids, config) = image_defaults(image, manifest.layers.len(), &config_what)?;
    let count = manifest.layers.len();
    let mut layers = Vec::with_capacity(count);
    for (i, (desc, diff_id)) in manifest.layers.iter().zip(diff_ids).enumerate() {
        let what = format!("layer {} of {count} ({})", i + 1, desc.digest);
        let compression = layer_compression(&desc.media_type).ok_or_else(|| {
            ImageError::UnsupportedMediaType {
                media_type: desc.media_type.clone(),
                what: what.clone(),
            }
        })?;
        let hex = sha256_hex(&desc.digest, &what)?.to_string();
        layers.push(LayerPlan {
            blob: format!("blobs/sha256/{hex}"),
            digest: Some(hex),
            size: Some(
                u64::try_from(desc.size)
                    .map_err(|_| ImageError::Invalid(format!("{what} has a negative size")))?,
            ),
            compression,
            diff_id,
            what,
        });
    }
    Ok(Plan { layers, config })
}

fn plan_docker(source: &Source) -> Result<Plan> {
    let manifests: Vec<DockerManifest> = parse_json(
        &source.read_small("manifest.json", "manifest.json")?,
        "manifest.json",
    )?;
    let manifest = match manifests.as_slice() {
        [one] => one,
        [] => return Err(ImageError::Invalid("manifest.json lists no image".into())),
        many => {
            return Err(ImageError::Invalid(format!(
                "manifest.json lists {} images; save one image per archive",
                many.len()
            )))
        }
    };
    let config_what = format!("config {}", manifest.config);
    let bytes = source.read_small(&manifest.config, &config_what)?;
    // The config's name is its digest (`<hex>.json`, or `blobs/sha256/<hex>`): check it.
    let file = manifest.config.rsplit('/').next().unwrap_or_default();
    let named = file.strip_suffix(".json").unwrap_or(file);
    if crate::digest::is_hex64(named) {
        let actual = sha256_of(&bytes);
        if actual != named {
            return Err(ImageError::DigestMismatch {
                what: config_what,
                expected: format!("sha256:{named}"),
                actual: format!("sha256:{actual}"),
            });
        }
    }
    let image: ImageJson = parse_json(&bytes, &config_what)?;
    let count = manifest.layers.len();
    let (diff_ids, config) = image_defaults(image, count, &config_what)?;
    let layers = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .enumerate()
        .map(|(i, (blob, diff_id))| LayerPlan {
            what: format!("layer {} of {count} ({blob})", i + 1),
            blob: blob.clone(),
            digest: None,
            size: None,
            compression: Compression::Detect,
            diff_id,
        })
        .collect();
    Ok(Plan { layers, config })
}

/// Checks the config against the layers and the host, and takes its defaults.
fn image_defaults(
    image: ImageJson,
    layers: usize,
    what: &str,
) -> Result<(Vec<String>, ImageConfig)> {
    if let Some(os) = image.os.as_deref().filter(|o| *o != "linux") {
        return Err(ImageError::Invalid(format!(
            "the image is for {os}, not linux"
        )));
    }
    if let Some(arch) = image
        .architecture
        .as_deref()
        .filter(|a| !a.is_empty() && *a != host_architecture())
    {
        return Err(ImageError::Invalid(format!(
            "the image is for {arch}; this host runs {}",
            host_architecture()
        )));
    }
    let rootfs = image
        .rootfs
        .ok_or_else(|| ImageError::corrupt(what, "no rootfs section"))?;
    if rootfs.kind != "layers" {
        return Err(ImageError::corrupt(
            what,
            format!("rootfs type {:?} (expected \"layers\")", rootfs.kind),
        ));
    }
    if layers == 0 {
        return Err(ImageError::Invalid("the image has no layers".into()));
    }
    if layers > MAX_LAYERS {
        return Err(ImageError::Invalid(format!(
            "the image has {layers} layers; at most {MAX_LAYERS} are supported"
        )));
    }
    if rootfs.diff_ids.len() != layers {
        return Err(ImageError::corrupt(
            what,
            format!(
                "it lists {} diff ids for {layers} layers",
                rootfs.diff_ids.len()
            ),
        ));
    }
    let diff_ids = rootfs
        .diff_ids
        .iter()
        .map(|d| sha256_hex(d, "a diff id of the config").map(str::to_string))
        .collect::<Result<Vec<_>>>()?;
    let run = image.config.unwrap_or_default();
    let config = ImageConfig {
        env: run.env.unwrap_or_default(),
        working_dir: run.working_dir.filter(|d| !d.is_empty()),
        user: run.user.filter(|u| !u.is_empty()),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        labels: run.labels.unwrap_or_default(),
    };
    Ok((diff_ids, config))
}

/// `path` inside an archive, normalised (`./x` is `x`, `a/../b` is `b`); `None` when it
/// would leave the archive.
fn normalize(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    (!out.is_empty()).then(|| out.join("/"))
}

/// Where an import reads from: a directory, or a tar file read in place (after
/// decompressing it to a scratch file when it is compressed).
pub(crate) enum Source {
    /// A layout directory, its files opened beneath it (links may not lead out).
    Dir(PathBuf, rustix::fd::OwnedFd),
    Tar {
        file: File,
        entries: HashMap<String, TarEntry>,
        _scratch: Option<WorkDir>,
    },
}

#[derive(Debug, Clone)]
pub(crate) enum TarEntry {
    File {
        offset: u64,
        size: u64,
    },
    /// A symbolic link (target resolved against the entry's directory) or a hard link.
    Alias(String),
}

/// A reader of `len` bytes of `file` from `pos`, without moving any shared cursor.
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside an entry",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Source {
    fn open(store: &Store, path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).context(|| format!("cannot open {}", path.display()))?;
        if meta.is_dir() {
            let fd = rustix::fs::open(
                path,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .context(|| format!("cannot open {}", path.display()))?;
            return Ok(Self::Dir(path.to_path_buf(), fd));
        }
        let mut file = File::open(path).context(|| format!("cannot open {}", path.display()))?;
        let mut head = [0u8; 4];
        let n = file
            .read_at(&mut head, 0)
            .context(|| format!("cannot read {}", path.display()))?;
        let what = path.display().to_string();
        let compression = if head[..n].starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        };
        let mut scratch = None;
        if compression != Compression::None {
            let work = store.work_dir()?;
            let plain = work.path().join("archive.tar");
            let mut out = File::create_new(&plain)
                .context(|| format!("cannot create {}", plain.display()))?;
            let mut decoded = decompress(
                File::open(path).context(|| format!("cannot open {}", path.display()))?,
                compression,
                &what,
            )?;
            copy_decoded(&mut decoded, &mut out, &what)?;
            file = File::open(&plain).context(|| format!("cannot open {}", plain.display()))?;
            scratch = Some(work);
        }
        let entries = index_tar(&file, &what)?;
        Ok(Self::Tar {
            file,
            entries,
            _scratch: scratch,
        })
    }

    /// The uncompressed tar `file` (the fuzz targets' way in, without a store).
    pub(crate) fn tar(file: File, what: &str) -> Result<Self> {
        let entries = index_tar(&file, what)?;
        Ok(Self::Tar {
            file,
            entries,
            _scratch: None,
        })
    }

    /// Whether the archive has a file at `name`.
    fn exists(&self, name: &str) -> bool {
        match self {
            Self::Dir(_, fd) => normalize(name)
                .and_then(|n| open_beneath(fd, &n).ok())
                .and_then(|f| f.metadata().ok())
                .is_some_and(|m| m.is_file()),
            Self::Tar { .. } => self.tar_entry(name).is_some(),
        }
    }

    pub(crate) fn tar_entry(&self, name: &str) -> Option<(u64, u64)> {
        let Self::Tar { entries, .. } = self else {
            return None;
        };
        let mut name = normalize(name)?;
        for _ in 0..16 {
            match entries.get(&name)? {
                TarEntry::File { offset, size } => return Some((*offset, *size)),
                TarEntry::Alias(target) => name = target.clone(),
            }
        }
        None
    }

    /// Opens the file `name` of the archive; `what` names it in errors.
    pub(crate) fn open_file(&self, name: &str, what: &str) -> Result<Box<dyn Read + '_>> {
        let missing = || ImageError::corrupt(what, format!("the archive has no {name}"));
        match self {
            Self::Dir(root, fd) => {
                let rel = normalize(name).ok_or_else(missing)?;
                match open_beneath(fd, &rel) {
                    Ok(f) => Ok(Box::new(f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
                    Err(e) => Err(ImageError::io(
                        format!("cannot open {} in {}", rel, root.display()),
                        e,
                    )),
                }
            }
            Self::Tar { file, .. } => {
                let (offset, size) = self.tar_entry(name).ok_or_else(missing)?;
                Ok(Box::new(At {
                    file,
                    pos: offset,
                    end: offset + size,
                }))
            }
        }
    }

    /// Reads a JSON document (at most [`MAX_JSON`] bytes).
    fn read_small(&self, name: &str, what: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open_file(name, what)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::corrupt(what, e))?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(ImageError::Invalid(format!(
                "{what} is larger than {MAX_JSON} bytes"
            )));
        }
        Ok(bytes)
    }
}

/// Opens the regular file `rel` under the directory `dir` for reading; symbolic links may
/// not lead out of it. Without blocking: a fifo there is refused, not waited on.
fn open_beneath(dir: &rustix::fd::OwnedFd, rel: &str) -> io::Result<File> {
    let fd = rustix::fs::openat2(
        dir,
        rel,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::CLOEXEC
            | rustix::fs::OFlags::NOCTTY
            | rustix::fs::OFlags::NONBLOCK,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_MAGICLINKS,
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(File::from(fd))
}

fn copy_decoded(decoded: &mut dyn Read, out: &mut File, what: &str) -> Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    // A compressed archive may expand a thousandfold: stop before it fills the disk.
    let what_space = format!("decompressing {what}");
    let mut written = 0u64;
    let mut check_at = crate::layer::check_free_space(&*out, &what_space)?;
    loop {
        let n = match decoded.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImageError::corrupt(what, e)),
        };
        io::Write::write_all(out, &buf[..n])
            .context(|| "cannot write a scratch file".to_string())?;
        written += n as u64;
        if written >= check_at {
            check_at = written + crate::layer::check_free_space(&*out, &what_space)?;
        }
    }
}

/// Where each file of the tar `file` is (regular files by offset, links as aliases).
fn index_tar(file: &File, what: &str) -> Result<HashMap<String, TarEntry>> {
    let mut entries = HashMap::new();
    // The tar crate holds long names and PAX records in memory: bounded per entry.
    let budget = std::rc::Rc::new(std::cell::Cell::new(0));
    let mut archive = tar::Archive::new(crate::layer::Budget {
        inner: file,
        left: budget.clone(),
    });
    // Seeking over entry contents: the layers are read later, in place.
    let mut iter = archive
        .entries_with_seek()
        .map_err(|e| ImageError::corrupt(what, e))?;
    loop {
        budget.set(crate::layer::MAX_ENTRY_META);
        let Some(entry) = iter.next() else { break };
        let entry = entry.map_err(|e| ImageError::corrupt(what, e))?;
        let raw = entry.path_bytes();
        let Some(name) = std::str::from_utf8(&raw).ok().and_then(normalize) else {
            continue;
        };
        let kind = entry.header().entry_type();
        let value = if kind.is_file() {
            TarEntry::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry
                .link_name_bytes()
                .and_then(|t| std::str::from_utf8(&t).ok().map(str::to_owned))
            else {
                continue;
            };
            let joined = if kind.is_symlink() {
                match name.rsplit_once('/') {
                    Some((dir, _)) => format!("{dir}/{target}"),
                    None => target,
                }
            } else {
                target
            };
            match normalize(&joined) {
                Some(t) => TarEntry::Alias(t),
                None => continue,
            }
        } else {
            continue;
        };
        entries.insert(name, value);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_normalise_without_escaping() {
        assert_eq!(normalize("./a/b").as_deref(), Some("a/b"));
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("../b"), None);
        assert_eq!(normalize("."), None);
    }

    /// A layout directory with `blobs` stored by digest and `index` as index.json.
    fn layout(blobs: &[Vec<u8>], index: serde_json::Value) -> (tempfile::TempDir, Source) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        for b in blobs {
            std::fs::write(dir.path().join("blobs/sha256").join(sha256_of(b)), b).unwrap();
        }
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("index.json"), index.to_string()).unwrap();
        let fd = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let source = Source::Dir(dir.path().to_path_buf(), fd);
        (dir, source)
    }

    fn desc(media_type: &str, bytes: &[u8], platform: Option<(&str, &str)>) -> serde_json::Value {
        let mut d = serde_json::json!({
            "mediaType": media_type,
            "digest": format!("sha256:{}", sha256_of(bytes)),
            "size": bytes.len(),
        });
        if let Some((os, arch)) = platform {
            d["platform"] = serde_json::json!({"os": os, "architecture": arch});
        }
        d
    }

    /// An image manifest and config for `arch` with one (absent) gzip layer.
    fn image(arch: &str, cmd: &str) -> (Vec<u8>, Vec<u8>) {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": [cmd], "Labels": {"a": "b"}, "Entrypoint": null},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "d".repeat(64))]},
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(CONFIG_TYPES[0], &config, None),
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", "e".repeat(64)), "size": 10}],
        }))
        .unwrap();
        (manifest, config)
    }

    #[test]
    fn indexes_pick_this_hosts_platform() {
        let (arm_m, arm_c) = image("arm64", "arm");
        let (amd_m, amd_c) = image("amd64", "amd");
        let nested = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                desc(OCI_MANIFEST, &arm_m, Some(("linux", "arm64"))),
                desc(OCI_MANIFEST, &amd_m, Some(("linux", "amd64"))),
                desc(OCI_MANIFEST, b"attestation", Some(("unknown", "unknown"))),
            ],
        }))
        .unwrap();
        let blobs = [arm_m.clone(), arm_c, amd_m.clone(), amd_c, nested.clone()];
        // index.json -> a nested index -> the amd64 manifest.
        let (_dir, source) = layout(
            &blobs,
            serde_json::json!({"schemaVersion": 2, "manifests": [desc(OCI_INDEX, &nested, None)]}),
        );
        let plan = plan_oci(&source).unwrap();
        assert_eq!(plan.config.cmd, ["amd"]);
        assert_eq!(plan.config.labels["a"], "b");
        assert!(plan.config.entrypoint.is_empty());
        assert_eq!(plan.layers.len(), 1);
        assert_eq!(plan.layers[0].diff_id, "d".repeat(64));
        assert_eq!(plan.layers[0].compression, Compression::Gzip);

        // Only an arm64 image: refused, naming the platforms.
        let (_dir, source) = layout(
            &blobs,
            serde_json::json!({"schemaVersion": 2, "manifests": [
                desc(OCI_MANIFEST, &arm_m, Some(("linux", "arm64"))),
                desc(OCI_MANIFEST, &arm_m, Some(("linux", "s390x"))),
            ]}),
        );
        let err = plan_oci(&source).unwrap_err().to_string();
        assert!(err.contains("linux/arm64, linux/s390x"), "{err}");
        // The only image is taken whatever it says, and its config must still match the host.
        let (_dir, source) = layout(
            &blobs,
            serde_json::json!({"schemaVersion": 2, "manifests": [desc(OCI_MANIFEST, &arm_m, None)]}),
        );
        let err = plan_oci(&source).unwrap_err().to_string();
        assert!(err.contains("the image is for arm64"), "{err}");
        // A manifest of an unknown media type is refused by name.
        let (_dir, source) = layout(
            &blobs,
            serde_json::json!({"schemaVersion": 2, "manifests": [desc("application/x-other", &amd_m, None)]}),
        );
        let err = plan_oci(&source).unwrap_err().to_string();
        assert!(
            err.contains("unsupported media type \"application/x-other\""),
            "{err}"
        );
    }

    /// A `docker save` archive of one image with one layer holding `file`.
    fn docker_archive(file: &str) -> Vec<u8> {
        let mut layer = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(1);
        layer.append_data(&mut h, file, &b"x"[..]).unwrap();
        let layer = layer.into_inner().unwrap();
        let config = serde_json::to_vec(&serde_json::json!({
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_of(&layer))]},
        }))
        .unwrap();
        let config_name = format!("{}.json", sha256_of(&config));
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": config_name, "Layers": ["l/layer.tar"]}
        ]))
        .unwrap();
        let mut out = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("manifest.json", manifest),
            (config_name.as_str(), config),
            ("l/layer.tar", layer),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            out.append_data(&mut h, name, &data[..]).unwrap();
        }
        out.into_inner().unwrap()
    }

    /// Prunes the store when a layer is found already there: the race an import loses when a
    /// prune removes a layer between its look and its commit.
    struct PruneOnReuse<'a> {
        store: &'a Store,
        runtime: &'a openrun_runtime::Runtime,
        pruned: usize,
    }

    impl ImportProgress for PruneOnReuse<'_> {
        fn layer_finished(&mut self, reused: bool) {
            if reused {
                self.pruned += self.store.prune(self.runtime).unwrap().layers.len();
            }
        }
    }

    #[test]
    fn an_import_whose_found_layer_is_pruned_unpacks_it_again() {
        let data = tempfile::tempdir_in("/tmp").unwrap();
        let store = Store::open(data.path()).unwrap();
        let runtime = openrun_runtime::Runtime::open(data.path()).unwrap();
        let archive = data.path().join("image.tar");
        std::fs::write(&archive, docker_archive("file")).unwrap();
        let first = ImageRef::parse("first").unwrap();
        import(&store, &archive, &first, &mut ()).unwrap();
        store.remove(&first).unwrap();
        let second = ImageRef::parse("second").unwrap();
        let mut racing = PruneOnReuse {
            store: &store,
            runtime: &runtime,
            pruned: 0,
        };
        let report = import(&store, &archive, &second, &mut racing).unwrap();
        assert_eq!(racing.pruned, 1, "the layer was pruned under the import");
        let layer = &report.record.layers[0];
        assert!(store.has_layer(layer), "and is back");
        assert!(store.layer_dir(layer).join("file").is_file());
        assert_eq!(store.get(&second).unwrap().layers, report.record.layers);
    }

    /// A fifo where a blob should be (anyone can make one in a layout directory) is refused
    /// at once; opening it used to wait forever for a writer.
    #[test]
    fn a_fifo_in_a_layout_is_refused_not_waited_on() {
        let (manifest, config) = image("amd64", "x");
        let (dir, source) = layout(
            &[config],
            serde_json::json!({"schemaVersion": 2, "manifests": [desc(OCI_MANIFEST, &manifest, None)]}),
        );
        let blob = dir.path().join("blobs/sha256").join(sha256_of(&manifest));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &blob,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(plan_oci(&source).map(|_| ()).map_err(|e| e.to_string()));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the import returns")
            .unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        // And a fifo named as a layout file does not make the directory a layout.
        std::fs::remove_file(dir.path().join("oci-layout")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("oci-layout"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let fd = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        assert!(!Source::Dir(dir.path().to_path_buf(), fd).exists("oci-layout"));
    }

    /// The outer archive's long names are bounded like a layer's (the tar crate holds them
    /// in memory).
    #[test]
    fn an_archive_with_an_oversized_long_name_is_refused() {
        let mut t = Vec::new();
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(4 << 20);
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        t.extend(std::iter::repeat_n(b'a', 4 << 20));
        let mut h = tar::Header::new_gnu();
        h.set_path("manifest.json").unwrap();
        h.set_size(0);
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        t.extend(std::iter::repeat_n(0u8, 1024));
        let mut f = tempfile::tempfile().unwrap();
        io::Write::write_all(&mut f, &t).unwrap();
        io::Seek::rewind(&mut f).unwrap();
        let err = index_tar(&f, "image.tar").unwrap_err().to_string();
        assert!(err.contains("long names, PAX records"), "{err}");
    }

    #[test]
    fn media_types() {
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+bz2"),
            None
        );
    }

    #[test]
    fn zstd_streams_of_several_frames_and_skippable_ones() {
        let a = ruzstd::encoding::compress_to_vec(
            &b"hello "[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let b = ruzstd::encoding::compress_to_vec(
            &b"world"[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut stream = a;
        // A skippable frame: magic 0x184D2A50, length 3, 3 bytes.
        stream.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        stream.extend_from_slice(&b);
        let mut out = String::new();
        decompress(&stream[..], Compression::Detect, "x")
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
        let mut truncated = stream.clone();
        truncated.truncate(stream.len() - 4);
        let mut sink = Vec::new();
        assert!(decompress(&truncated[..], Compression::Zstd, "x")
            .unwrap()
            .read_to_end(&mut sink)
            .is_err());
    }
}
