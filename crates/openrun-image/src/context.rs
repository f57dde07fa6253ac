//! The build context: the directory whose files `COPY` and `ADD` take.
//!
//! Every path is resolved relative to the context's directory descriptor with
//! `RESOLVE_IN_ROOT`, so a source path or a symbolic link in it (`link -> /etc/shadow`,
//! `link -> ../../..`) is resolved as if the context were `/`: nothing outside it can be
//! read. A named source that is a symbolic link is followed (inside the context); links met
//! while walking a directory are copied as links. Sockets, fifos and devices are skipped.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::layer::MAX_DEPTH;

/// Something wrong with a source (not found, outside the context, unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError(pub String);

type Result<T> = std::result::Result<T, SourceError>;

/// One entry of a source, as [`Context::walk`] visits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path below the source (`""` for the source itself), `/`-separated.
    pub rel: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, seconds and nanoseconds.
    pub mtime: (i64, i64),
}

/// The kinds of entry copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory (visited before its contents).
    Dir,
    /// A regular file (its contents come with the visit).
    File,
    /// A symbolic link and its target.
    Symlink(PathBuf),
}

/// An open build context.
#[derive(Debug)]
pub struct Context {
    root: OwnedFd,
    path: PathBuf,
    ignore: Ignore,
}

/// The file of a context that names what its sources leave out.
pub const IGNORE_FILE: &str = ".dockerignore";
/// Largest `.dockerignore` read.
const MAX_IGNORE_FILE: u64 = 1 << 20;

/// What [`Context::walk`] calls for each entry (with the open file, for files); an error
/// stops the walk.
pub type Visitor<'a> = dyn FnMut(&Entry, Option<&mut File>) -> std::result::Result<(), String> + 'a;

/// What a walk skipped (sockets, fifos, devices), for warnings.
pub type Skipped = Vec<String>;

