//! The image an `up`'s workspace sandbox starts from: the plan's base (a Debian image built
//! by debootstrap, a store image, or the repository's Dockerfile built), then its system
//! packages installed in a throwaway sandbox and kept as a snapshot of the caller's, one per
//! base and package set (`up-base-<hash>`), so the next `up` needing the same finds it.
//!
//! Images are built by the server's own binary as a child (`openrun image build`), the way an
//! operator would, each in a create slot and killed if the client leaves: the server-wide
//! `debian:SUITE` (one Debian build at a time), and the caller's `up-dockerfile-<hash>` (stored
//! under the caller's `tenants/<scope>/`, its `RUN` steps with the server's default limits).
//! One build or install per tenant and image name at a time (a second `up` waiting for the
//! same name then finds it made).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use openrun_image::{ImageRef, Store};
use openrun_recipe::{BaseImage, Plan};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Mutex};

use super::run::run_command;
use super::source::{SandboxGuard, TempFile};
use super::{Progress, StepStatus, UpError, UpEvent};
use crate::api::{blocking, Caller, CreateBody, Shared};
use crate::error::ApiError;

/// How long a Debian image build may take.
const DEBIAN_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long a Dockerfile build may take.
const DOCKERFILE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long `apt-get update` and `apt-get install` may take, each.
const APT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Lifetime of the sandbox packages are installed in (removed when done).
const APT_TTL: &str = "45m";
/// Hosts the package install reaches.
const APT_HOSTS: &[&str] = &["deb.debian.org", "security.debian.org"];
/// Packages every base gets (what clones and HTTPS need); the Debian images built by
/// `openrun image build --debian` already have them.
const BASE_PACKAGES: &[&str] = &["ca-certificates", "git"];
/// Largest Dockerfile read.
const MAX_DOCKERFILE: u64 = 1 << 20;
/// Lines of a failed child's stderr put in the error.
const ERROR_LINES: usize = 12;
/// Longest line of a child's stderr passed on whole: a longer one (a `RUN` printing without
/// newlines) is passed on in pieces of this size, so it never grows the server's memory.
const MAX_LINE: usize = 8 * 1024;
/// How often a running child build looks whether the client left.
const LEAVE_POLL: Duration = Duration::from_millis(250);

/// One Debian build at a time on this server.
fn debian_lock() -> &'static Mutex<()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(()))
}

/// The lock of one image name (kept while someone holds or waits for it).
async fn name_lock(name: &str) -> tokio::sync::OwnedMutexGuard<()> {
    static LOCKS: OnceLock<StdMutex<HashMap<String, Weak<Mutex<()>>>>> = OnceLock::new();
    let lock = {
        let mut locks = LOCKS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.retain(|_, weak| weak.strong_count() > 0);
        match locks.get(name).and_then(Weak::upgrade) {
            Some(lock) => lock,
            None => {
                let lock = Arc::new(Mutex::new(()));
                locks.insert(name.to_string(), Arc::downgrade(&lock));
                lock
            }
        }
    };
    lock.lock_owned().await
}

/// Claims the making of image `name` at `step`: `None` (step `cached`) when the caller has it,
/// also once another `up` that was making it is done; else the name's lock, held while it is
/// made, and when the step started (`running` sent).
async fn claim(
    s: &Shared,
    caller: &Caller,
    name: &str,
    step: &str,
    command: &str,
    progress: &Progress,
) -> Result<Option<(tokio::sync::OwnedMutexGuard<()>, Instant)>, UpError> {
    let command = Some(command.to_string());
    if exists(s, caller, name).await? {
        progress
            .step(step, command, StepStatus::Cached, Some(0), None)
            .await;
        return Ok(None);
    }
    let started = Instant::now();
    progress
        .step(step, command.clone(), StepStatus::Running, None, None)
        .await;
    // The images made here are the caller's: another tenant making the same name does not
    // make it for this one, so it does not wait for it.
    let lock = name_lock(&format!("{}{name}", crate::images::scope(&caller.tenant))).await;
    if exists(s, caller, name).await? {
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
        progress
            .step(step, command, StepStatus::Cached, Some(ms), None)
            .await;
        return Ok(None);
    }
    Ok(Some((lock, started)))
}

