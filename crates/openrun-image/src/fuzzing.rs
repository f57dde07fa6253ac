//! The fuzz targets of the image crate (`fuzz/fuzz_targets/`), kept in the library so the
//! corpus replay test (`tests/fuzz_corpus.rs`) runs the very same checks on stable Rust.
//! Each takes arbitrary bytes and panics when an invariant breaks; errors are fine, panics,
//! hangs and escapes are not.
//!
//! - [`tar_unpack`]: a layer blob (tar, gzip or zstd, told by its first bytes as for a
//!   `docker save` layer) unpacked into a fresh directory beside a sentinel directory.
//!   Nothing may appear beside the destination, the sentinel must be untouched (contents,
//!   owners, modes, times, link counts), the destination may hold no device but overlayfs
//!   whiteouts, and every hard link in it must have all its names inside it. A layer that
//!   unpacks is archived again ([`layer::write_tree`]), and that archive must unpack and
//!   archive to the same bytes (the deterministic tar is a fixed point).
//! - [`oci_manifest`]: an OCI layout or `docker save` archive, read as an import reads it
//!   (index, nested indexes, manifest, config, docker `manifest.json`), then every layer blob
//!   the plan names opened and read. See [`oci_manifest`] for the input format.
//! - [`dockerfile_parse`]: a Dockerfile parsed; parsed files have their line numbers in
//!   order, one `FROM` first, and words that expand; the text as a word expands without
//!   panicking, and the quoting helpers the parser uses round-trip.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FileType};

use crate::dockerfile::{self, Command, Kind, Word};
use crate::layer;
use crate::oci::{self, Compression, Source};

/// Most decompressed bytes [`tar_unpack`] takes from one input: a few KiB of zstd can hold
/// gigabytes, and a fuzzer wants many runs a second (the unpacker's own limits are tested
/// by its unit tests).
pub const MAX_UNPACKED: u64 = 4 << 20;

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // tmpfs where there is one: making a directory there costs microseconds, on a
        // journaling disk often a millisecond (the unpacks would dominate the fuzzer's time).
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!("openrun-fuzz-{}-{n}", std::process::id()));
        // A leftover of a crashed run of this same pid and number goes first.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("cannot create the fuzz scratch directory");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the walk saw of one path: kind, mode, owner, size, link count, mtime, rdev, and
/// the contents (files) or target (links).
type Seen = (u32, u32, u32, u32, i64, u64, i64, u64, Vec<u8>);

