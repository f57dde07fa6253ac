//! Snapshots and diffs of live sandboxes.
//!
//! A snapshot freezes a sandbox's writable layer into a new store layer: the sandbox is paused
//! (cgroup freezer) only while its upper directory is copied as it is ([`crate::freeze`]),
//! then resumed; the copy is archived with ids shifted back from the sandbox's host id range
//! into image ids (whiteouts, opaque directories and hard links kept, no link followed:
//! [`Store::stage_dir`]) into a new layer, and an image is recorded whose layers are the sandbox's image layers plus the new one and whose
//! defaults are its image's. Forks are sandboxes created from that image: they share the
//! frozen layers read-only and diverge in their own uppers.
//!
//! Sandboxes on store images and on the built-in `host` image can be snapshotted, with their
//! writable layer on disk. The `host` image's `/usr` is the host's own and is never copied:
//! a host sandbox's uppers (the root's, and the `/usr` mount's as the subtree `usr/`) become
//! one layer whose image records `base: host`, and the runtime stacks it again over the host
//! image's mounts ([`ImageSource::HostLayers`]). A `--rootfs` directory is not in the store
//! and a memory layer exists only inside the sandbox's mount namespace: both are refused
//! naming what to do instead.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openrun_runtime::ids::RANGE_SIZE;
use openrun_runtime::{ImageSource, RuntimeError, Sandbox, SandboxOverlay, SandboxRecord};

use crate::diff::{self, DiffOptions, DiffReport, Overlay};
use crate::error::ImageError;
use crate::layer::IdShift;
use crate::name::ImageRef;
use crate::store::{now, ImageBase, ImageConfig, ImageRecord, Store, MAX_LAYERS};

/// Why a snapshot or a diff of a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The store failed, or a name or image was bad.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The sandbox could not be paused, resumed or found.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The sandbox cannot be snapshotted or compared this way (its image or storage).
    #[error("{0}")]
    Unsupported(String),
    /// The name asked for is taken.
    #[error(
        "image {0} already exists: choose another name, or remove it first (openrun image rm)"
    )]
    Exists(String),
}

impl SnapshotError {
    /// Whether the caller's request is at fault (a 4xx), not the host.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Image(e) => e.is_user_error(),
            Self::Runtime(e) => e.is_user_error(),
            Self::Unsupported(_) | Self::Exists(_) => true,
        }
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// What a snapshot made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The image (`name:tag`).
    pub image: String,
    /// Its layer ids, bottom to top (the last is the new one).
    pub layers: Vec<String>,
    /// Bytes of the new layer (its tar).
    pub bytes: u64,
    /// Time the whole snapshot took, in milliseconds.
    pub duration_ms: u64,
    /// Time the sandbox was paused for the copy, in milliseconds (0 when it was paused
    /// already).
    pub paused_ms: u64,
}

/// Taken while a snapshot picks its name and records its image, so two snapshots of this
/// process never take the same `snap-<id>-<n>`.
static NAMING: Mutex<()> = Mutex::new(());