/// Makes (or finds) the image the workspace sandbox of `plan` starts from and returns a name
/// [`crate::api::create_sandbox`] takes for `caller`. `source_tar` is the repository (a
/// Dockerfile base is built from it). Steps `base` and `packages`.
pub(crate) async fn prepare_base(
    s: &Shared,
    caller: &Caller,
    plan: &Plan,
    source_tar: &Path,
    progress: &Progress,
) -> Result<String, UpError> {
    let (image, preinstalled): (String, &[&str]) = match &plan.base {
        BaseImage::Debian { suite } => (
            ensure_debian(s, caller, suite, progress).await?,
            openrun_image::debian::PACKAGES,
        ),
        BaseImage::Image { name } => (store_image(s, caller, name, progress).await?, &[]),
        BaseImage::Dockerfile {
            dockerfile,
            context,
            args,
        } => (
            build_dockerfile(s, caller, source_tar, dockerfile, context, args, progress).await?,
            &[],
        ),
    };
    // Nothing beyond what the base has: no package layer (an image base may not even have
    // apt).
    let wanted = package_set(&plan.system_packages);
    let asked = plan.system_packages.iter().map(|p| p.trim());
    if asked
        .filter(|p| !p.is_empty())
        .all(|p| preinstalled.contains(&p))
    {
        return Ok(image);
    }
    install_packages(s, caller, plan, &image, &wanted, progress).await
}

/// The packages to install: the plan's and [`BASE_PACKAGES`], sorted, without duplicates.
fn package_set(packages: &[String]) -> BTreeSet<String> {
    packages
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .chain(BASE_PACKAGES.iter().map(|p| p.to_string()))
        .collect()
}

/// Whether `name` can be a Debian package name (with an optional `=version` or `:arch`): it
/// goes on apt's command line.
fn valid_package(name: &str) -> bool {
    name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.:=~_".contains(&b))
}