/// Every path below `dir` (fd-relative, never following a link, however deep), with what
/// it is.
fn walk(dir: &OwnedFd, prefix: &mut Vec<u8>, out: &mut BTreeMap<Vec<u8>, Seen>) {
    let mut names = Vec::new();
    let mut listing = rustix::fs::Dir::read_from(dir).expect("cannot list a directory");
    while let Some(entry) = listing.read() {
        let entry = entry.expect("cannot list a directory");
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for name in names {
        let st = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
            .expect("cannot stat an entry");
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        prefix.extend_from_slice(&name);
        let kind = FileType::from_raw_mode(st.st_mode);
        let content = match kind {
            FileType::RegularFile => {
                let fd = rustix::fs::openat(
                    dir,
                    name.as_slice(),
                    rustix::fs::OFlags::RDONLY
                        | rustix::fs::OFlags::NOFOLLOW
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .expect("cannot open a file");
                let mut bytes = Vec::new();
                File::from(fd)
                    .read_to_end(&mut bytes)
                    .expect("cannot read a file");
                bytes
            }
            FileType::Symlink => rustix::fs::readlinkat(dir, name.as_slice(), Vec::new())
                .expect("cannot read a link")
                .into_bytes(),
            _ => Vec::new(),
        };
        out.insert(
            prefix.clone(),
            (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink as u32,
                st.st_mtime,
                st.st_rdev,
                st.st_size,
                st.st_ino,
                content,
            ),
        );
        if kind == FileType::Directory {
            let sub = layer::open_dir_at(dir, &name).expect("cannot open a directory");
            walk(&sub, prefix, out);
        }
        prefix.truncate(len);
    }
}

fn tree(path: &Path) -> BTreeMap<Vec<u8>, Seen> {
    let fd = layer::open_dir_path(path).expect("cannot open a directory");
    let mut out = BTreeMap::new();
    walk(&fd, &mut Vec::new(), &mut out);
    out
}

/// A destination beside a sentinel directory (a file, a directory, a link into it) that an
/// unpack must leave alone.
struct Arena {
    scratch: Scratch,
    sentinel: BTreeMap<Vec<u8>, Seen>,
}

impl Arena {
    fn new() -> Self {
        let scratch = Scratch::new();
        let root = &scratch.0;
        std::fs::create_dir(root.join("dest")).expect("mkdir");
        let sentinel = root.join("sentinel");
        std::fs::create_dir_all(sentinel.join("dir")).expect("mkdir");
        std::fs::write(sentinel.join("file"), b"sentinel").expect("write");
        std::fs::write(sentinel.join("dir/inner"), b"inner").expect("write");
        std::os::unix::fs::symlink("file", sentinel.join("link")).expect("symlink");
        let sentinel = tree(&sentinel);
        Self { scratch, sentinel }
    }

    fn dest(&self) -> PathBuf {
        self.scratch.0.join("dest")
    }

    /// The invariants of an unpack into `dest`, whatever it returned.
    fn check(&self, dest: &Path) {
        let mut beside: Vec<_> = std::fs::read_dir(&self.scratch.0)
            .expect("list the scratch directory")
            .map(|e| e.expect("list").file_name().as_bytes().to_vec())
            .collect();
        beside.sort();
        let expected: &[&[u8]] = if dest.file_name() == Some("dest2".as_ref()) {
            &[b"dest", b"dest2", b"sentinel"]
        } else {
            &[b"dest", b"sentinel"]
        };
        assert_eq!(beside, expected, "an unpack wrote beside its destination");
        assert_eq!(
            tree(&self.scratch.0.join("sentinel")),
            self.sentinel,
            "an unpack changed the sentinel directory beside its destination"
        );
        let unpacked = tree(dest);
        let mut names_of: HashMap<u64, (u32, u32)> = HashMap::new();
        for (path, seen) in &unpacked {
            let kind = FileType::from_raw_mode(seen.0);
            let shown = String::from_utf8_lossy(path);
            match kind {
                FileType::BlockDevice => panic!("the unpack made a block device {shown}"),
                FileType::CharacterDevice => {
                    assert_eq!(
                        seen.5, 0,
                        "the unpack made a device {shown} (not a whiteout)"
                    )
                }
                FileType::Socket => panic!("the unpack made a socket {shown}"),
                _ => {}
            }
            if kind != FileType::Directory {
                let entry = names_of.entry(seen.7).or_insert((0, seen.3));
                entry.0 += 1;
            }
        }
        for (ino, (found, nlink)) in names_of {
            assert_eq!(
                found, nlink,
                "inode {ino} has {nlink} links but {found} in the layer: a hard link leads out"
            );
        }
    }
}

/// A layer blob (tar, gzip or zstd) unpacked into a fresh directory; panics when an
/// invariant breaks. See the module documentation.
pub fn tar_unpack(data: &[u8]) {
    let arena = Arena::new();
    let dest = arena.dest();
    let started = now();
    let result = oci::decompress(data, Compression::Detect, "fuzz layer")
        .and_then(|r| layer::unpack(r.take(MAX_UNPACKED), &dest, "fuzz layer"));
    let ended = now();
    arena.check(&dest);
    let Ok(stats) = result else {
        return;
    };
    // Only directories made for an entry's parents take the clock's time; anything else has
    // its entry's (an archive holding the current second is as good as never written). A
    // failed unpack is thrown away, and may leave a file it was writing.
    for (path, seen) in tree(&dest) {
        if FileType::from_raw_mode(seen.0) != FileType::Directory {
            assert!(
                !(started - 1..=ended + 1).contains(&seen.4),
                "{} has the time of the unpack, not of its entry",
                String::from_utf8_lossy(&path)
            );
        }
    }
    assert!(
        stats.entries <= MAX_UNPACKED / 512,
        "more entries than headers"
    );
    assert!(
        stats.bytes <= MAX_UNPACKED,
        "more bytes than the archive held"
    );
    // Archived again, unpacked, archived: the same bytes.
    let mut first = Vec::new();
    layer::write_tree(&dest, None, &mut first).expect("an unpacked layer archives");
    let dest2 = arena.scratch.0.join("dest2");
    std::fs::create_dir(&dest2).expect("mkdir");
    layer::unpack(first.as_slice(), &dest2, "archived layer")
        .expect("an archive of an unpacked layer unpacks");
    arena.check(&dest2);
    check_times(&first, &dest2);
    let mut second = Vec::new();
    layer::write_tree(&dest2, None, &mut second).expect("archives");
    assert!(
        first == second,
        "unpacking and archiving a layer's archive changes it"
    );
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every entry of the archive `write_tree` made, unpacked into `dest`, has the archive's
/// owner and time there: nothing an unpack makes from an entry takes the clock's time.
fn check_times(archive: &[u8], dest: &Path) {
    let unpacked = tree(dest);
    let mut archive = tar::Archive::new(archive);
    for entry in archive.entries().expect("a tree archive reads") {
        let entry = entry.expect("a tree archive reads");
        let raw = entry.path_bytes().into_owned();
        let raw = raw.strip_suffix(b"/").unwrap_or(&raw);
        let (parent, name) = match raw.iter().rposition(|b| *b == b'/') {
            Some(i) => raw.split_at(i + 1),
            None => (&raw[..0], raw),
        };
        if name == b".wh..wh..opq" {
            continue;
        }
        // A whiteout `.wh.NAME` is the device NAME on disk.
        let path = [parent, name.strip_prefix(b".wh.").unwrap_or(name)].concat();
        let shown = String::from_utf8_lossy(&path).into_owned();
        let seen = unpacked
            .get(&path)
            .unwrap_or_else(|| panic!("{shown} of the archive was not unpacked"));
        let header = entry.header();
        let ids = (u64::from(seen.1), u64::from(seen.2));
        assert_eq!(
            ids,
            (header.uid().expect("uid"), header.gid().expect("gid")),
            "{shown} has another owner than its entry"
        );
        assert_eq!(
            u64::try_from(seen.4).ok(),
            header.mtime().ok(),
            "{shown} has another time than its entry"
        );
    }
}

/// An image archive read as an import reads it; panics when an invariant breaks.
///
/// The first byte chooses the input format:
/// - `o`: an OCI layout; the rest is documents separated by NUL bytes: `index.json`, then
///   blobs stored as `blobs/sha256/<their sha256>`;
/// - `d`: a `docker save` archive; the rest is documents separated by NUL bytes:
///   `manifest.json`, then files stored as `<their sha256>.json` and `blobs/sha256/<sha256>`;
/// - anything else: the rest is the archive itself (a tar).
///
/// In documents, `@dN@` becomes `sha256:` and the sha256 of document N, `@hN@` that sha256
/// alone and `@sN@` document N's size (N counts from 0, from the first document; only later
/// documents can be named), so a fuzzer can write valid descriptors.
pub fn oci_manifest(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let archive = match mode {
        b'o' | b'd' => layout_tar(mode == b'o', rest),
        _ => rest.to_vec(),
    };
    let fd = rustix::fs::memfd_create("openrun-fuzz-archive", rustix::fs::MemfdFlags::CLOEXEC)
        .expect("memfd_create");
    let mut file = File::from(fd);
    file.write_all(&archive).expect("write the archive");
    file.rewind().expect("rewind the archive");
    let Ok(source) = Source::tar(file, "fuzz archive") else {
        return;
    };
    let Ok((format, plan)) = oci::plan(&source, "fuzz archive") else {
        return;
    };
    assert!(!plan.layers.is_empty(), "a plan without layers");
    assert!(
        plan.layers.len() <= crate::MAX_LAYERS,
        "a plan with more layers than the store takes"
    );
    for layer in &plan.layers {
        assert!(
            crate::digest::is_hex64(&layer.diff_id),
            "a malformed diff id {:?}",
            layer.diff_id
        );
        match format {
            "oci" => {
                let hex = layer.digest.as_deref().expect("an OCI layer has a digest");
                assert!(crate::digest::is_hex64(hex), "a malformed digest {hex:?}");
                assert_eq!(layer.blob, format!("blobs/sha256/{hex}"));
                assert!(layer.size.is_some(), "an OCI layer has a size");
                assert_ne!(layer.compression, Compression::Detect);
            }
            "docker-archive" => {
                assert!(layer.digest.is_none() && layer.size.is_none());
                assert_eq!(layer.compression, Compression::Detect);
            }
            other => panic!("unknown format {other}"),
        }
        // Read the blob as an import would, checking it stays inside its tar entry.
        let Ok(mut reader) = source.open_file(&layer.blob, &layer.what) else {
            continue;
        };
        let (_, size) = source
            .tar_entry(&layer.blob)
            .expect("an opened blob is in the tar");
        let mut read = 0u64;
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n as u64,
            }
            assert!(read <= size, "a blob read past its tar entry");
            if read >= 1 << 20 {
                break;
            }
        }
    }
    if format == "docker-archive" && mode == b'd' {
        // The documents' own archive is well-formed: a plan names files of it.
        assert!(source.tar_entry("manifest.json").is_some());
    }
}

/// The tar of an OCI layout or `docker save` archive made of the NUL-separated documents in
/// `rest` (see [`oci_manifest`]).
fn layout_tar(oci: bool, rest: &[u8]) -> Vec<u8> {
    let mut docs: Vec<Vec<u8>> = rest.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    docs.truncate(16);
    // Later documents first: a document names only documents after it.
    let mut hexes: Vec<Option<String>> = vec![None; docs.len()];
    for i in (0..docs.len()).rev() {
        let mut doc = std::mem::take(&mut docs[i]);
        for (j, hex) in hexes.iter().enumerate().skip(i + 1) {
            let hex = hex.as_deref().expect("later documents are done");
            doc = replace(
                &doc,
                format!("@d{j}@").as_bytes(),
                format!("sha256:{hex}").as_bytes(),
            );
            doc = replace(&doc, format!("@h{j}@").as_bytes(), hex.as_bytes());
            doc = replace(
                &doc,
                format!("@s{j}@").as_bytes(),
                docs[j].len().to_string().as_bytes(),
            );
        }
        hexes[i] = Some(crate::digest::sha256_of(&doc));
        docs[i] = doc;
    }
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, data).expect("append");
    };
    let mut docs = docs.into_iter().zip(hexes);
    if let Some((first, _)) = docs.next() {
        if oci {
            add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
            add("index.json", &first);
        } else {
            add("manifest.json", &first);
        }
    }
    for (doc, hex) in docs {
        let hex = hex.expect("hashed");
        add(&format!("blobs/sha256/{hex}"), &doc);
        if !oci {
            add(&format!("{hex}.json"), &doc);
        }
    }
    tar.into_inner().expect("finish")
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// A Dockerfile parsed (and its text expanded as a word); panics when an invariant breaks.
/// Input that is not UTF-8 is skipped (the CLI refuses it before parsing).
pub fn dockerfile_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    match dockerfile::parse(text) {
        Ok(file) => {
            let mut last = 0;
            for (i, ins) in file
                .global_args
                .iter()
                .chain(&file.instructions)
                .enumerate()
            {
                assert!(ins.line > last, "instructions out of line order");
                assert!(ins.line <= lines, "an instruction past the last line");
                last = ins.line;
                let is_from = matches!(ins.kind, Kind::From { .. });
                let global = i < file.global_args.len();
                if global {
                    assert!(matches!(ins.kind, Kind::Arg(_)), "a global that is no ARG");
                } else {
                    assert_eq!(is_from, i == file.global_args.len(), "FROM not first, once");
                }
                assert!(
                    ins.text.starts_with(|c: char| c.is_ascii_uppercase()),
                    "instruction text {:?}",
                    ins.text
                );
                for word in words(&ins.kind) {
                    // Checked at parse time with every variable set.
                    word.expand(&|_| Some("x".into()))
                        .expect("a parsed word expands");
                    let _ = word.expand(&|_| None);
                }
            }
        }
        Err(e) => {
            if let Some(line) = e.line {
                assert!(
                    line >= 1 && line <= lines.max(1),
                    "error line {line} of {lines}"
                );
            }
            assert!(!e.message.is_empty(), "an error without a message");
        }
    }
    let vars = |name: &str| name.len().is_multiple_of(2).then(|| name.to_uppercase());
    for escape in ['\\', '`'] {
        let _ = Word::new(text, escape).expand(&vars);
        assert_eq!(
            Word::new(&dockerfile::quote_literal(text), escape).expand(&vars),
            Ok(text.to_string()),
            "a quoted literal does not expand to itself"
        );
        if !text.contains('$') {
            assert_eq!(
                Word::new(&dockerfile::escape_json_word(text, escape), escape).expand(&vars),
                Ok(text.to_string()),
                "a JSON-form word does not expand to itself"
            );
        }
    }
}

/// The words of an instruction.
fn words(kind: &Kind) -> Vec<&Word> {
    match kind {
        Kind::From { image } => vec![image],
        Kind::Arg(args) => args.iter().filter_map(|(_, d)| d.as_ref()).collect(),
        Kind::Copy(spec) | Kind::Add(spec) => spec
            .sources
            .iter()
            .chain([&spec.dest])
            .chain(spec.chown.as_ref())
            .chain(spec.chmod.as_ref())
            .collect(),
        Kind::Env(pairs) | Kind::Label(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
        Kind::Workdir(w) | Kind::User(w) => vec![w],
        Kind::Expose(ws) => ws.iter().collect(),
        Kind::Run(c) | Kind::Cmd(c) | Kind::Entrypoint(c) => {
            if let Command::Exec(argv) = c {
                assert!(!argv.is_empty(), "an exec form without a program");
            }
            Vec::new()
        }
        Kind::Shell(argv) => {
            assert!(!argv.is_empty(), "SHELL without a program");
            Vec::new()
        }
    }
}
