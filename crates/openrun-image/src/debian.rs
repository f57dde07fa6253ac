//! `openrun image build --debian SUITE`: a minimal Debian image made by `debootstrap` from the
//! Debian archive, as one layer.
//!
//! debootstrap runs on the host as root, in a private mount namespace (`unshare --mount`, so
//! the `/proc` and `/sys` it mounts inside the new tree vanish with it whatever happens), into
//! a work dir of the store. It is run with `--debian-installer`, which makes it report its
//! phases and progress in a machine-readable form on descriptor 3 (`P: now end PHASE`,
//! `PF: description`, `I:`/`W:`/`E:` messages); that feeds the progress events. Its full log
//! goes to a file whose end is shown when it fails.
//!
//! The tree is then trimmed of what belongs to the host or to the download (device nodes in
//! `/dev`, which the runtime mounts itself; downloaded packages and package lists; the host's
//! hostname and resolver configuration copied in) and added to the store as one layer with
//! `PATH` set and `bash` as the command. The result is cached under a key of the suite,
//! variant, package set, mirror and architecture: a second build of the same is instant.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::build::BuildError;
use crate::cache::{key_of, Cache};
use crate::{ImageConfig, ImageRecord, ImageRef, Store};

/// The Debian archive debootstrap downloads from by default.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Packages the image gets on top of `minbase`.
pub const PACKAGES: &[&str] = &["bash", "coreutils", "ca-certificates", "git", "python3"];
/// `PATH` of the image (Debian's default for root).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Lines of debootstrap's log shown when it fails.
const LOG_LINES: usize = 30;

/// Phases debootstrap reports, in order, with their share of the whole (percent, roughly
/// as long as they take for a minimal image with a few packages).
const PHASES: &[(&str, f64)] = &[
    ("DOWNREL", 2.0),
    ("DOWNRELSIG", 1.0),
    ("DOWNPKGS", 6.0),
    ("SIZEDEBS", 1.0),
    ("DOWNDEBS", 40.0),
    ("EXTRACTPKGS", 10.0),
    ("INSTCORE", 4.0),
    ("UNPACKREQ", 10.0),
    ("CONFREQ", 10.0),
    ("UNPACKBASE", 7.0),
    ("CONFBASE", 9.0),
];

/// What to make.
#[derive(Debug, Clone)]
pub struct DebianOptions {
    /// The Debian suite (`bookworm`, `trixie`, `stable`, ...).
    pub suite: String,
    /// The name to tag it with.
    pub tag: ImageRef,
    /// The archive to download from.
    pub mirror: String,
    /// Packages on top of `minbase`.
    pub packages: Vec<String>,
    /// Make it again even when the cache has it.
    pub no_cache: bool,
}

impl DebianOptions {
    /// `SUITE` with the default mirror and packages, tagged `debian:SUITE`.
    pub fn new(suite: &str) -> Result<Self, BuildError> {
        check_suite(suite)?;
        let tag = ImageRef::parse(&format!("debian:{suite}"))?;
        Ok(Self {
            suite: suite.to_string(),
            tag,
            mirror: DEFAULT_MIRROR.to_string(),
            packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
            no_cache: false,
        })
    }
}