impl Context {
    /// Opens the context directory and reads its `.dockerignore`, if any.
    pub fn open(path: &Path) -> Result<Self> {
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            SourceError(format!(
                "cannot open the build context {}: {e}",
                path.display()
            ))
        })?;
        let mut ctx = Self {
            root,
            path: path.to_path_buf(),
            ignore: Ignore::default(),
        };
        match ctx.open_in(IGNORE_FILE, OFlags::PATH) {
            Ok(_) => {
                let mut text = String::new();
                ctx.open_file(IGNORE_FILE)?
                    .take(MAX_IGNORE_FILE)
                    .read_to_string(&mut text)
                    .map_err(|e| SourceError(format!("cannot read {IGNORE_FILE}: {e}")))?;
                ctx.ignore = Ignore::parse(&text)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SourceError(format!("cannot read {IGNORE_FILE}: {e}"))),
        }
        Ok(ctx)
    }

    /// The context's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_in(&self, rel: &str, flags: OFlags) -> io::Result<OwnedFd> {
        let rel = if rel.is_empty() { "." } else { rel };
        Ok(rustix::fs::openat2(
            &self.root,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?)
    }

    /// The source paths `pattern` names, relative to the context and sorted: itself when
    /// it has no `*`, `?` or `[`, else every match (`*` does not cross `/`).
    pub fn expand(&self, pattern: &str) -> Result<Vec<String>> {
        let clean = clean_relative(pattern)?;
        if !has_meta(&clean) {
            if self.left_out(&clean) {
                return Err(SourceError(format!(
                    "{pattern:?} is excluded by {IGNORE_FILE}"
                )));
            }
            return Ok(vec![clean]);
        }
        let mut found = vec![String::new()];
        for component in clean.split('/') {
            let mut next = Vec::new();
            for prefix in &found {
                if !has_meta(component) {
                    next.push(join(prefix, component));
                    continue;
                }
                let Ok(dir) = self.open_in(prefix, OFlags::RDONLY | OFlags::DIRECTORY) else {
                    continue;
                };
                let mut names = list(&dir).map_err(|e| {
                    SourceError(format!(
                        "cannot list {:?} in the build context: {e}",
                        prefix
                    ))
                })?;
                names.sort();
                for name in names {
                    if glob_match(component, &name)? {
                        next.push(join(prefix, &name));
                    }
                }
            }
            found = next;
        }
        found.retain(|p| !self.left_out(p) && self.open_in(p, OFlags::PATH).is_ok());
        if found.is_empty() {
            return Err(SourceError(format!(
                "no file in the build context matches {pattern:?}"
            )));
        }
        Ok(found)
    }

    /// Whether `.dockerignore` leaves the source `rel` out: an excluded directory stays
    /// when an exception may bring back something below it.
    fn left_out(&self, rel: &str) -> bool {
        self.ignore.excluded(rel)
            && !(self.ignore.has_exceptions()
                && self.kind(rel).is_ok_and(|k| k == FileType::Directory))
    }

    /// What the source `rel` is (following a final symbolic link inside the context).
    pub fn kind(&self, rel: &str) -> Result<FileType> {
        let fd = self
            .open_in(rel, OFlags::PATH)
            .map_err(|e| not_found(rel, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| not_found(rel, e.into()))?;
        Ok(FileType::from_raw_mode(st.st_mode))
    }

    /// Opens the regular file `rel` for reading.
    pub fn open_file(&self, rel: &str) -> Result<File> {
        let fd = self
            .open_in(rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)
            .map_err(|e| not_found(rel, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| not_found(rel, e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(SourceError(format!("{rel:?} is not a regular file")));
        }
        Ok(File::from(fd))
    }

    /// Visits the source `rel` and, for a directory, everything below it (names sorted,
    /// directories before their contents): `visit` gets each entry and, for files, the open
    /// file. Returns what was skipped.
    pub fn walk(&self, rel: &str, visit: &mut Visitor<'_>) -> Result<Skipped> {
        if self.left_out(rel) {
            return Err(SourceError(format!("{rel:?} is excluded by {IGNORE_FILE}")));
        }
        let fd = self
            .open_in(rel, OFlags::PATH)
            .map_err(|e| not_found(rel, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| not_found(rel, e.into()))?;
        let mut skipped = Vec::new();
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let dir = self
                    .open_in(rel, OFlags::RDONLY | OFlags::DIRECTORY)
                    .map_err(|e| not_found(rel, e))?;
                let entry = entry("", FileType::Directory, &st);
                visit(&entry, None).map_err(SourceError)?;
                self.walk_dir(&dir, rel, "", 1, visit, &mut skipped)?;
            }
            FileType::RegularFile => {
                let mut file = self.open_file(rel)?;
                let entry = entry("", FileType::RegularFile, &st);
                visit(&entry, Some(&mut file)).map_err(SourceError)?;
            }
            _ => skipped.push(rel.to_string()),
        }
        Ok(skipped)
    }

    fn walk_dir(
        &self,
        dir: &OwnedFd,
        source: &str,
        below: &str,
        depth: usize,
        visit: &mut Visitor<'_>,
        skipped: &mut Skipped,
    ) -> Result<()> {
        let shown = |name: &str| join(&join(source, below), name);
        if depth > MAX_DEPTH {
            return Err(SourceError(format!(
                "{:?} is nested more than {MAX_DEPTH} directories deep",
                join(source, below)
            )));
        }
        let mut names = list(dir)
            .map_err(|e| SourceError(format!("cannot list {:?}: {e}", join(source, below))))?;
        names.sort();
        for name in names {
            let rel = join(below, &name);
            let in_context = join(source, &rel);
            let excluded = self.ignore.excluded(&in_context);
            let st = rustix::fs::statat(dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| SourceError(format!("cannot read {:?}: {e}", shown(&name))))?;
            let kind = FileType::from_raw_mode(st.st_mode);
            // An excluded directory is still walked when an exception may bring back
            // something below it.
            if excluded && (kind != FileType::Directory || !self.ignore.has_exceptions()) {
                continue;
            }
            match kind {
                FileType::Directory => {
                    let sub = rustix::fs::openat(
                        dir,
                        name.as_str(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| SourceError(format!("cannot open {:?}: {e}", shown(&name))))?;
                    visit(&entry(&rel, kind, &st), None).map_err(SourceError)?;
                    self.walk_dir(&sub, source, &rel, depth + 1, visit, skipped)?;
                }
                FileType::RegularFile => {
                    let fd = rustix::fs::openat(
                        dir,
                        name.as_str(),
                        OFlags::RDONLY
                            | OFlags::NOFOLLOW
                            | OFlags::NONBLOCK
                            | OFlags::NOCTTY
                            | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| SourceError(format!("cannot open {:?}: {e}", shown(&name))))?;
                    let now = rustix::fs::fstat(&fd)
                        .map_err(|e| SourceError(format!("cannot read {:?}: {e}", shown(&name))))?;
                    if FileType::from_raw_mode(now.st_mode) != FileType::RegularFile {
                        return Err(SourceError(format!(
                            "{:?} changed while being copied",
                            shown(&name)
                        )));
                    }
                    let mut file = File::from(fd);
                    visit(&entry(&rel, kind, &now), Some(&mut file)).map_err(SourceError)?;
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(dir, name.as_str(), Vec::new())
                        .map_err(|e| SourceError(format!("cannot read {:?}: {e}", shown(&name))))?;
                    let target: std::ffi::OsString =
                        std::os::unix::ffi::OsStringExt::from_vec(target.into_bytes());
                    let target = PathBuf::from(target);
                    let mut e = entry(&rel, kind, &st);
                    e.kind = EntryKind::Symlink(target);
                    visit(&e, None).map_err(SourceError)?;
                }
                _ => skipped.push(shown(&name)),
            }
        }
        Ok(())
    }
}

/// The rules of a `.dockerignore`, as Docker reads them: one pattern a line (`#` comments,
/// blank lines skipped), paths relative to the context (a leading `/` or `./` dropped),
/// `*`, `?`, `[...]` within a name and `**` for any number of directories; a pattern that
/// names a directory leaves out everything below it; `!pattern` brings matches back. The
/// last rule that matches a path (or one of its parents) decides.
#[derive(Debug, Default, Clone)]
pub struct Ignore {
    rules: Vec<(Vec<String>, bool)>,
}

impl Ignore {
    /// Parses the text of a `.dockerignore`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut rules = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (pattern, exception) = match line.strip_prefix('!') {
                Some(p) => (p.trim(), true),
                None => (line, false),
            };
            // A pattern that climbs out of the context matches nothing in it.
            let Ok(clean) = clean_relative(pattern) else {
                continue;
            };
            if clean.is_empty() {
                continue;
            }
            let parts: Vec<String> = clean.split('/').map(str::to_string).collect();
            for part in &parts {
                glob_match(part, "").map_err(|_| {
                    SourceError(format!("bad pattern {pattern:?} in {IGNORE_FILE}"))
                })?;
            }
            rules.push((parts, exception));
        }
        Ok(Self { rules })
    }

    /// Whether the context path `rel` is left out.
    pub fn excluded(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return false;
        }
        let path: Vec<&str> = rel.split('/').collect();
        let mut out = false;
        for (pattern, exception) in &self.rules {
            if (1..=path.len()).any(|n| match_parts(pattern, &path[..n])) {
                out = !exception;
            }
        }
        out
    }

    fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|(_, exception)| *exception)
    }
}