/// The name of the caller's image of `base` (its layers) with `packages` installed.
fn package_image_name(base_layers: &[String], packages: &BTreeSet<String>) -> String {
    let mut hash = Sha256::new();
    for layer in base_layers {
        hash.update(layer.as_bytes());
        hash.update(b"\n");
    }
    hash.update(b"--\n");
    for package in packages {
        hash.update(package.as_bytes());
        hash.update(b"\n");
    }
    format!("up-base-{}", &hex(&hash.finalize())[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the caller sees an image `name` (its own or a server-wide one).
async fn exists(s: &Shared, caller: &Caller, name: &str) -> Result<bool, ApiError> {
    Ok(crate::images::resolve(s, caller, name).await?.is_ok())
}

/// The layer ids of the caller's image `name`.
async fn layers_of(s: &Shared, caller: &Caller, name: &str) -> Result<Vec<String>, UpError> {
    let stored = match crate::images::resolve(s, caller, name).await? {
        Ok(stored) => stored,
        Err(e) => {
            return Err(
                UpError::new("base_failed", format!("image {name} is not usable: {e}"))
                    .at_step("base"),
            )
        }
    };
    let data_dir = s.runtime.data_dir().to_path_buf();
    let record = blocking(move || {
        let r = ImageRef::parse(&stored)?;
        Store::open(&data_dir)?.get(&r)
    })
    .await?;
    match record {
        Ok(record) => Ok(record.layers),
        // The host image has no layers of the store.
        Err(_) if name == "host" => Ok(Vec::new()),
        Err(e) => Err(
            UpError::new("base_failed", format!("cannot read image {name}: {e}")).at_step("base"),
        ),
    }
}

/// `debian:SUITE`, built if the store lacks it (step `base`: `cached` or `running`/`ok`).
async fn ensure_debian(
    s: &Shared,
    caller: &Caller,
    suite: &str,
    progress: &Progress,
) -> Result<String, UpError> {
    if suite.is_empty() || suite.len() > 32 || !suite.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(UpError::new(
            "base_failed",
            format!("invalid Debian suite {suite:?}: a suite is a name such as bookworm"),
        )
        .at_step("base"));
    }
    let name = format!("debian:{suite}");
    let command = format!("openrun image build --debian {suite} -t {name}");
    if exists(s, caller, &name).await? {
        progress
            .step("base", Some(command), StepStatus::Cached, Some(0), None)
            .await;
        return Ok(name);
    }
    let started = Instant::now();
    progress
        .step(
            "base",
            Some(command.clone()),
            StepStatus::Running,
            None,
            None,
        )
        .await;
    let result = async {
        let one = match debian_lock().try_lock() {
            Ok(one) => one,
            Err(_) => {
                progress
                    .send(UpEvent::Output {
                        step: "base".into(),
                        stream: "stderr",
                        data_b64: base64::engine::general_purpose::STANDARD
                            .encode("waiting for another Debian image build to finish\n"),
                    })
                    .await;
                tokio::select! {
                    one = debian_lock().lock() => one,
                    () = client_left(progress) => return Err(super::cancelled("base")),
                }
            }
        };
        let _one = one;
        // Made by another up while this one waited.
        if exists(s, caller, &name).await? {
            return Ok(());
        }
        let args = vec![
            "image".to_string(),
            "build".into(),
            "--debian".into(),
            suite.into(),
            "-t".into(),
            name.clone(),
        ];
        run_openrun(s, args, "base", DEBIAN_TIMEOUT, progress)
            .await
            .map_err(|e| match e {
                ChildError::Failed(tail) => UpError::new(
                    "base_failed",
                    format!("cannot build the Debian {suite} image: {tail}"),
                ),
                ChildError::Up(e) => e,
            })
    }
    .await;
    finish_step(progress, "base", command, started, result).await?;
    Ok(name)
}

/// Sends the end of a step (`ok`, or `failed` with the error at that step).
async fn finish_step(
    progress: &Progress,
    step: &str,
    command: String,
    started: Instant,
    result: Result<(), UpError>,
) -> Result<(), UpError> {
    let ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(0));
    match result {
        Ok(()) => {
            progress
                .step(step, Some(command), StepStatus::Ok, ms, None)
                .await;
            Ok(())
        }
        Err(mut e) => {
            progress
                .step(step, Some(command.clone()), StepStatus::Failed, ms, None)
                .await;
            e.step = Some(step.to_string());
            e.command.get_or_insert(command);
            Err(e)
        }
    }
}

/// A store image the plan names: it must be there for the caller.
async fn store_image(
    s: &Shared,
    caller: &Caller,
    name: &str,
    progress: &Progress,
) -> Result<String, UpError> {
    if exists(s, caller, name).await? {
        progress
            .step("base", None, StepStatus::Cached, Some(0), None)
            .await;
        return Ok(name.to_string());
    }
    progress
        .step("base", None, StepStatus::Failed, Some(0), None)
        .await;
    Err(UpError::new(
        "base_failed",
        format!(
            "image {name} is not in the server's store: import it with `openrun image import` \
             or use a Debian image"
        ),
    )
    .at_step("base"))
}

/// Builds the repository's Dockerfile: the caller's image `up-dockerfile-<hash>` (stored as
/// `tenants/<scope>/up-dockerfile-<hash>`, owned by the caller: another tenant's open never
/// finds it), the hash of the Dockerfile, its build arguments and the unpacked context
/// exactly as the build reads it.
async fn build_dockerfile(
    s: &Shared,
    caller: &Caller,
    source_tar: &Path,
    dockerfile: &str,
    context: &str,
    args: &BTreeMap<String, String>,
    progress: &Progress,
) -> Result<String, UpError> {
    let failed = |message: String| {
        let mut e = UpError::new("base_failed", message).at_step("base");
        e.file = Some(dockerfile.to_string());
        e
    };
    let context = relative(context).ok_or_else(|| {
        failed(format!(
            "the build context {context:?} is not a path inside the repository"
        ))
    })?;
    let dockerfile_rel = relative(dockerfile).ok_or_else(|| {
        failed(format!(
            "the Dockerfile {dockerfile:?} is not a path inside the repository"
        ))
    })?;
    let dir = TempFile::new_dir(s, ".context")?;
    let copy = TempFile::new(s, ".Dockerfile")?;
    let (tar, root, copy_path) = (
        source_tar.to_path_buf(),
        dir.path().to_path_buf(),
        copy.path().to_path_buf(),
    );
    let (ctx, file_rel) = (context.clone(), dockerfile_rel.clone());
    let unpacked = blocking(move || unpack_context(&tar, &root, &ctx, &file_rel, &copy_path))
        .await?
        .map_err(&failed)?;
    let parsed = openrun_image::dockerfile::parse(&unpacked.text)
        .map_err(|e| failed(format!("cannot read {dockerfile}: {e}")))?;
    // The child reads the store without tenancy: a FROM naming a tenant's image (its store
    // name, `tenants/<hash>/...`) is refused, and a FROM debian:SUITE is built first, like a
    // Debian base.
    for image in from_images(&parsed, args).map_err(|why| failed(format!("{dockerfile}: {why}")))? {
        // The builder refuses these too (after its own expansion); this says so before any
        // build starts.
        if image != "scratch" && ImageRef::parse(&image).is_err() {
            return Err(failed(format!(
                "{dockerfile}: FROM {image:?} is not an image name"
            )));
        }
        if ImageRef::parse(&image).is_ok_and(|r| r.name.starts_with("tenants/")) {
            return Err(failed(format!(
                "{dockerfile}: FROM {image}: a snapshot of a tenant cannot be a Dockerfile's \
                 base (build on a Debian or imported image)"
            )));
        }
        if let Some(suite) = image.strip_prefix("debian:") {
            if !suite.is_empty() && suite.bytes().all(|b| b.is_ascii_lowercase()) {
                ensure_debian(s, caller, suite, progress).await?;
            }
        }
    }
    let mut hash = Sha256::new();
    // v2: the context's digest is of the unpacked directory.
    hash.update(b"up-dockerfile v2\0");
    hash.update(unpacked.text.as_bytes());
    for (k, v) in args {
        hash.update(format!("\0{k}={v}").as_bytes());
    }
    hash.update(unpacked.digest);
    let name = format!("up-dockerfile-{}", &hex(&hash.finalize())[..16]);
    let stored = format!("{}{name}:latest", crate::images::scope(&caller.tenant));
    let mut argv = vec![
        "image".to_string(),
        "build".into(),
        "-t".into(),
        stored.clone(),
        "-f".into(),
        copy.path().display().to_string(),
    ];
    for (k, v) in args {
        argv.extend(["--build-arg".into(), format!("{k}={v}")]);
    }
    // A repository's RUN steps get the limits of a sandbox created with none.
    let limits = &s.default_limits;
    if let Some(bytes) = limits.memory_bytes {
        argv.extend(["--memory".into(), bytes.to_string()]);
    }
    if let Some(millis) = limits.cpu_millis {
        argv.extend([
            "--cpus".into(),
            format!("{}.{:03}", millis / 1000, millis % 1000),
        ]);
    }
    if let Some(pids) = limits.pids {
        argv.extend(["--pids".into(), pids.to_string()]);
    }
    if let Some(bytes) = limits.disk_bytes {
        argv.extend(["--disk".into(), bytes.to_string()]);
    }
    let context_dir = if context == "." {
        dir.path().to_path_buf()
    } else {
        dir.path().join(&context)
    };
    argv.push(context_dir.display().to_string());
    let command = format!(
        "openrun image build -t {name} -f {dockerfile} {}",
        if context == "." { "." } else { &context }
    );
    let Some((_same, started)) = claim(s, caller, &name, "base", &command, progress).await? else {
        return Ok(name);
    };
    let result = match run_openrun(s, argv, "base", DOCKERFILE_TIMEOUT, progress).await {
        Ok(()) => {
            let tenant = caller.tenant.clone();
            s.db.call(move |c| crate::db::set_image_owner(c, &stored, &tenant))
                .await
                .map_err(|e| UpError::from(ApiError::from(e)))
        }
        Err(ChildError::Failed(tail)) => Err(failed(format!("cannot build {dockerfile}: {tail}"))),
        Err(ChildError::Up(e)) => Err(e),
    };
    finish_step(progress, "base", command, started, result).await?;
    Ok(name)
}

/// The images the FROMs of `parsed` name, expanded as the builder does: with the ARGs
/// before the first FROM (their defaults, overridden by the build arguments `args`).
fn from_images(
    parsed: &openrun_image::dockerfile::Dockerfile,
    args: &BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    use openrun_image::dockerfile::Kind;
    // As the builder's: an ARG declared without a value is unset (`${X-default}` takes the
    // default), not empty.
    let mut vars: BTreeMap<String, Option<String>> = BTreeMap::new();
    for instruction in &parsed.global_args {
        if let Kind::Arg(declared) = &instruction.kind {
            for (name, default) in declared {
                let value = match (args.get(name), default) {
                    (Some(value), _) => Some(value.clone()),
                    (None, Some(word)) => Some(word.expand(&|k| vars.get(k).cloned().flatten())?),
                    (None, None) => None,
                };
                vars.insert(name.clone(), value);
            }
        }
    }
    let mut images = Vec::new();
    for instruction in &parsed.instructions {
        if let Kind::From { image } = &instruction.kind {
            let name = image
                .expand(&|k| vars.get(k).cloned().flatten())
                .map_err(|e| format!("line {}: {e}", instruction.line))?;
            images.push(name);
        }
    }
    Ok(images)
}

/// `path` as a relative path without `..` (`.` for the root), or `None`.
fn relative(path: &str) -> Option<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if path.starts_with('/') || parts.contains(&"..") || path.contains('\0') {
        return None;
    }
    Some(if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    })
}