/// Progress of a Debian build.
#[derive(Debug)]
pub enum DebianEvent<'a> {
    /// debootstrap is missing and is being installed (with this command).
    Installing(&'a str),
    /// A new phase (`Downloading packages`, ...).
    Phase(&'a str),
    /// Overall progress, 0 to 1.
    Progress(f64),
    /// A message of debootstrap (`Retrieving libc6 2.36`).
    Info(&'a str),
    /// A warning of debootstrap.
    Warning(&'a str),
    /// The tree is being added to the store.
    Storing,
}

/// A finished Debian build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DebianReport {
    /// The tag given.
    pub image: String,
    /// Its one layer (hex sha256).
    pub layer: String,
    /// Whether it came from the cache.
    pub cached: bool,
    /// Its record as stored.
    pub record: ImageRecord,
}

/// Makes (or takes from the cache) the Debian image `options` describe and tags it.
pub fn build_debian(
    store: &Store,
    options: &DebianOptions,
    events: &mut dyn FnMut(DebianEvent<'_>),
) -> Result<DebianReport, BuildError> {
    check(options)?;
    let packages: BTreeSet<&str> = options.packages.iter().map(String::as_str).collect();
    let packages: Vec<&str> = packages.into_iter().collect();
    let key = key_of(&json!({
        "debootstrap": 1,
        "suite": options.suite,
        "variant": "minbase",
        "packages": packages,
        "mirror": options.mirror,
        "arch": std::env::consts::ARCH,
    }));
    let cache = Cache::new(store);
    let config = ImageConfig {
        env: vec![format!("PATH={PATH}")],
        cmd: vec!["bash".into()],
        labels: [
            (
                "org.openrun.debian.suite".to_string(),
                options.suite.clone(),
            ),
            (
                "org.openrun.debian.packages".to_string(),
                packages.join(","),
            ),
        ]
        .into_iter()
        .collect(),
        ..ImageConfig::default()
    };
    let source = format!("debootstrap:{} {}", options.suite, options.mirror);
    let cached = if options.no_cache {
        None
    } else {
        cache.get(&key).and_then(|e| e.layer)
    };
    let (layer, was_cached) = match cached {
        Some(layer) => (layer, true),
        None => {
            ensure_debootstrap(events)?;
            let work = store.work_dir()?;
            let root = work.path().join("rootfs");
            debootstrap(
                options,
                &packages,
                &root,
                &work.path().join("debootstrap.log"),
                events,
            )?;
            trim(&root)?;
            events(DebianEvent::Storing);
            let staged = store.stage_dir(&root, None, &source)?;
            let layer = staged.digest.clone();
            store.commit(vec![staged], None)?;
            cache.put(&key, Some(&layer))?;
            (layer, false)
        }
    };
    let record = ImageRecord {
        layers: vec![layer.clone()],
        config,
        created_at: crate::now(),
        source,
        parent: None,
        base: None,
    };
    store.put(&options.tag, &record)?;
    Ok(DebianReport {
        image: options.tag.to_string(),
        layer,
        cached: was_cached,
        record,
    })
}

fn check_suite(suite: &str) -> Result<(), BuildError> {
    let ok = suite.len() <= 32
        && suite.starts_with(|c: char| c.is_ascii_lowercase())
        && suite
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(BuildError::Invalid(format!(
            "invalid Debian suite {suite:?} (e.g. bookworm, trixie, stable)"
        )))
    }
}

fn check(options: &DebianOptions) -> Result<(), BuildError> {
    check_suite(&options.suite)?;
    for p in &options.packages {
        let ok = p.len() >= 2
            && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.')
            });
        if !ok {
            return Err(BuildError::Invalid(format!(
                "invalid Debian package name {p:?}"
            )));
        }
    }
    let mirror_ok = (options.mirror.starts_with("http://")
        || options.mirror.starts_with("https://"))
        && !options.mirror.contains(char::is_whitespace);
    if !mirror_ok {
        return Err(BuildError::Invalid(format!(
            "invalid mirror {:?}: an http:// or https:// URL",
            options.mirror
        )));
    }
    Ok(())
}

