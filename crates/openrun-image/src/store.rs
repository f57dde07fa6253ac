//! The image store: content-addressed layers and named images, under `<data-dir>/images/store/`.
//!
//! ```text
//! lock                          flock: exclusive for commits, rm and prune; shared while a
//!                               sandbox is being created from an image (a Lease)
//! layers/sha256/<hex>/          one unpacked layer in overlayfs lower format
//! layers/sha256/<hex>.json      LayerInfo {size, created_at, source}
//! images/<name>/<tag>.json      ImageRecord {layers, config, created_at, source, parent,
//!                               base (absent, or "host" for layers stacked on the host image)}
//! tmp/<pid>.<start>.<n>/        work dirs of live processes; swept at open when their
//!                               process is gone
//! ```
//!
//! The root is mode 0700 and host root's: layers keep image ids as host ids (uid 0 in the
//! image is host uid 0 on disk) and setuid bits, so no other host user may reach them.
//!
//! Everything is made in `tmp/` and becomes visible by one `rename` under the lock, so a
//! failed, interrupted or concurrent import never leaves a half layer or record visible: two
//! imports of the same layer end with one (the second finds it there and drops its copy), and
//! prune (which holds the same lock) sees every layer either unreferenced and whole, or
//! referenced by a record written in the same critical section as the layer's rename.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use openrun_runtime::{ImageSource, Runtime, RuntimeError, SandboxSpec};

use crate::digest::{is_hex64, Hashing};
use crate::error::{ImageError, IoContext, Result};
use crate::layer::{self, IdShift};
use crate::name::ImageRef;

/// Defaults an image gives its sandboxes (from an OCI config, a Dockerfile, a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    /// Environment, `K=V` each.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory of processes that name none.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// User of processes that name none (`name`, `uid`, `uid:gid`, `name:group`).
    #[serde(default)]
    pub user: Option<String>,
    /// Program `openrun run --image` starts (before `cmd`) when given no command.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default arguments (or command, without an entrypoint).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ImageConfig {
    /// The environment as a map; entries without `=` or with an empty name are left out.
    pub fn env_map(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| !k.is_empty() && !k.contains('\0'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// What a sandbox runs when given no command: entrypoint followed by cmd.
    pub fn default_command(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }
}

/// A named image: its layers (bottom to top) and defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// Layer ids (hex sha256), bottom to top.
    pub layers: Vec<String>,
    /// Defaults for its sandboxes.
    pub config: ImageConfig,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// Where it came from (`oci:PATH`, `docker-archive:PATH`, `snapshot:ID`, ...).
    pub source: String,
    /// The image it was made from, if any (`name:tag`).
    #[serde(default)]
    pub parent: Option<String>,
    /// What its layers are stacked on: nothing (`None`: the layers are the whole root), or
    /// the built-in host image (a snapshot of a sandbox on `host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<ImageBase>,
}

/// What a store image's layers sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageBase {
    /// The built-in `host` image: the host's own `/usr` and a filtered `/etc` skeleton, as
    /// they are when a sandbox is created (they are not copied into the store).
    Host,
}

impl ImageBase {
    /// Its name (`host`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => crate::name::HOST,
        }
    }
}

/// What the store knows about one layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerInfo {
    /// Bytes of its (uncompressed) tar.
    pub size: u64,
    /// When it entered the store (RFC 3339).
    pub created_at: String,
    /// Where it came from.
    pub source: String,
}

/// What [`Store::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Layer ids removed.
    pub layers: Vec<String>,
    /// Their total (uncompressed tar) size.
    pub bytes: u64,
}

/// The store under one data dir.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

/// A layer unpacked in the store's `tmp/`, not yet visible: [`Store::commit`] moves it in.
/// Dropping it removes it.
#[derive(Debug)]
pub struct StagedLayer {
    work: WorkDir,
    /// Its id: hex sha256 of its uncompressed tar.
    pub digest: String,
    /// Bytes of that tar.
    pub size: u64,
    /// Where it came from.
    pub source: String,
}