/// Whether the path components match the pattern's (`**` matching any number of them).
fn match_parts(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => (0..=path.len()).any(|i| match_parts(rest, &path[i..])),
        Some((p, rest)) => match path.split_first() {
            Some((name, path_rest)) => {
                glob_match(p, name).unwrap_or(false) && match_parts(rest, path_rest)
            }
            None => false,
        },
    }
}

fn entry(rel: &str, kind: FileType, st: &rustix::fs::Stat) -> Entry {
    Entry {
        rel: rel.to_string(),
        kind: match kind {
            FileType::Directory => EntryKind::Dir,
            _ => EntryKind::File,
        },
        mode: st.st_mode & 0o7777,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mtime: (st.st_mtime, i64::try_from(st.st_mtime_nsec).unwrap_or(0)),
    }
}

fn not_found(rel: &str, e: io::Error) -> SourceError {
    let shown = if rel.is_empty() { "." } else { rel };
    match e.kind() {
        io::ErrorKind::NotFound => {
            SourceError(format!("{shown:?} does not exist in the build context"))
        }
        _ => SourceError(format!("cannot open {shown:?} in the build context: {e}")),
    }
}

/// Names in a directory (without `.` and `..`); names that are not UTF-8 are refused.
fn list(dir: &OwnedFd) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir.as_fd())? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        match std::str::from_utf8(name) {
            Ok(n) => names.push(n.to_string()),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the name {:?} is not UTF-8", String::from_utf8_lossy(name)),
                ))
            }
        }
    }
    Ok(names)
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