/// Finds `program` in `PATH` and the sbin directories (root's tools).
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Installs debootstrap with apt-get when it is missing.
fn ensure_debootstrap(events: &mut dyn FnMut(DebianEvent<'_>)) -> Result<(), BuildError> {
    if find_program("debootstrap").is_some() {
        return Ok(());
    }
    let Some(apt) = find_program("apt-get") else {
        return Err(BuildError::Invalid(
            "debootstrap is not installed and apt-get is not available to install it: install debootstrap"
                .into(),
        ));
    };
    events(DebianEvent::Installing("apt-get install -y debootstrap"));
    let install = || {
        Command::new(&apt)
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "debootstrap",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let mut out = install().map_err(|e| BuildError::io("cannot run apt-get", e))?;
    if !out.status.success() {
        // The package lists may be missing or stale.
        let update = Command::new(&apt)
            .args(["update", "-q"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| BuildError::io("cannot run apt-get", e))?;
        if update.status.success() {
            out = install().map_err(|e| BuildError::io("cannot run apt-get", e))?;
        }
    }
    if !out.status.success() || find_program("debootstrap").is_none() {
        let text = String::from_utf8_lossy(&out.stderr);
        return Err(BuildError::Invalid(format!(
            "debootstrap is not installed and `apt-get install debootstrap` failed: {}",
            last_lines(&text, 10)
        )));
    }
    Ok(())
}

/// Runs debootstrap into `root`, turning its progress protocol into events.
fn debootstrap(
    options: &DebianOptions,
    packages: &[&str],
    root: &Path,
    log: &Path,
    events: &mut dyn FnMut(DebianEvent<'_>),
) -> Result<(), BuildError> {
    let log_file = fs::File::create(log)
        .map_err(|e| BuildError::io(format!("cannot create {}", log.display()), e))?;
    let stderr = log_file
        .try_clone()
        .map_err(|e| BuildError::io("cannot open the debootstrap log", e))?;
    // Descriptor 3 (the protocol) to our pipe, the full log to the file.
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"exec "$@" 3>&1 >"$OPENRUN_DEBOOTSTRAP_LOG" 2>&1"#)
        .arg("sh")
        .arg("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg("--debian-installer")
        .arg(&options.suite)
        .arg(root)
        .arg(&options.mirror)
        .env("OPENRUN_DEBOOTSTRAP_LOG", log)
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .map_err(|e| BuildError::io("cannot run debootstrap (through unshare)", e))?;
    let mut protocol = Protocol::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).split(b'\n') {
            let line = line.map_err(|e| BuildError::io("cannot read debootstrap's output", e))?;
            protocol.line(&String::from_utf8_lossy(&line), events);
        }
    }
    let status = child
        .wait()
        .map_err(|e| BuildError::io("cannot wait for debootstrap", e))?;
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    if let Ok(file) = fs::File::open(log) {
        let _ = file.take(4 << 20).read_to_string(&mut text);
    }
    let message = protocol
        .error
        .unwrap_or_else(|| format!("debootstrap {status}"));
    Err(BuildError::Invalid(format!(
        "debootstrap of {} failed: {message}\n{}",
        options.suite,
        last_lines(&text, LOG_LINES)
    )))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// debootstrap's `--debian-installer` protocol: `X: NAME`, `XA: arg`..., `XF: format`.
#[derive(Debug, Default)]
struct Protocol {
    /// Args of the message being read.
    args: Vec<String>,
    /// Index of the current phase in [`PHASES`] and how far into it (0 to 1).
    phase: Option<usize>,
    within: f64,
    /// Last overall progress reported.
    reported: f64,
    /// The last error message.
    error: Option<String>,
}

impl Protocol {
    fn line(&mut self, line: &str, events: &mut dyn FnMut(DebianEvent<'_>)) {
        let Some((tag, rest)) = line
            .split_once(": ")
            .or_else(|| line.strip_suffix(':').map(|t| (t, "")))
        else {
            return;
        };
        match tag {
            "P" => {
                let mut words = rest.split_whitespace();
                let now: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
                let end: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
                if let Some(name) = words.next() {
                    if let Some(i) = PHASES.iter().position(|(p, _)| *p == name) {
                        self.phase = Some(i);
                    }
                }
                self.within = if end > 0.0 {
                    (now / end).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let total: f64 = PHASES.iter().map(|(_, w)| w).sum();
                if let Some(i) = self.phase {
                    let done: f64 = PHASES[..i].iter().map(|(_, w)| w).sum();
                    let overall = (done + PHASES[i].1 * self.within) / total;
                    if overall > self.reported {
                        self.reported = overall;
                        events(DebianEvent::Progress(overall));
                    }
                }
                self.args.clear();
            }
            "PA" | "IA" | "WA" | "EA" => self.args.push(rest.to_string()),
            "PF" => {
                let text = format_message(rest, &self.args);
                events(DebianEvent::Phase(&text));
                self.args.clear();
            }
            "IF" => {
                let text = format_message(rest, &self.args);
                events(DebianEvent::Info(&text));
                self.args.clear();
            }
            "WF" => {
                let text = format_message(rest, &self.args);
                events(DebianEvent::Warning(&text));
                self.args.clear();
            }
            "EF" => {
                self.error = Some(format_message(rest, &self.args));
                self.args.clear();
            }
            "I" | "W" | "E" => self.args.clear(),
            _ => {}
        }
    }
}

/// A printf-style format with its arguments (`%s`, `%d` and the like take them in order).
fn format_message(fmt: &str, args: &[String]) -> String {
    let mut out = String::new();
    let mut args = args.iter();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(_) => {
                // Flags and widths are not used by debootstrap's messages.
                if let Some(a) = args.next() {
                    out.push_str(a);
                }
            }
            None => out.push('%'),
        }
    }
    out
}

/// The directory `rel` of `root` when every component of it is a real directory (never a
/// link); `None` otherwise.
fn real_dir(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        path.push(c);
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return None;
        }
    }
    Some(path)
}

/// Removes the entries of `dir` that `keep` refuses (files and links only; directories
/// stay). Never follows a link.
fn remove_entries(dir: &Path, keep: impl Fn(&str, &fs::FileType) -> bool) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() || keep(&name, &kind) {
            continue;
        }
        fs::remove_file(entry.path())?;
    }
    Ok(())
}