impl StagedLayer {
    fn dir(&self) -> PathBuf {
        self.work.path.join("layer")
    }
}

/// A shared hold on the store: while it lives, no prune runs (it waits), so layers resolved
/// under it stay on disk. Hold it from resolving an image until the sandbox using it exists
/// (its record lists the layers and keeps them from later prunes). Never commit, remove or
/// prune while holding one in the same thread: those wait for every lease.
#[derive(Debug)]
pub struct Lease {
    _lock: fs::File,
}

/// An image resolved for a new sandbox.
#[derive(Debug)]
pub struct SandboxImage {
    /// The name as given.
    pub name: String,
    /// What the runtime mounts.
    pub source: ImageSource,
    /// Its defaults.
    pub config: ImageConfig,
    /// Keeps its layers from prune until the sandbox exists (`None` for `host`).
    pub lease: Option<Lease>,
}

impl SandboxImage {
    /// Puts the image and its defaults into `spec`: the image's environment under the
    /// spec's own variables (explicit ones win), its working directory and user where the
    /// spec has none.
    pub fn apply(&self, spec: &mut SandboxSpec) {
        spec.image = self.source.clone();
        let mut env = self.config.env_map();
        env.append(&mut spec.env);
        spec.env = env;
        if spec.cwd.is_none() {
            spec.cwd = self.config.working_dir.clone().filter(|d| !d.is_empty());
        }
        if spec.user.is_none() {
            spec.user = self.config.user.clone().filter(|u| !u.is_empty());
        }
    }
}

/// A directory in `tmp/` named after this process (pid and start time), so a sweep can tell
/// live work from the leftovers of a dead process. Removed when dropped.
#[derive(Debug)]
pub(crate) struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a work dir");
            }
        }
    }
}

static WORK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Most layers an image may have (the runtime mounts each as an overlay lower).
pub const MAX_LAYERS: usize = openrun_runtime::image::MAX_LOWERS;