/// A source path made relative to the context and lexically clean (`""` is the context
/// itself); one that climbs out of it is refused.
pub fn clean_relative(path: &str) -> Result<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(SourceError(format!(
                        "{path:?} is outside the build context"
                    )));
                }
            }
            c => out.push(c),
        }
    }
    Ok(out.join("/"))
}

fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Whether `name` matches the shell pattern `pattern` (`*`, `?`, `[a-z]`, `[^x]` or
/// `[!x]`, `\` escaping), as Go's `filepath.Match` does for one path component.
pub fn glob_match(pattern: &str, name: &str) -> Result<bool> {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    matches(&p, &n).ok_or_else(|| SourceError(format!("bad pattern {pattern:?}")))
}

/// `None` for a malformed pattern.
fn matches(p: &[char], n: &[char]) -> Option<bool> {
    let Some((&first, rest)) = p.split_first() else {
        return Some(n.is_empty());
    };
    match first {
        '*' => {
            for skip in 0..=n.len() {
                if matches(rest, &n[skip..])? {
                    return Some(true);
                }
            }
            Some(false)
        }
        '?' => match n.split_first() {
            Some((_, n_rest)) => matches(rest, n_rest),
            None => Some(false),
        },
        '[' => {
            let (class_len, hit) = class(rest, n.first().copied())?;
            match n.split_first() {
                Some((_, n_rest)) if hit => matches(&rest[class_len..], n_rest),
                _ => Some(false),
            }
        }
        '\\' => {
            let (&lit, rest) = rest.split_first()?;
            match n.split_first() {
                Some((&c, n_rest)) if c == lit => matches(rest, n_rest),
                _ => Some(false),
            }
        }
        c => match n.split_first() {
            Some((&x, n_rest)) if x == c => matches(rest, n_rest),
            _ => Some(false),
        },
    }
}

/// Parses a character class after `[`: its length (through `]`) and whether `c` is in it.
fn class(p: &[char], c: Option<char>) -> Option<(usize, bool)> {
    let mut i = 0;
    let negated = matches!(p.first(), Some('^' | '!'));
    if negated {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let mut lo = *p.get(i)?;
        if lo == ']' && !first {
            i += 1;
            break;
        }
        first = false;
        if lo == '\\' {
            i += 1;
            lo = *p.get(i)?;
        }
        i += 1;
        let mut hi = lo;
        if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|&x| x != ']') {
            hi = p[i + 1];
            if hi == '\\' {
                hi = *p.get(i + 2)?;
                i += 1;
            }
            i += 2;
        }
        if let Some(c) = c {
            if lo <= c && c <= hi {
                hit = true;
            }
        }
    }
    Some((i, hit != negated))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn globs() {
        let cases = [
            ("*.txt", "a.txt", true),
            ("*.txt", ".hidden.txt", true),
            ("*.txt", "a.txt.bak", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[a-c]x", "bx", true),
            ("[^a-c]x", "bx", false),
            ("[!a-c]x", "dx", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("*", "", true),
            ("[]]", "]", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(glob_match(p, n).unwrap(), want, "{p} {n}");
        }
        assert!(glob_match("[a-", "a").is_err());
        assert_eq!(clean_relative("./a/../b/").unwrap(), "b");
        assert_eq!(clean_relative("/abs/x").unwrap(), "abs/x");
        assert_eq!(clean_relative(".").unwrap(), "");
        assert!(clean_relative("a/../../x").is_err());
    }

    #[test]
    fn dockerignore_rules() {
        let ignore = Ignore::parse(
            "# comment\n\n/.git\n*.log\n**/node_modules\ndocs\n!docs/keep.md\n./build/*.o\n../out\n",
        )
        .unwrap();
        for (path, out) in [
            (".git", true),
            (".git/config", true),
            ("a.log", true),
            ("sub/a.log", false),
            ("node_modules/x", true),
            ("a/b/node_modules/c", true),
            ("docs", true),
            ("docs/x.md", true),
            ("docs/keep.md", false),
            ("build/a.o", true),
            ("build/a.c", false),
            ("src/main.rs", false),
            ("", false),
        ] {
            assert_eq!(ignore.excluded(path), out, "{path}");
        }
        assert!(ignore.has_exceptions());
        assert!(Ignore::parse("[a-\n").is_err());
    }

    #[test]
    fn ignored_sources_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for f in ["a.txt", "b.log", "keep/x", "skip/y", "skip/z.md"] {
            std::fs::create_dir_all(p.join(f).parent().unwrap()).unwrap();
            std::fs::write(p.join(f), f).unwrap();
        }
        std::fs::write(p.join(IGNORE_FILE), "*.log\nskip\n!skip/*.md\n").unwrap();
        let ctx = Context::open(p).unwrap();
        let mut seen = Vec::new();
        ctx.walk("", &mut |e, _| {
            seen.push(e.rel.clone());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                "",
                ".dockerignore",
                "a.txt",
                "keep",
                "keep/x",
                "skip",
                "skip/z.md"
            ]
        );
        assert_eq!(
            ctx.expand("*").unwrap(),
            [".dockerignore", "a.txt", "keep", "skip"]
        );
        assert!(ctx
            .expand("b.log")
            .unwrap_err()
            .0
            .contains("excluded by .dockerignore"));
        assert!(ctx.walk("skip/y", &mut |_, _| Ok(())).is_err());
    }

    #[test]
    fn sources_stay_inside_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let ctx_path = dir.path().join("ctx");
        std::fs::create_dir_all(ctx_path.join("sub/deep")).unwrap();
        std::fs::write(ctx_path.join("a.txt"), "a").unwrap();
        std::fs::write(ctx_path.join("b.txt"), "b").unwrap();
        std::fs::write(ctx_path.join("sub/deep/f"), "f").unwrap();
        std::fs::write(dir.path().join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink("../secret", ctx_path.join("up")).unwrap();
        std::os::unix::fs::symlink("/a.txt", ctx_path.join("abs")).unwrap();
        let ctx = Context::open(&ctx_path).unwrap();
        assert_eq!(ctx.expand("*.txt").unwrap(), ["a.txt", "b.txt"]);
        assert_eq!(ctx.expand("s*/d*/f").unwrap(), ["sub/deep/f"]);
        assert!(ctx.expand("*.none").unwrap_err().0.contains("matches"));
        // `..` in a link stops at the context's root: the file outside is never read.
        let e = ctx.open_file("up").unwrap_err();
        assert!(e.0.contains("does not exist"), "{e:?}");
        // An absolute link resolves inside the context.
        let mut s = String::new();
        ctx.open_file("abs")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "a");
        let mut seen = Vec::new();
        let skipped = ctx
            .walk("", &mut |e, f| {
                let mut data = String::new();
                if let Some(f) = f {
                    f.read_to_string(&mut data).unwrap();
                }
                seen.push(format!("{}:{:?}:{data}", e.rel, e.kind));
                Ok(())
            })
            .unwrap();
        assert!(skipped.is_empty());
        assert_eq!(
            seen,
            [
                ":Dir:",
                "a.txt:File:a",
                "abs:Symlink(\"/a.txt\"):",
                "b.txt:File:b",
                "sub:Dir:",
                "sub/deep:Dir:",
                "sub/deep/f:File:f",
                "up:Symlink(\"../secret\"):"
            ]
        );
    }
}