/// What [`unpack_context`] found.
struct Unpacked {
    /// The Dockerfile.
    text: String,
    /// sha256 of the context's entries (paths, kinds, modes, contents, link targets).
    digest: [u8; 32],
}

/// Unpacks the repository's tar into `root` (no path leaves it: the store's layer unpacking),
/// checks the context is a directory reached without symbolic links, and copies the
/// Dockerfile (a regular file reached the same way) to `copy`.
fn unpack_context(
    tar: &Path,
    root: &Path,
    context: &str,
    dockerfile: &str,
    copy: &Path,
) -> Result<Unpacked, String> {
    let open = |path: &Path| {
        std::fs::File::open(path).map_err(|e| format!("cannot read the repository: {e}"))
    };
    openrun_image::layer::unpack(std::io::BufReader::new(open(tar)?), root, "the repository")
        .map_err(|e| format!("cannot unpack the repository: {e}"))?;
    let flags = rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_SYMLINKS;
    let dir = rustix::fs::open(
        root,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("cannot open the unpacked repository: {e}"))?;
    if context != "." {
        rustix::fs::openat2(
            &dir,
            context,
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            flags,
        )
        .map_err(|e| {
            format!("the build context {context} is not a directory of the repository ({e})")
        })?;
    }
    let file = rustix::fs::openat2(
        &dir,
        dockerfile,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
        flags,
    )
    .map_err(|e| format!("{dockerfile} is not a file of the repository ({e})"))?;
    let mut file = std::fs::File::from(file);
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {dockerfile}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{dockerfile} is not a regular file"));
    }
    let mut text = String::new();
    (&mut file)
        .take(MAX_DOCKERFILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {dockerfile}: {e}"))?;
    if text.len() as u64 > MAX_DOCKERFILE {
        return Err(format!("{dockerfile} is larger than 1 MiB"));
    }
    std::fs::write(copy, &text).map_err(|e| format!("cannot copy {dockerfile}: {e}"))?;
    let context_dir = if context == "." {
        root.to_path_buf()
    } else {
        root.join(context)
    };
    let digest = context_digest(&context_dir)
        .map_err(|e| format!("cannot read the unpacked repository: {e}"))?;
    Ok(Unpacked { text, digest })
}