/// Replaces the file `rel` of `root` with `contents` (a link there is replaced, not followed).
fn replace_file(root: &Path, dir: &str, name: &str, contents: &str) -> io::Result<()> {
    let Some(dir) = real_dir(root, dir) else {
        return Ok(());
    };
    let path = dir.join(name);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(&path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    file.write_all(contents.as_bytes())
}

/// Trims the new tree of what belongs to the host or the download.
fn trim(root: &Path) -> Result<(), BuildError> {
    let fail = |what: &str, e: io::Error| {
        BuildError::io(format!("cannot clean {what} of the Debian tree"), e)
    };
    // Device nodes (the runtime mounts its own /dev); directories such as pts stay.
    if let Some(dev) = real_dir(root, "dev") {
        remove_entries(&dev, |_, _| false).map_err(|e| fail("/dev", e))?;
    }
    if let Some(dir) = real_dir(root, "var/cache/apt/archives") {
        remove_entries(&dir, |name, _| !name.ends_with(".deb"))
            .map_err(|e| fail("the package cache", e))?;
    }
    if let Some(dir) = real_dir(root, "var/cache/apt") {
        remove_entries(&dir, |name, _| !name.ends_with(".bin"))
            .map_err(|e| fail("the package cache", e))?;
    }
    if let Some(dir) = real_dir(root, "var/lib/apt/lists") {
        remove_entries(&dir, |name, _| name == "lock").map_err(|e| fail("the package lists", e))?;
    }
    if let Some(dir) = real_dir(root, "var/log") {
        remove_entries(&dir, |name, _| name != "bootstrap.log").map_err(|e| fail("the logs", e))?;
    }
    // Copied from the host by debootstrap.
    replace_file(root, "etc", "hostname", "localhost\n").map_err(|e| fail("/etc/hostname", e))?;
    replace_file(root, "etc", "resolv.conf", "").map_err(|e| fail("/etc/resolv.conf", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_protocol() {
        let mut p = Protocol::default();
        let mut seen = Vec::new();
        let lines = [
            "P: 0 100 DOWNREL",
            "PF: Downloading Release file",
            "I: RETRIEVING",
            "IA: libc6",
            "IA: 2.36",
            "IF: Retrieving %s %s",
            "P: 50 100",
            "P: 1000 2000 DOWNDEBS",
            "W: X",
            "WA: a",
            "WF: warn %s",
            "E: COULDNTDL",
            "EA: git",
            "EF: Couldn't download package %s",
        ];
        for l in lines {
            p.line(l, &mut |e| seen.push(format!("{e:?}")));
        }
        assert_eq!(seen[0], "Phase(\"Downloading Release file\")");
        assert_eq!(seen[1], "Info(\"Retrieving libc6 2.36\")");
        assert!(seen[2].starts_with("Progress(0.01"), "{seen:?}");
        // Halfway through DOWNDEBS: every phase before it plus half of its share.
        assert_eq!(seen[3], "Progress(0.3)");
        assert_eq!(seen[4], "Warning(\"warn a\")");
        assert_eq!(p.error.as_deref(), Some("Couldn't download package git"));
        assert_eq!(format_message("100%% of %s", &["x".into()]), "100% of x");
    }

    #[test]
    fn options_are_checked() {
        let mut o = DebianOptions::new("bookworm").unwrap();
        assert_eq!(o.tag.to_string(), "debian:bookworm");
        assert!(check(&o).is_ok());
        o.suite = "bookworm; rm -rf /".into();
        assert!(check(&o)
            .unwrap_err()
            .to_string()
            .contains("invalid Debian suite"));
        o.suite = "bookworm".into();
        o.packages.push("--force".into());
        assert!(check(&o).unwrap_err().to_string().contains("package name"));
        o.packages.pop();
        o.mirror = "file:///etc".into();
        assert!(check(&o).unwrap_err().to_string().contains("mirror"));
    }
}