impl Store {
    /// Opens (creating if needed) the store of `data_dir` and sweeps `tmp/` of work left by
    /// processes that are gone. Needs host root.
    pub fn open(data_dir: &Path) -> Result<Self> {
        if !rustix::process::geteuid().is_root() {
            return Err(RuntimeError::NotRoot.into());
        }
        let data_dir = if data_dir.is_absolute() {
            data_dir.to_path_buf()
        } else {
            std::env::current_dir()
                .context(|| "cannot find the current directory".to_string())?
                .join(data_dir)
        };
        let images = data_dir.join("images");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&images)
            .context(|| format!("cannot create {}", images.display()))?;
        let root = images.join("store");
        for sub in ["", "layers", "layers/sha256", "images", "tmp"] {
            let dir = root.join(sub);
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(ImageError::io(
                        format!("cannot create {}", dir.display()),
                        e,
                    ))
                }
            }
        }
        // Layers hold setuid files of other ids: the store is host root's alone.
        let meta =
            fs::symlink_metadata(&root).context(|| format!("cannot inspect {}", root.display()))?;
        if !meta.is_dir() {
            return Err(ImageError::io(
                format!("cannot use {}", root.display()),
                io::Error::from(io::ErrorKind::NotADirectory),
            ));
        }
        if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            std::os::unix::fs::lchown(&root, Some(0), Some(0))
                .context(|| format!("cannot chown {}", root.display()))?;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .context(|| format!("cannot chmod {}", root.display()))?;
        }
        let store = Self { root };
        store.sweep_tmp();
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers").join("sha256")
    }

    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Directory of layer `hex` (which may not exist).
    pub fn layer_dir(&self, hex: &str) -> PathBuf {
        self.layers_dir().join(hex)
    }

    /// Whether layer `hex` is in the store.
    pub fn has_layer(&self, hex: &str) -> bool {
        is_hex64(hex) && self.layer_dir(hex).is_dir()
    }

    /// What the store recorded about layer `hex`.
    pub fn layer_info(&self, hex: &str) -> Result<LayerInfo> {
        let path = self.layers_dir().join(format!("{hex}.json"));
        let bytes = fs::read(&path).context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::corrupt(path.display().to_string(), e))
    }

    fn record_path(&self, r: &ImageRef) -> PathBuf {
        self.images_dir()
            .join(&r.name)
            .join(format!("{}.json", r.tag))
    }

    /// A fresh work dir in `tmp/`.
    pub(crate) fn work_dir(&self) -> Result<WorkDir> {
        let pid = std::process::id();
        let start = openrun_runtime::state::process_start_ticks(pid as i32)
            .context(|| "cannot read this process's start time".to_string())?;
        loop {
            let n = WORK_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = self.root.join("tmp").join(format!("{pid}.{start}.{n}"));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(WorkDir { path }),
                // Left by an earlier process with the same pid and start (a reboot): reuse
                // the name only once it is gone.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let _ = fs::remove_dir_all(&path);
                }
                Err(e) => {
                    return Err(ImageError::io(
                        format!("cannot create {}", path.display()),
                        e,
                    ))
                }
            }
        }
    }

    /// Removes work dirs whose process is gone (crashed imports, killed builds).
    fn sweep_tmp(&self) {
        let tmp = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let owner_alive = name.to_str().and_then(|n| {
                let mut parts = n.split('.');
                let pid: i32 = parts.next()?.parse().ok()?;
                let start: u64 = parts.next()?.parse().ok()?;
                Some(openrun_runtime::state::process_start_ticks(pid).is_ok_and(|t| t == start))
            });
            if owner_alive == Some(true) {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => tracing::info!(path = %path.display(), "removed abandoned image work"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove abandoned image work")
                }
            }
        }
    }

    fn lock(&self, op: rustix::fs::FlockOperation) -> Result<fs::File> {
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .context(|| format!("cannot open {}", path.display()))?;
        loop {
            match rustix::fs::flock(&file, op) {
                Ok(()) => return Ok(file),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(ImageError::io(format!("cannot lock {}", path.display()), e)),
            }
        }
    }

    /// Takes a [`Lease`] (a shared lock): prunes wait until it is dropped.
    pub fn lease(&self) -> Result<Lease> {
        Ok(Lease {
            _lock: self.lock(rustix::fs::FlockOperation::LockShared)?,
        })
    }

    /// Unpacks an uncompressed layer tar read from `reader` into `tmp/` (see
    /// [`layer::unpack`] for what is refused), hashing it for its id.
    pub fn stage_tar(&self, reader: impl Read, source: &str, what: &str) -> Result<StagedLayer> {
        let work = self.work_dir()?;
        let dir = work.path.join("layer");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .context(|| format!("cannot create {}", dir.display()))?;
        let mut hashing = Hashing::new(reader);
        layer::unpack(&mut hashing, &dir, what)?;
        hashing
            .drain()
            .map_err(|e| ImageError::corrupt(what, format!("cannot read past its end: {e}")))?;
        let (digest, size) = hashing.finish();
        Ok(StagedLayer {
            work,
            digest,
            size,
            source: source.to_string(),
        })
    }

    /// Makes a layer of the tree at `dir` (a sandbox's writable layer): its deterministic tar
    /// ([`layer::write_tree`], owners shifted back by `shift`, whiteouts and opaque
    /// directories kept, no link followed) is hashed for the id and unpacked into `tmp/`.
    pub fn stage_dir(
        &self,
        dir: &Path,
        shift: Option<IdShift>,
        source: &str,
    ) -> Result<StagedLayer> {
        let (rx, tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .context(|| "cannot create a pipe".to_string())?;
        let what = format!("the tree of {}", dir.display());
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let out = io::BufWriter::with_capacity(256 << 10, fs::File::from(tx));
                layer::write_tree(dir, shift, out)
            });
            let staged = self.stage_tar(fs::File::from(rx), source, &what);
            match writer.join() {
                Ok(Ok(_)) => staged,
                // The reader stopped first (a full disk, a refused entry): the writer only saw
                // the pipe break, the reader's error is the cause.
                Ok(Err(e)) if staged.is_err() && e.is_broken_pipe() => staged,
                // The writer's error explains the reader's (which only saw the pipe close).
                Ok(Err(e)) => Err(e),
                Err(_) => Err(ImageError::io(
                    format!("cannot archive {}", dir.display()),
                    io::Error::other("the archiving thread panicked"),
                )),
            }
        })
    }

    /// Makes `staged` layers visible (those already in the store are dropped) and, with
    /// `image`, writes its record, all under the exclusive lock. Every layer the record names
    /// must be in the store once the staged ones are in ([`ImageError::MissingLayers`]
    /// otherwise; nothing of the record is written then).
    pub fn commit(
        &self,
        staged: Vec<StagedLayer>,
        image: Option<(&ImageRef, &ImageRecord)>,
    ) -> Result<()> {
        if let Some((r, record)) = image {
            check_record(r, record)?;
        }
        // Layer contents reach the disk before any rename can make them visible.
        if !staged.is_empty() {
            let fd = rustix::fs::open(
                &self.root,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .context(|| format!("cannot open {}", self.root.display()))?;
            rustix::fs::syncfs(&fd).context(|| "cannot sync the image store".to_string())?;
        }
        let _lock = self.lock(rustix::fs::FlockOperation::LockExclusive)?;
        let created_at = now();
        for layer in &staged {
            let target = self.layer_dir(&layer.digest);
            if target.is_dir() {
                continue;
            }
            let info = LayerInfo {
                size: layer.size,
                created_at: created_at.clone(),
                source: layer.source.clone(),
            };
            let json = self.layers_dir().join(format!("{}.json", layer.digest));
            write_file_atomic(
                &layer.work.path.join("info.json"),
                &json,
                &serde_json::to_vec_pretty(&info)
                    .map_err(io::Error::other)
                    .context(|| "cannot encode a layer".to_string())?,
            )?;
            fs::rename(layer.dir(), &target)
                .context(|| format!("cannot move a layer into {}", target.display()))?;
            tracing::info!(layer = layer.digest, size = layer.size, "layer added");
        }
        if let Some((r, record)) = image {
            let missing: Vec<String> = record
                .layers
                .iter()
                .filter(|l| !self.has_layer(l))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(ImageError::MissingLayers(missing));
            }
            let path = self.record_path(r);
            if let Some(parent) = path.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .context(|| format!("cannot create {}", parent.display()))?;
            }
            let work = self.work_dir()?;
            let bytes = serde_json::to_vec_pretty(record)
                .map_err(io::Error::other)
                .context(|| "cannot encode the image record".to_string())?;
            write_file_atomic(&work.path.join("record.json"), &path, &bytes)?;
            tracing::info!(image = %r, layers = record.layers.len(), "image recorded");
        }
        Ok(())
    }

    /// Writes (or replaces) the record of `r`; its layers must be in the store.
    pub fn put(&self, r: &ImageRef, record: &ImageRecord) -> Result<()> {
        self.commit(Vec::new(), Some((r, record)))
    }

    /// The record of `r`.
    pub fn get(&self, r: &ImageRef) -> Result<ImageRecord> {
        let path = self.record_path(r);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if is_missing(&e) => return Err(ImageError::NotFound(r.to_string())),
            Err(e) => return Err(ImageError::io(format!("cannot read {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::corrupt(path.display().to_string(), e))
    }

    /// Every image, sorted by name and tag.
    pub fn list(&self) -> Result<Vec<(ImageRef, ImageRecord)>> {
        let mut out = Vec::new();
        let mut stack = vec![(self.images_dir(), String::new())];
        while let Some((dir, name)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageError::io(format!("cannot list {}", dir.display()), e)),
            };
            for entry in entries {
                let entry = entry.context(|| format!("cannot list {}", dir.display()))?;
                let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let kind = entry
                    .file_type()
                    .context(|| format!("cannot list {}", dir.display()))?;
                if kind.is_dir() {
                    let child = if name.is_empty() {
                        file
                    } else {
                        format!("{name}/{file}")
                    };
                    stack.push((entry.path(), child));
                } else if let Some(tag) = file.strip_suffix(".json") {
                    let Ok(r) = ImageRef::parse(&format!("{name}:{tag}")) else {
                        continue;
                    };
                    match self.get(&r) {
                        Ok(record) => out.push((r, record)),
                        // Removed meanwhile.
                        Err(ImageError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes the record of `r` (its layers stay until a prune finds them unused).
    pub fn remove(&self, r: &ImageRef) -> Result<()> {
        let _lock = self.lock(rustix::fs::FlockOperation::LockExclusive)?;
        let path = self.record_path(r);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if is_missing(&e) => return Err(ImageError::NotFound(r.to_string())),
            Err(e) => {
                return Err(ImageError::io(
                    format!("cannot remove {}", path.display()),
                    e,
                ))
            }
        }
        // Empty name directories go too (`a/b` leaves `a/` if nothing else is in it).
        let images = self.images_dir();
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == images || fs::remove_dir(&d).is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        tracing::info!(image = %r, "image removed");
        Ok(())
    }

    /// Removes every layer that no image names and no live sandbox of `runtime` uses, and
    /// the leftovers of unfinished work. Waits for creates that hold a [`Lease`].
    pub fn prune(&self, runtime: &Runtime) -> Result<PruneReport> {
        let doomed = self.work_dir()?;
        let mut report = PruneReport::default();
        {
            let _lock = self.lock(rustix::fs::FlockOperation::LockExclusive)?;
            let mut keep: BTreeSet<String> = BTreeSet::new();
            for (_, record) in self.list()? {
                keep.extend(record.layers);
            }
            let layers_dir = self.layers_dir();
            let canonical = fs::canonicalize(&layers_dir)
                .context(|| format!("cannot resolve {}", layers_dir.display()))?;
            for sandbox in runtime.list()? {
                for lower in &sandbox.lowers {
                    let in_store = lower
                        .parent()
                        .and_then(|p| fs::canonicalize(p).ok())
                        .is_some_and(|p| p == canonical);
                    if let (true, Some(name)) =
                        (in_store, lower.file_name().and_then(|n| n.to_str()))
                    {
                        keep.insert(name.to_string());
                    }
                }
            }
            let entries = fs::read_dir(&layers_dir)
                .context(|| format!("cannot list {}", layers_dir.display()))?;
            let mut infos = Vec::new();
            for entry in entries {
                let entry = entry.context(|| format!("cannot list {}", layers_dir.display()))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if is_hex64(&name) && !keep.contains(&name) {
                    let size = self.layer_info(&name).map(|i| i.size).unwrap_or(0);
                    fs::rename(entry.path(), doomed.path.join(&name))
                        .context(|| format!("cannot remove layer {name}"))?;
                    report.layers.push(name);
                    report.bytes += size;
                } else if let Some(hex) = name.strip_suffix(".json") {
                    infos.push(hex.to_string());
                }
            }
            // Infos of layers that are gone (removed now, or whose move in never happened).
            for hex in infos {
                if !self.layer_dir(&hex).is_dir() {
                    let _ = fs::remove_file(layers_dir.join(format!("{hex}.json")));
                }
            }
        }
        report.layers.sort();
        tracing::info!(layers = report.layers.len(), bytes = report.bytes, "pruned");
        // The doomed layers are deleted (with the work dir) after the lock is released.
        drop(doomed);
        self.sweep_tmp();
        Ok(report)
    }

    /// Resolves `name` (`host`, or `name[:tag]` in the store) for a new sandbox: the
    /// runtime's image source (the layer directories, bottom to top, on the host image for
    /// an image whose base is `host`) and the image's
    /// defaults, with a [`Lease`] that keeps the layers on disk until the sandbox exists.
    pub fn sandbox_image(&self, name: &str) -> Result<SandboxImage> {
        let r = ImageRef::parse(name)?;
        if let Some(host) = host_image(name, &r)? {
            return Ok(host);
        }
        let lease = self.lease()?;
        let record = self.get(&r).map_err(|e| match e {
            ImageError::NotFound(_) => ImageError::NotFound(name.to_string()),
            e => e,
        })?;
        let mut layers = Vec::with_capacity(record.layers.len());
        for hex in &record.layers {
            if !self.has_layer(hex) {
                return Err(ImageError::MissingLayers(vec![hex.clone()]));
            }
            layers.push(self.layer_dir(hex));
        }
        let name = name.to_string();
        let source = match record.base {
            None => ImageSource::Layers {
                name: name.clone(),
                layers,
            },
            Some(ImageBase::Host) => ImageSource::HostLayers {
                name: name.clone(),
                layers,
            },
        };
        Ok(SandboxImage {
            name,
            source,
            config: record.config,
            lease: Some(lease),
        })
    }
}

/// [`Store::sandbox_image`] for `name` in the store of `data_dir`; the built-in `host` image
/// resolves without opening the store (so a data dir without images never gets one).
pub fn sandbox_image(data_dir: &Path, name: &str) -> Result<SandboxImage> {
    let r = ImageRef::parse(name)?;
    if let Some(host) = host_image(name, &r)? {
        return Ok(host);
    }
    Store::open(data_dir)?.sandbox_image(name)
}

/// The built-in image, when `r` names it (`host`, `host:latest`).
fn host_image(name: &str, r: &ImageRef) -> Result<Option<SandboxImage>> {
    if !r.is_host() {
        return Ok(None);
    }
    if r.tag != crate::name::DEFAULT_TAG {
        return Err(ImageError::NotFound(name.to_string()));
    }
    Ok(Some(SandboxImage {
        name: name.to_string(),
        source: ImageSource::Host,
        config: ImageConfig::default(),
        lease: None,
    }))
}

fn check_record(r: &ImageRef, record: &ImageRecord) -> Result<()> {
    if r.is_host() {
        return Err(ImageError::InvalidName {
            name: r.to_string(),
            reason: "\"host\" is the built-in image".into(),
        });
    }
    if record.layers.is_empty() {
        return Err(ImageError::Invalid(format!("image {r} has no layers")));
    }
    if record.layers.len() > MAX_LAYERS {
        return Err(ImageError::Invalid(format!(
            "image {r} has {} layers; at most {MAX_LAYERS} are supported",
            record.layers.len()
        )));
    }
    if let Some(bad) = record.layers.iter().find(|l| !is_hex64(l)) {
        return Err(ImageError::Invalid(format!(
            "image {r} names a malformed layer id {bad:?}"
        )));
    }
    Ok(())
}

/// Whether a lookup failed because the path (or a directory on it) does not exist.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Writes `bytes` to `tmp` (synced), then renames it to `path`.
fn write_file_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .context(|| format!("cannot write {}", tmp.display()))?;
    file.sync_all()
        .context(|| format!("cannot sync {}", tmp.display()))?;
    fs::rename(tmp, path).context(|| format!("cannot write {}", path.display()))
}

/// Now, RFC 3339.
pub fn now() -> String {
    openrun_runtime::state::rfc3339(
        i64::try_from(openrun_runtime::state::now_ms()).unwrap_or(i64::MAX),
    )
}

#[cfg(test)]
mod tests;