/// sha256 of the directory `dir` as the build reads it (the unpacked context, whatever
/// names the tar gave its entries): every entry's relative path, kind, mode, and contents or
/// link target, in name order; times and owners left out (a fresh clone has new times).
/// Links are never followed.
fn context_digest(dir: &Path) -> std::io::Result<[u8; 32]> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Directories to list, relative to `dir` ("" for `dir` itself).
    let mut pending: Vec<std::path::PathBuf> = vec![std::path::PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(dir.join(&rel))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        // Pushed in reverse so they are listed in name order (depth first).
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let path = dir.join(&rel);
            let meta = std::fs::symlink_metadata(&path)?;
            let kind = meta.file_type();
            hash.update(rel.as_os_str().as_bytes());
            hash.update([0]);
            let tag = if kind.is_dir() {
                b'd'
            } else if kind.is_file() {
                b'f'
            } else if kind.is_symlink() {
                b'l'
            } else {
                b'o'
            };
            hash.update([tag]);
            hash.update((meta.permissions().mode() & 0o7777).to_le_bytes());
            if kind.is_file() {
                hash.update(meta.len().to_le_bytes());
                let mut file = std::fs::File::open(&path)?;
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                }
            } else if kind.is_symlink() {
                hash.update(std::fs::read_link(&path)?.as_os_str().as_bytes());
            } else if kind.is_dir() {
                subdirs.push(rel);
            }
            hash.update([0]);
        }
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(hash.finalize().into())
}

/// The caller's image `up-base-<hash>`: `image` with `packages` installed (made in a
/// throwaway sandbox if missing). Step `packages`.
async fn install_packages(
    s: &Shared,
    caller: &Caller,
    plan: &Plan,
    image: &str,
    packages: &BTreeSet<String>,
    progress: &Progress,
) -> Result<String, UpError> {
    const STEP: &str = "packages";
    let list: Vec<String> = packages.iter().cloned().collect();
    let command = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        list.join(" ")
    );
    let failed = |message: String| {
        let mut e = UpError::new("packages_failed", message).at_step(STEP);
        e.file = asked_by(plan);
        e.command = Some(command.clone());
        e
    };
    if let Some(bad) = list.iter().find(|p| !valid_package(p)) {
        return Err(failed(format!(
            "{bad:?} is not a Debian package name (asked for by {})",
            asker(plan)
        )));
    }
    let layers = layers_of(s, caller, image).await?;
    let name = package_image_name(&layers, packages);
    let Some((_same, started)) = claim(s, caller, &name, STEP, &command, progress).await? else {
        return Ok(name);
    };
    let mut exit_code = None;
    let result = install_in_sandbox(s, caller, image, &name, &list, progress, &mut exit_code)
        .await
        .map_err(|e| match e {
            Install::Failed(tail) => failed(format!(
                "cannot install the system packages {} (asked for by {}): {tail}",
                list.join(" "),
                asker(plan)
            )),
            Install::Error(e) => e,
        });
    let ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(0));
    match result {
        Ok(()) => {
            progress
                .step(STEP, Some(command), StepStatus::Ok, ms, Some(0))
                .await;
            Ok(name)
        }
        Err(mut e) => {
            progress
                .step(STEP, Some(command), StepStatus::Failed, ms, exit_code)
                .await;
            e.step = Some(STEP.into());
            Err(e)
        }
    }
}