/// What a sandbox's image is made of: its base (`host` for the built-in image and images on
/// it) and its store layer ids, bottom to top; or why it is not a store image.
pub fn sandbox_layers(
    store: &Store,
    record: &SandboxRecord,
) -> Result<(Option<ImageBase>, Vec<String>)> {
    let (base, lowers) = match record.image_source() {
        ImageSource::Host => return Ok((Some(ImageBase::Host), Vec::new())),
        ImageSource::HostLayers { layers, .. } => (Some(ImageBase::Host), layers),
        ImageSource::Layers { layers, .. } => (None, layers),
        ImageSource::Rootfs(_) => return Err(not_in_store(record)),
    };
    let any_layer = store.layer_dir(&"0".repeat(64));
    let layers_dir = any_layer
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| {
            ImageError::io(
                format!("cannot resolve {}", any_layer.display()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
    let mut out = Vec::with_capacity(lowers.len());
    for lower in &lowers {
        let hex = lower
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|hex| crate::digest::is_hex64(hex));
        let in_store = lower
            .parent()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .is_some_and(|p| p == layers_dir);
        match hex {
            Some(hex) if in_store => out.push(hex.to_string()),
            _ => return Err(not_in_store(record)),
        }
    }
    if out.is_empty() && base.is_none() {
        return Err(SnapshotError::Unsupported(format!(
            "sandbox {} has no image layers",
            record.id
        )));
    }
    Ok((base, out))
}

fn not_in_store(record: &SandboxRecord) -> SnapshotError {
    SnapshotError::Unsupported(format!(
        "sandbox {} runs {}, which is not an image of this store: only sandboxes on store \
         images or the host image can be snapshotted (import the root filesystem as an image \
         first)",
        record.id, record.image
    ))
}

/// The layers a sandbox stacks for an image's: a layer named twice only once, at its topmost
/// place (as the runtime mounts them).
fn stacked(layers: &[String]) -> Vec<&String> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<&String> = layers.iter().rev().filter(|l| seen.insert(*l)).collect();
    out.reverse();
    out
}

/// The defaults of the image a sandbox runs: its image's record when it still names the same
/// layers, else those of any image with these layers, else none but its user.
fn sandbox_config(
    store: &Store,
    record: &SandboxRecord,
    base: Option<ImageBase>,
    layers: &[String],
) -> ImageConfig {
    let runs =
        |image: &ImageRecord| image.base == base && stacked(&image.layers) == stacked(layers);
    if let Ok(r) = ImageRef::parse(&record.image) {
        if let Ok(image) = store.get(&r) {
            if runs(&image) {
                return image.config;
            }
        }
    }
    if let Ok(images) = store.list() {
        if let Some((_, image)) = images.into_iter().find(|(_, i)| runs(i)) {
            return image.config;
        }
    }
    ImageConfig {
        user: record.user.clone(),
        ..ImageConfig::default()
    }
}

/// The first free `snap-<id>-<n>` (n from 1).
fn next_name(store: &Store, id: &str) -> Result<ImageRef> {
    let mut n = 1u64;
    loop {
        let r = ImageRef::parse(&format!("snap-{id}-{n}"))?;
        match store.get(&r) {
            Err(ImageError::NotFound(_)) => return Ok(r),
            Ok(_) => n += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Snapshots `sandbox` into an image named `name` (default `snap-<id>-<n>`). A running
/// sandbox is paused for the copy and resumed; a paused one stays paused.
pub fn snapshot(store: &Store, sandbox: &Sandbox, name: Option<&str>) -> Result<Snapshot> {
    let started = Instant::now();
    let record = sandbox.record();
    let overlays = sandbox.overlays().ok_or_else(|| {
        SnapshotError::Unsupported(format!(
            "sandbox {} keeps its writable layer in memory (openrun run): snapshots need one on \
             disk (openrun create, or --storage disk)",
            record.id
        ))
    })?;
    let (base, mut layers) = sandbox_layers(store, record)?;
    // The new layer adds a lower to every overlay (on the host image: `/` and `/usr`).
    let lowers: usize = overlays.iter().map(|o| o.lowers.len()).sum();
    if layers.len() >= MAX_LAYERS || lowers + overlays.len() > MAX_LAYERS {
        return Err(SnapshotError::Unsupported(format!(
            "sandbox {} already stacks {lowers} image layers, the most a sandbox can: a \
             snapshot would add one more to each of its {} mounts",
            record.id,
            overlays.len()
        )));
    }
    let given = name.map(ImageRef::parse).transpose()?;
    if let Some(r) = &given {
        if r.is_host() {
            return Err(ImageError::InvalidName {
                name: r.to_string(),
                reason: "\"host\" is the built-in image".into(),
            }
            .into());
        }
        if store.get(r).is_ok() {
            return Err(SnapshotError::Exists(r.to_string()));
        }
    }
    let config = sandbox_config(store, record, base, &layers);
    let shift = IdShift {
        base: record.ids.host_base(),
        size: RANGE_SIZE,
    };
    // Frozen only for a plain copy of the upper (the kernel copies the bytes); the layer is
    // archived, hashed and unpacked from the copy once the sandbox runs again.
    let work = store.work_dir()?;
    let copy = work.path().join("upper");
    let was_paused = sandbox.is_paused()?;
    if !was_paused {
        sandbox.pause()?;
    }
    let frozen = Instant::now();
    let copied = copy_uppers(&overlays, &copy);
    let paused = if was_paused {
        Duration::ZERO
    } else {
        let paused = frozen.elapsed();
        sandbox.resume()?;
        paused
    };
    copied?;
    let staged = store.stage_dir(&copy, Some(shift), &format!("snapshot:{}", record.id))?;
    drop(work);
    tracing::info!(
        id = record.id,
        bytes = staged.size,
        paused_ms = paused.as_millis() as u64,
        "sandbox layer copied"
    );
    let bytes = staged.size;
    layers.push(staged.digest.clone());
    let image = ImageRecord {
        layers: layers.clone(),
        config,
        created_at: now(),
        source: format!("snapshot:{}", record.id),
        parent: Some(record.image.clone()),
        base,
    };
    let _naming = NAMING.lock().unwrap_or_else(|p| p.into_inner());
    let r = match given {
        Some(r) if store.get(&r).is_ok() => return Err(SnapshotError::Exists(r.to_string())),
        Some(r) => r,
        None => next_name(store, &record.id)?,
    };
    store.commit(vec![staged], Some((&r, &image)))?;
    Ok(Snapshot {
        image: r.to_string(),
        layers,
        bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        paused_ms: paused.as_millis() as u64,
    })
}

/// Copies the writable layers of a (frozen) sandbox into `dst` as one tree of its root: the
/// root overlay's upper is the tree, and each other overlay's upper (the host image's `/usr`)
/// becomes the subtree at its target, which is how the runtime stacks the layer again
/// ([`ImageSource::HostLayers`]).
fn copy_uppers(overlays: &[SandboxOverlay], dst: &Path) -> crate::error::Result<()> {
    for overlay in overlays {
        let rel = overlay.target.strip_prefix("/").unwrap_or(&overlay.target);
        let to = dst.join(rel);
        if rel.as_os_str().is_empty() {
            crate::freeze::copy_tree(&overlay.upper, &to)?;
            continue;
        }
        // The root's upper cannot hold the mount point's name (the mount covers it; the
        // sandbox cannot remove a mount point): whatever is there is hidden, and replaced.
        match std::fs::symlink_metadata(&to) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&to),
            Ok(_) => std::fs::remove_file(&to),
            Err(_) => Ok(()),
        }
        .map_err(|e| ImageError::io(format!("cannot replace {}", to.display()), e))?;
        crate::freeze::copy_tree(&overlay.upper, &to)?;
    }
    Ok(())
}

/// The overlays of a live sandbox with their writable layers, or why it has none on disk.
fn sandbox_overlays(sandbox: &Sandbox) -> Result<Vec<SandboxOverlay>> {
    sandbox.overlays().ok_or_else(|| {
        SnapshotError::Unsupported(format!(
            "sandbox {} keeps its writable layer in memory (openrun run), out of the host's \
             reach: diffs need one on disk (openrun create, or --storage disk)",
            sandbox.id()
        ))
    })
}

/// What the runtime mounts over every sandbox's root: the layers' entries there (mount points
/// it creates) are never seen inside, and are left out of diffs.
pub const RUNTIME_MOUNTS: [&str; 7] = [
    "/proc",
    "/dev",
    "/sys",
    "/tmp",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
];

/// What changed in `sandbox`: against its image (its writable layer), or against the image
/// `against` (for example an earlier snapshot of it, or the snapshot it was forked from).
pub fn diff_sandbox(
    store: Option<&Store>,
    sandbox: &Sandbox,
    against: Option<&str>,
    options: &DiffOptions,
) -> Result<DiffReport> {
    let overlays = sandbox_overlays(sandbox)?;
    let mut options = options.clone();
    options
        .hidden
        .extend(RUNTIME_MOUNTS.iter().map(|m| m.to_string()));
    let options = &options;
    let after: Vec<Overlay> = overlays
        .iter()
        .map(|o| Overlay {
            target: o.target.clone(),
            layers: o.lowers.iter().cloned().chain([o.upper.clone()]).collect(),
        })
        .collect();
    let Some(against) = against else {
        let before: Vec<Overlay> = overlays
            .into_iter()
            .map(|o| Overlay {
                target: o.target,
                layers: o.lowers,
            })
            .collect();
        return Ok(diff::diff(&before, &after, options)?);
    };
    let store = store.ok_or_else(|| {
        SnapshotError::Unsupported("no image store to compare against".to_string())
    })?;
    // Its lease keeps the image's layers from prune until the walk is done.
    let image = store.sandbox_image(against)?;
    let images_dir = store.root().parent().unwrap_or(store.root());
    let prepared = openrun_runtime::image::prepare(&image.source, images_dir)?;
    let before: Vec<Overlay> = prepared
        .layers
        .iter()
        .map(|l| Overlay {
            target: PathBuf::from(l.target),
            layers: l.lowers.iter().map(|l| l.path.clone()).collect(),
        })
        .collect();
    let same_mounts =
        before.len() == after.len() && before.iter().zip(&after).all(|(b, a)| b.target == a.target);
    if !same_mounts {
        return Err(SnapshotError::Unsupported(format!(
            "cannot compare sandbox {} with {against}: one is on the host image (which mounts \
             the host's /usr) and the other is not",
            sandbox.id()
        )));
    }
    Ok(diff::diff(&before, &after, options)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_layer_is_stacked_once_at_its_topmost_place() {
        let l = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let layers = l(&["a", "b", "a", "c"]);
        assert_eq!(stacked(&layers), [&layers[1], &layers[2], &layers[3]]);
        assert_eq!(stacked(&l(&["a"])).len(), 1);
    }
}