/// Why an install failed: apt said no (its last lines), or the sandbox did.
enum Install {
    Failed(String),
    Error(UpError),
}

impl From<UpError> for Install {
    fn from(e: UpError) -> Self {
        Install::Error(e)
    }
}

impl From<ApiError> for Install {
    fn from(e: ApiError) -> Self {
        Install::Error(e.into())
    }
}

async fn install_in_sandbox(
    s: &Shared,
    caller: &Caller,
    image: &str,
    name: &str,
    packages: &[String],
    progress: &Progress,
    exit_code: &mut Option<i32>,
) -> Result<(), Install> {
    let body = CreateBody {
        image: Some(image.to_string()),
        ttl: Some(APT_TTL.into()),
        labels: BTreeMap::from([("openrun.up.packages".to_string(), name.to_string())]),
        network: Some(serde_json::json!({ "mode": "allowlist", "allow": APT_HOSTS })),
        ..Default::default()
    };
    let created = crate::api::create_sandbox(s, caller, body).await?;
    let guard = SandboxGuard::new(s, caller, created.id());
    let env = BTreeMap::from([("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string())]);
    // Retries: a mirror's connection may drop under several installs at once.
    let retries = ["-o", "Acquire::Retries=3"];
    let mut install: Vec<String> = ["apt-get"]
        .iter()
        .chain(&retries)
        .chain(&["install", "-y", "--no-install-recommends"])
        .map(|w| w.to_string())
        .collect();
    install.extend(packages.iter().cloned());
    let clean = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        "apt-get clean; rm -rf /var/lib/apt/lists/*".into(),
    ];
    let update: Vec<String> = ["apt-get"]
        .iter()
        .chain(&retries)
        .chain(&["update"])
        .map(|w| w.to_string())
        .collect();
    for argv in [update, install, clean] {
        let outcome = run_command(
            s,
            caller,
            guard.id(),
            "packages",
            argv,
            Some("/".into()),
            env.clone(),
            Some("root".into()),
            APT_TIMEOUT,
            progress,
        )
        .await?;
        *exit_code = Some(outcome.exit_code);
        if !outcome.ok() {
            guard.remove().await;
            return Err(Install::Failed(outcome.last_lines(ERROR_LINES)));
        }
    }
    match crate::images::take_snapshot(s, caller, guard.id(), Some(name.to_string())).await {
        Ok(_) => {}
        // Made meanwhile by another server process on this data dir.
        Err(e) if exists(s, caller, name).await.unwrap_or(false) => {
            tracing::debug!(name, error = %e, "package image made meanwhile");
        }
        Err(e) => {
            guard.remove().await;
            return Err(e.into());
        }
    }
    guard.remove().await;
    Ok(())
}

/// The file that asked for the plan's packages, if one is known.
fn asked_by(plan: &Plan) -> Option<String> {
    if plan.inputs.iter().any(|f| f == "apt.txt") {
        return Some("apt.txt".into());
    }
    plan.config_file.clone()
}

/// Who asked for the packages, for a message: the file, or the languages detected.
fn asker(plan: &Plan) -> String {
    match asked_by(plan) {
        Some(file) => file,
        None if !plan.languages.is_empty() => {
            format!("the toolchains of {} (detected)", plan.languages.join(", "))
        }
        None => "the plan".into(),
    }
}

/// Why a child build did not succeed.
enum ChildError {
    /// It failed, could not run or timed out: the last lines of its stderr, or why.
    Failed(String),
    /// The open stops: the client left (the child was killed), or no create slot.
    Up(UpError),
}

/// Resolves once the client left (never for progress nobody reads).
async fn client_left(progress: &Progress) {
    loop {
        if progress.cancelled() {
            return;
        }
        tokio::time::sleep(LEAVE_POLL).await;
    }
}

/// Sets its flag when dropped: a child build whose open is dropped is killed.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs the server's own binary (`openrun --data-dir D ARGS`) as a child in a create slot
/// (its `RUN` steps are sandboxes), its stderr sent as `step`'s output (lines of at most
/// [`MAX_LINE`] bytes); killed with its process group after `timeout`, or when the client
/// leaves.
async fn run_openrun(
    s: &Shared,
    args: Vec<String>,
    step: &str,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), ChildError> {
    let _slot = tokio::select! {
        slot = s.admission.slot() => slot.map_err(|e| ChildError::Up(e.into()))?,
        () = client_left(progress) => return Err(ChildError::Up(super::cancelled(step))),
    };
    let helper = s.helper.clone();
    let data_dir = s.runtime.data_dir().to_path_buf();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let child_stop = stop.0.clone();
    let child = tokio::task::spawn_blocking(move || {
        run_child(&helper, &data_dir, &args, timeout, tx, &child_stop)
    });
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut poll = tokio::time::interval(LEAVE_POLL);
    loop {
        let line = tokio::select! {
            line = rx.recv() => line,
            _ = poll.tick() => {
                if progress.cancelled() {
                    stop.0.store(true, Ordering::Relaxed);
                }
                continue;
            }
        };
        let Some(line) = line else { break };
        if progress.cancelled() {
            stop.0.store(true, Ordering::Relaxed);
        }
        progress
            .send(UpEvent::Output {
                step: step.to_string(),
                stream: "stderr",
                data_b64: base64::engine::general_purpose::STANDARD.encode(&line),
            })
            .await;
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if !text.is_empty() {
            tail.push_back(text);
            if tail.len() > ERROR_LINES {
                tail.pop_front();
            }
        }
    }
    let ended = child
        .await
        .map_err(|e| ChildError::Failed(format!("the build's task failed: {e}")))?;
    if stop.0.load(Ordering::Relaxed) {
        return Err(ChildError::Up(super::cancelled(step)));
    }
    match ended {
        Ok(true) => Ok(()),
        Ok(false) => Err(ChildError::Failed(if tail.is_empty() {
            "it failed without saying why".into()
        } else {
            Vec::from(tail).join("\n")
        })),
        Err(e) => Err(ChildError::Failed(e)),
    }
}

/// Reads `reader` to its end, passing on each line (with its newline) to `send`; a line
/// longer than [`MAX_LINE`] goes in pieces of that size. Never holds more than a piece.
fn read_lines(reader: impl Read, mut send: impl FnMut(Vec<u8>) -> bool) {
    let mut reader = std::io::BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let room = MAX_LINE - line.len();
        let (take, ends) = match chunk.iter().take(room).position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (
                chunk.len().min(room),
                line.len() + chunk.len().min(room) >= MAX_LINE,
            ),
        };
        line.extend_from_slice(&chunk[..take]);
        reader.consume(take);
        if ends && !send(std::mem::take(&mut line)) {
            return;
        }
    }
    if !line.is_empty() {
        send(line);
    }
}

/// The blocking part of [`run_openrun`]: `Ok(success)`, `Err` when it could not run or timed
/// out. The child leads its own process group (debootstrap, the build's sandboxes' creators),
/// killed whole at the deadline or once `stop` is set.
fn run_child(
    helper: &Path,
    data_dir: &Path,
    args: &[String],
    timeout: Duration,
    tx: mpsc::Sender<Vec<u8>>,
    stop: &AtomicBool,
) -> Result<bool, String> {
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(helper)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        // The child works on this data dir itself, never through a server.
        .env_remove("OPENRUN_SERVER")
        .env_remove("OPENRUN_API_KEY")
        .env_remove("OPENRUN_DATA_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", helper.display()))?;
    let group = rustix::process::Pid::from_child(&child);
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let Some(stderr) = stderr else { return };
        // A reader that left only stops seeing it.
        read_lines(stderr, |line| {
            let _ = tx.blocking_send(line);
            true
        });
    });
    let kill = |child: &mut std::process::Child| {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        let _ = child.kill();
        let _ = child.wait();
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if stop.load(Ordering::Relaxed) => {
                kill(&mut child);
                break Err("stopped: the client left".to_string());
            }
            Ok(None) if Instant::now() >= deadline => {
                kill(&mut child);
                break Err(format!(
                    "it did not finish in {} min",
                    timeout.as_secs() / 60
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => break Err(format!("cannot wait for the build: {e}")),
        }
    };
    // What the group left (a process that kept the pipe open) goes with it.
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    let _ = reader.join();
    Ok(status?.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_images_are_named_by_base_and_set() {
        let layers = vec!["a".repeat(64), "b".repeat(64)];
        let one = package_set(&["ruby".into(), "bundler".into(), "git".into()]);
        let two = package_set(&[" bundler".into(), "ruby".into()]);
        assert_eq!(
            one, two,
            "order, spaces and the base packages do not matter"
        );
        assert!(one.contains("ca-certificates"));
        let name = package_image_name(&layers, &one);
        assert!(name.starts_with("up-base-"));
        assert_eq!(name.len(), "up-base-".len() + 16);
        assert!(ImageRef::parse(&name).is_ok());
        assert_eq!(name, package_image_name(&layers, &two));
        let other = package_set(&["ruby".into()]);
        assert_ne!(name, package_image_name(&layers, &other));
        assert_ne!(name, package_image_name(&layers[..1], &one));
    }

    #[test]
    fn package_names_are_checked() {
        for good in [
            "g++",
            "python3.11",
            "libssl-dev",
            "libc6:amd64",
            "ruby=1:3.1",
        ] {
            assert!(valid_package(good), "{good}");
        }
        for bad in ["", "-o", "a b", "a;b", "$(x)", "Ruby", "a/b"] {
            assert!(!valid_package(bad), "{bad}");
        }
    }

    #[test]
    fn from_images_are_expanded_like_the_builder() {
        let parsed = openrun_image::dockerfile::parse(
            "ARG BASE=debian\nARG SUITE=bookworm\nFROM ${BASE}:${SUITE}\nRUN true\n",
        )
        .unwrap();
        let none = BTreeMap::new();
        assert_eq!(from_images(&parsed, &none).unwrap(), ["debian:bookworm"]);
        let args = BTreeMap::from([("BASE".to_string(), "tenants/0123/x".to_string())]);
        assert_eq!(
            from_images(&parsed, &args).unwrap(),
            ["tenants/0123/x:bookworm"]
        );
    }

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(relative(".").as_deref(), Some("."));
        assert_eq!(relative("").as_deref(), Some("."));
        assert_eq!(relative("./docker/").as_deref(), Some("docker"));
        assert_eq!(
            relative("a//b/./Dockerfile").as_deref(),
            Some("a/b/Dockerfile")
        );
        assert_eq!(relative("../x"), None);
        assert_eq!(relative("/etc"), None);
        assert_eq!(relative("a/../../b"), None);
    }

    /// Unpacks `entries` (name, contents) as a tar the way an open does; the digest of
    /// `context` in it.
    fn digest_of(entries: &[(&str, &[u8])], mtime: u64, context: &str) -> [u8; 32] {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(mtime);
            // Names the tar crate would refuse to write (`.//x`) go in raw.
            let name = h.as_old_mut();
            name.name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        openrun_image::layer::unpack(&tar[..], dir.path(), "test").unwrap();
        let ctx = if context == "." {
            dir.path().to_path_buf()
        } else {
            dir.path().join(context)
        };
        context_digest(&ctx).unwrap()
    }

    #[test]
    fn the_context_digest_ignores_times_and_other_dirs() {
        let tree = |other: &'static [u8]| [("ctx/a.txt", &b"hello"[..]), ("other.txt", other)];
        let one = digest_of(&tree(b"x"), 1, "ctx");
        assert_eq!(one, digest_of(&tree(b"y"), 2, "ctx"));
        assert_ne!(
            digest_of(&tree(b"x"), 1, "."),
            digest_of(&tree(b"y"), 1, ".")
        );
    }

    /// Security review #2: an entry whose raw name is not the normal one (`.//ctx/a.txt`)
    /// still lands in the context and changes its digest.
    #[test]
    fn the_context_digest_is_of_what_is_unpacked() {
        let honest: [(&str, &[u8]); 1] = [("ctx/a.txt", b"hello")];
        let sneaky: [(&str, &[u8]); 2] = [("ctx/a.txt", b"hello"), (".//ctx/a.txt", b"evil")];
        assert_ne!(digest_of(&honest, 1, "ctx"), digest_of(&sneaky, 1, "ctx"));
        let same: [(&str, &[u8]); 1] = [("./ctx//a.txt", b"hello")];
        assert_eq!(digest_of(&honest, 1, "ctx"), digest_of(&same, 1, "ctx"));
    }

    /// Correctness review H1: output without newlines reaches the server in bounded pieces.
    #[test]
    fn child_lines_are_bounded() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE + 10));
        input.extend(b"\nend");
        let mut got = Vec::new();
        read_lines(&input[..], |line| {
            got.push(line);
            true
        });
        assert!(got.iter().all(|l| l.len() <= MAX_LINE));
        assert_eq!(got[0], b"short\n");
        assert_eq!(got.last().map(Vec::as_slice), Some(&b"end"[..]));
        assert_eq!(got.concat(), input, "nothing lost or reordered");
        assert_eq!(got.len(), 1 + 3 + 1 + 1);
    }

    #[test]
    fn tenant_scope_is_the_store_prefix_of_snapshots() {
        let scope = crate::images::scope("tenant-a");
        assert!(scope.starts_with("tenants/") && scope.ends_with('/'));
        assert_eq!(scope.len(), "tenants/".len() + 17);
        assert!(ImageRef::parse(&format!("{scope}up-dockerfile-0123456789abcdef")).is_ok());
    }

    #[test]
    fn an_arg_without_a_value_is_unset_as_for_the_builder() {
        let parsed =
            openrun_image::dockerfile::parse("ARG X\nFROM ${X-tenants/abc/x}\nRUN true\n").unwrap();
        assert_eq!(
            from_images(&parsed, &BTreeMap::new()).unwrap(),
            ["tenants/abc/x"]
        );
    }
}
