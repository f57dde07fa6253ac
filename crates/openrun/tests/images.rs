//! The image store end to end: OCI layouts made by umoci (an independent tool), archives this
//! test crafts (docker save and OCI tars, with whiteouts, opaque directories, gzip and zstd
//! layers, and every kind of bad input), imports run concurrently, prune against live
//! sandboxes, and sandboxes made from images by `openrun run`, `create` and the server.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::*;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs a tool the test needs (installed by scripts/test); fails, never skips, without it.
fn tool(program: &str, args: &[&str], cwd: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "id", "pwd", "env", "echo", "test", "touch", "mkdir", "rm", "sleep", "stat",
];

/// A directory with a static busybox, its applets, a passwd with alice (1000) and /work.
fn busybox_rootfs(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("work")).unwrap();
    fs::copy(BUSYBOX, dir.join("bin/busybox")).expect("busybox-static is needed");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:alice:/home/alice:/bin/sh\n",
    )
    .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nalice:x:1000:\n").unwrap();
    std::os::unix::fs::chown(dir.join("work"), Some(1000), Some(1000)).unwrap();
}

/// An OCI layout made by umoci from a busybox directory, with Env, WorkingDir, User and Cmd.
fn umoci_layout(base: &Path) -> PathBuf {
    let rootfs = base.join("rootfs");
    busybox_rootfs(&rootfs);
    tool("umoci", &["init", "--layout", "layout"], base);
    tool("umoci", &["new", "--image", "layout:latest"], base);
    tool(
        "umoci",
        &["insert", "--image", "layout:latest", "rootfs", "/"],
        base,
    );
    tool(
        "umoci",
        &[
            "config",
            "--image",
            "layout:latest",
            "--config.env",
            "GREETING=hello from the image",
            "--config.env",
            "PATH=/bin",
            "--config.workingdir",
            "/work",
            "--config.user",
            "1000",
            "--config.cmd",
            "sh",
            "--config.cmd",
            "-c",
            "--config.cmd",
            "echo \"$GREETING as $(id -u) in $(pwd)\"",
        ],
        base,
    );
    base.join("layout")
}

/// An uncompressed layer tar under construction.
struct LayerTar(tar::Builder<Vec<u8>>);

impl LayerTar {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    }

    fn dir(mut self, name: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }

    fn file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o755, data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    fn symlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    /// An entry with any name and link (the builder refuses `..` and absolute names).
    fn raw(mut self, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Self {
        let mut h = Self::header(kind, 0o644, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn device(mut self, name: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }

    /// A busybox base: /bin with the applets, /etc/passwd.
    fn busybox(self) -> Self {
        let mut t = self
            .dir("bin")
            .file("bin/busybox", &fs::read(BUSYBOX).expect("busybox-static"));
        for applet in APPLETS {
            t = t.symlink(&format!("bin/{applet}"), "busybox");
        }
        t.dir("etc")
            .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A layer as stored in an archive.
struct Blob {
    media_type: String,
    data: Vec<u8>,
    diff_id: String,
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// `tar` compressed as `media_type` says.
fn blob(media_type: &str, tar: Vec<u8>) -> Blob {
    let diff_id = sha256(&tar);
    let data = if media_type.ends_with("gzip") {
        gzip(&tar)
    } else if media_type.ends_with("zstd") {
        ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest)
    } else {
        tar
    };
    Blob {
        media_type: media_type.into(),
        data,
        diff_id,
    }
}

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

fn config_json(blobs: &[Blob]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/srv/app"},
        "rootfs": {"type": "layers", "diff_ids": blobs.iter().map(|b| format!("sha256:{}", b.diff_id)).collect::<Vec<_>>()},
    }))
    .unwrap()
}

/// A tar of an OCI layout holding `blobs` as one image. `tamper` replaces the stored bytes of
/// layer `i` after the manifest recorded the original digest.
fn oci_tar(blobs: &[Blob], tamper: Option<(usize, Vec<u8>)>) -> Vec<u8> {
    let config = config_json(blobs);
    let desc = |media_type: &str, data: &[u8]| json!({"mediaType": media_type, "digest": format!("sha256:{}", sha256(data)), "size": data.len()});
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": blobs.iter().map(|b| desc(&b.media_type, &b.data)).collect::<Vec<_>>(),
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [desc("application/vnd.oci.image.manifest.v1+json", &manifest)],
    }))
    .unwrap();
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), index),
        (
            format!("blobs/sha256/{}", sha256(&manifest)),
            manifest.clone(),
        ),
        (format!("blobs/sha256/{}", sha256(&config)), config.clone()),
    ];
    for (i, b) in blobs.iter().enumerate() {
        let stored = match &tamper {
            Some((n, bytes)) if *n == i => bytes.clone(),
            _ => b.data.clone(),
        };
        files.push((format!("blobs/sha256/{}", sha256(&b.data)), stored));
    }
    archive(&files)
}

/// A `docker save` archive (manifest.json, `<hex>.json` config, `<n>/layer.tar`).
fn docker_tar(blobs: &[Blob]) -> Vec<u8> {
    let config = config_json(blobs);
    let config_name = format!("{}.json", sha256(&config));
    let layers: Vec<String> = (0..blobs.len()).map(|i| format!("{i}/layer.tar")).collect();
    let manifest = serde_json::to_vec(&json!([
        {"Config": config_name, "RepoTags": ["crafted:latest"], "Layers": layers}
    ]))
    .unwrap();
    let mut files = vec![
        ("manifest.json".to_string(), manifest),
        (config_name, config),
    ];
    for (name, b) in layers.iter().zip(blobs) {
        files.push((name.clone(), b.data.clone()));
    }
    archive(&files)
}

fn archive(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        out.append_data(&mut h, name, &data[..]).unwrap();
    }
    out.into_inner().unwrap()
}

/// `openrun image import PATH -t NAME`, asserting success.
fn import(env: &Env, path: &Path, name: &str) -> String {
    let out = env.output(["image", "import", &path.display().to_string(), "-t", name]);
    assert_ok(&out);
    stdout(&out)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

/// `openrun run --image IMAGE -- sh -c SCRIPT`, asserting success; returns stdout.
fn run_in(env: &Env, image: &str, extra: &[&str], script: &str) -> String {
    let mut args = vec!["run", "--image", image];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let out = env.output(args);
    assert_ok(&out);
    stdout(&out)
}

/// `openrun exec ID -- sh -c SCRIPT`.
fn exec_sh(env: &Env, id: &str, script: &str) -> std::process::Output {
    env.output(["exec", id, "--", "sh", "-c", script])
}

fn store(env: &Env) -> PathBuf {
    env.data_dir().join("images/store")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn layer_ids(env: &Env) -> Vec<String> {
    names(&store(env).join("layers/sha256"))
        .into_iter()
        .filter(|n| !n.ends_with(".json"))
        .collect()
}

#[test]
fn umoci_layouts_import_as_directory_and_tar_and_run_with_their_config() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let layout = umoci_layout(work.path());
    let out = import(&env, &layout, "busybox");
    assert!(out.contains("imported busybox:latest from oci"), "{out}");
    let tarball = work.path().join("layout.tar");
    tool(
        "tar",
        &["-C", "layout", "-cf", "layout.tar", "."],
        work.path(),
    );
    let out = import(&env, &tarball, "busybox:from-tar");
    assert!(
        out.contains("(1 layer: 0 new, 1 already in the store)"),
        "{out}"
    );
    // A compressed archive too.
    tool("gzip", &["-k", "layout.tar"], work.path());
    let out = import(&env, &work.path().join("layout.tar.gz"), "busybox:gz");
    assert!(out.contains("imported busybox:gz from oci"), "{out}");
    assert_eq!(layer_ids(&env).len(), 1);

    let out = env.output(["image", "ls", "--json"]);
    assert_ok(&out);
    let images: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = images
        .iter()
        .map(|i| i["image"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["busybox:from-tar", "busybox:gz", "busybox:latest"]);
    assert_eq!(images[0]["layers"], images[2]["layers"]);
    let config = &images[2]["config"];
    assert_eq!(config["working_dir"], "/work");
    assert_eq!(config["user"], "1000");
    assert!(images[2]["source"].as_str().unwrap().starts_with("oci:/"));
    let table = stdout(&env.output(["image", "ls"]));
    assert!(
        table.starts_with("NAME") && table.contains("from-tar"),
        "{table}"
    );
    let summary = stdout(&env.output(["image", "inspect", "busybox"]));
    assert!(
        summary.contains("/work") && summary.contains("GREETING=hello from the image"),
        "{summary}"
    );

    // No command: the image's cmd, with its env, working dir and user.
    for image in ["busybox", "busybox:from-tar", "busybox:gz"] {
        let out = env.output(["run", "--image", image]);
        assert_ok(&out);
        assert_eq!(stdout(&out), "hello from the image as 1000 in /work\n");
    }
    // Explicit flags override the image's defaults.
    let out = run_in(&env, "busybox", &[], "id -un; pwd; echo $GREETING; ls /");
    assert!(
        out.starts_with("alice\n/work\nhello from the image\n"),
        "{out}"
    );
    let out = run_in(
        &env,
        "busybox",
        &["-u", "0", "-w", "/", "-e", "GREETING=overridden"],
        "id -u; pwd; echo $GREETING",
    );
    assert_eq!(out, "0\n/\noverridden\n");

    // A sandbox that stays up keeps the defaults for every later exec.
    let id = env.create(&["--image", "busybox", "-e", "EXTRA=1"]);
    let out = exec_sh(&env, &id, "id -u; pwd; echo $GREETING $EXTRA");
    assert_ok(&out);
    assert_eq!(stdout(&out), "1000\n/work\nhello from the image 1\n");
    let record = env.inspect(&id);
    assert_eq!(record["image"], "busybox");
    assert_eq!(record["user"], "1000");
    // The image's files keep their owners inside, and the writable layer takes writes.
    let script = "touch /work/made && stat -c '%u:%g %n' /bin/busybox /work /work/made";
    let out = exec_sh(&env, &id, script);
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "0:0 /bin/busybox\n1000:1000 /work\n1000:1000 /work/made\n"
    );
    assert_ok(&env.output(["rm", &id]));
}

/// Two layers: the upper one deletes a file (whiteout) and replaces a directory's contents
/// (opaque); inside the sandbox the lower layer's entries must be gone.
#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let lower = || {
        LayerTar::new()
            .busybox()
            .file("etc/gone", b"deleted above")
            .file("etc/kept", b"kept")
            .dir("data")
            .file("data/old1", b"1")
            .file("data/old2", b"2")
            .dir("data/sub")
            .file("data/sub/old3", b"3")
            .finish()
    };
    let upper = || {
        LayerTar::new()
            .file("etc/.wh.gone", b"")
            .file("data/.wh..wh..opq", b"")
            .file("data/new", b"new")
            .finish()
    };
    // Both formats, and every compression.
    let docker = write(
        work.path(),
        "docker.tar",
        // Old Docker images repeat the empty layer: overlayfs takes a directory once.
        &docker_tar(&[
            blob(TAR, lower()),
            blob(TAR, LayerTar::new().finish()),
            blob(TGZ, upper()),
            blob(TAR, LayerTar::new().finish()),
        ]),
    );
    let oci = write(
        work.path(),
        "oci.tar",
        &oci_tar(&[blob(TGZ, lower()), blob(TZST, upper())], None),
    );
    let out = import(&env, &docker, "layered:docker");
    assert!(
        out.contains("from docker-archive (4 layers: 3 new, 1 already"),
        "{out}"
    );
    let out = import(&env, &oci, "layered:oci");
    assert!(
        out.contains("from oci (2 layers: 0 new, 2 already"),
        "{out}"
    );
    assert_eq!(layer_ids(&env).len(), 3, "same diff ids, same layers");
    for image in ["layered:docker", "layered:oci"] {
        let out = run_in(
            &env,
            image,
            &[],
            "ls /etc; echo --; ls -a /data; echo --; cat /etc/gone 2>&1 || echo absent",
        );
        assert_eq!(
            out,
            "hostname\nhosts\nkept\npasswd\nresolv.conf\n--\n.\n..\nnew\n--\ncat: can't open '/etc/gone': No such file or directory\nabsent\n",
            "{image}"
        );
    }
    // On disk the whiteout is an overlayfs one, and the opaque marker an xattr.
    let layers = layer_ids(&env);
    let upper_dir = layers
        .iter()
        .map(|l| store(&env).join("layers/sha256").join(l))
        .find(|d| d.join("data/new").exists())
        .unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = fs::symlink_metadata(upper_dir.join("etc/gone")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
}

/// What the store holds: layers, images and work in progress.
fn store_state(env: &Env) -> (Vec<String>, String, Vec<String>) {
    let images = stdout(&env.output(["image", "ls", "--json"]));
    (
        names(&store(env).join("layers/sha256")),
        images,
        names(&store(env).join("tmp")),
    )
}

/// Every bad archive is refused with a message naming the problem, and leaves the store
/// exactly as it was.
#[test]
fn bad_archives_are_refused_and_change_nothing() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let good = LayerTar::new().busybox().finish();
    let ok = write(
        work.path(),
        "ok.tar",
        &oci_tar(&[blob(TGZ, good.clone())], None),
    );
    import(&env, &ok, "base");
    let before = store_state(&env);
    assert_eq!(layer_ids(&env).len(), 1);

    let base = || LayerTar::new().file("fine", b"fine");
    let gz = gzip(&base().file("big", &vec![7u8; 200_000]).finish());
    let truncated = gz[..gz.len() / 2].to_vec();
    let truncated_blob = Blob {
        media_type: TGZ.into(),
        diff_id: sha256(&base().file("big", &vec![7u8; 200_000]).finish()),
        data: truncated,
    };
    let mut tampered = base().finish();
    let at = tampered.len() - 1100;
    tampered[at] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            oci_tar(
                &[blob(
                    TGZ,
                    base()
                        .raw("../../etc/cron.d/x", tar::EntryType::Regular, "", b"x")
                        .finish(),
                )],
                None,
            ),
            "\"../../etc/cron.d/x\"",
        ),
        (
            "absolute",
            oci_tar(
                &[blob(
                    TAR,
                    base()
                        .raw("/etc/passwd", tar::EntryType::Regular, "", b"x")
                        .finish(),
                )],
                None,
            ),
            "\"/etc/passwd\": absolute path",
        ),
        (
            "link-outside",
            oci_tar(
                &[blob(
                    TAR,
                    base()
                        .raw("evil", tar::EntryType::Link, "/etc/shadow", b"")
                        .finish(),
                )],
                None,
            ),
            "points outside the layer",
        ),
        (
            "link-missing",
            oci_tar(
                &[blob(
                    TAR,
                    base()
                        .raw("evil", tar::EntryType::Link, "nothere", b"")
                        .finish(),
                )],
                None,
            ),
            "not in the layer",
        ),
        (
            "device",
            docker_tar(&[blob(TAR, base().device("dev/mem").finish())]),
            "\"dev/mem\": a device node",
        ),
        (
            "write-through-symlink",
            oci_tar(
                &[blob(
                    TAR,
                    base()
                        .symlink("etc", "/etc")
                        .file("etc/openrun-pwned", b"x")
                        .finish(),
                )],
                None,
            ),
            "symbolic link",
        ),
        (
            "truncated-gzip",
            oci_tar(&[truncated_blob], None),
            "corrupt layer 1 of 1",
        ),
        (
            "truncated-archive",
            {
                let big = base().file("big", &[9u8; 100_000]).finish();
                let whole = oci_tar(&[blob(TAR, big)], None);
                whole[..whole.len() * 2 / 3].to_vec()
            },
            "the archive ends inside an entry",
        ),
        (
            "digest-mismatch",
            oci_tar(&[blob(TAR, base().finish())], Some((0, tampered))),
            "digest mismatch for layer 1 of 1",
        ),
        (
            "diff-id-mismatch",
            {
                let mut b = blob(TGZ, base().finish());
                b.diff_id = sha256(b"something else");
                oci_tar(&[b], None)
            },
            "digest mismatch for the uncompressed tar (diff id) of layer 1 of 1",
        ),
        (
            "media-type",
            oci_tar(
                &[blob(
                    "application/vnd.oci.image.layer.v1.tar+bzip2",
                    base().finish(),
                )],
                None,
            ),
            "unsupported media type \"application/vnd.oci.image.layer.v1.tar+bzip2\"",
        ),
        (
            "not-an-archive",
            b"just some text, not a tar at all\n".repeat(40),
            "corrupt",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = write(work.path(), &format!("{name}.tar"), &bytes);
        let out = env.output(["image", "import", &path.display().to_string(), "-t", name]);
        assert_eq!(out.status.code(), Some(125), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(expected), "{name}: {err}");
        assert_eq!(store_state(&env), before, "{name} changed the store");
    }
    // A layout directory whose blob is a link out of it (even to the right bytes) is refused.
    let linked = work.path().join("linked");
    fs::create_dir(&linked).unwrap();
    tool("tar", &["-xf", "../ok.tar"], &linked);
    let blobs = linked.join("blobs/sha256");
    // The smallest blob is the manifest or the config: read by every import.
    let json_blob = names(&blobs)
        .into_iter()
        .min_by_key(|n| fs::metadata(blobs.join(n)).unwrap().len())
        .unwrap();
    let outside = work.path().join("outside-blob");
    fs::rename(blobs.join(&json_blob), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, blobs.join(&json_blob)).unwrap();
    let out = env.output([
        "image",
        "import",
        &linked.display().to_string(),
        "-t",
        "linked",
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains(&format!("cannot open blobs/sha256/{json_blob}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(store_state(&env), before);
    assert!(!Path::new("/etc/openrun-pwned").exists());
    assert!(!Path::new("/etc/cron.d/x").exists());
    // A bad name never reaches the archive.
    let out = env.output([
        "image",
        "import",
        &ok.display().to_string(),
        "-t",
        "Bad Name",
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("invalid image name \"Bad Name\""),
        "{}",
        stderr(&out)
    );
    let out = env.output(["image", "import", &ok.display().to_string(), "-t", "host"]);
    assert!(stderr(&out).contains("built-in"), "{}", stderr(&out));
}

/// Two imports of the same image at once: both succeed, each layer is stored once, and no
/// work is left behind.
#[test]
fn concurrent_imports_of_one_image_store_each_layer_once() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let big = LayerTar::new()
        .busybox()
        .file("data/blob", &vec![42u8; 8 << 20])
        .finish();
    let path = write(
        work.path(),
        "image.tar",
        &oci_tar(
            &[
                blob(TGZ, big),
                blob(TAR, LayerTar::new().file("top", b"t").finish()),
            ],
            None,
        ),
    );
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let mut cmd = env.cmd([
                "image",
                "import",
                &path.display().to_string(),
                "-t",
                &format!("same{i}"),
            ]);
            std::thread::spawn(move || cmd.output().expect("spawn"))
        })
        .collect();
    for t in threads {
        assert_ok(&t.join().unwrap());
    }
    assert_eq!(layer_ids(&env).len(), 2);
    assert_eq!(
        names(&store(&env).join("layers/sha256")).len(),
        4,
        "one info file per layer"
    );
    assert_eq!(names(&store(&env).join("tmp")), Vec::<String>::new());
    for i in 0..2 {
        assert_eq!(run_in(&env, &format!("same{i}"), &[], "cat /top"), "t");
    }
}

/// Prune removes layers no image names, but keeps those of tagged images and of a live
/// sandbox whose image was removed meanwhile.
#[test]
fn prune_keeps_tagged_and_live_layers() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let image = |name: &str, marker: &str| {
        let bytes = docker_tar(&[
            blob(TAR, LayerTar::new().busybox().finish()),
            blob(
                TAR,
                LayerTar::new().file(marker, marker.as_bytes()).finish(),
            ),
        ]);
        let path = write(work.path(), &format!("{name}.tar"), &bytes);
        import(&env, &path, name);
        let out = env.output(["image", "inspect", "--json", name]);
        assert_ok(&out);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["layers"][1]["id"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string()
    };
    let tagged = image("tagged", "a");
    let live = image("live", "b");
    let loose = image("loose", "c");
    assert_eq!(layer_ids(&env).len(), 4, "the busybox layer is shared");
    let id = env.create(&["--image", "live"]);
    for name in ["live", "loose"] {
        assert_ok(&env.output(["image", "rm", name]));
    }
    let out = env.output(["image", "rm", "loose"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("\"loose:latest\" not found"),
        "{}",
        stderr(&out)
    );
    assert_ok(&env.output(["image", "rm", "-f", "loose"]));

    let out = env.output(["image", "prune", "--json"]);
    assert_ok(&out);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["layers"], json!([loose]));
    let left = layer_ids(&env);
    assert!(left.contains(&tagged) && left.contains(&live) && !left.contains(&loose));
    assert_eq!(left.len(), 3);
    // The live sandbox still reads its layers.
    let out = env.output(["exec", &id, "--", "cat", "/b"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "b");

    assert_ok(&env.output(["rm", &id]));
    let out = env.output(["image", "prune"]);
    assert_ok(&out);
    assert!(
        stdout(&out).starts_with("removed 1 layer ("),
        "{}",
        stdout(&out)
    );
    let left = layer_ids(&env);
    assert_eq!(left.len(), 2);
    assert!(left.contains(&tagged) && !left.contains(&live));
    assert_eq!(run_in(&env, "tagged", &[], "cat /a"), "a");
}

/// The server creates sandboxes from store images: `"image": NAME` resolves through the
/// store, the image's defaults apply, and an unknown name is a 400 naming it.
#[test]
fn the_server_creates_sandboxes_from_images() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let layout = umoci_layout(work.path());
    import(&env, &layout, "busybox:v1");
    let server = Server::start(&env);
    let key = key(&env, "images");
    let api = Api::new(&server, &key);
    let sandbox = api.create(json!({"image": "busybox:v1", "env": {"EXTRA": "api"}}));
    assert_eq!(sandbox["image"], "busybox:v1");
    let id = sandbox["id"].as_str().unwrap();
    let lines = api.exec(id, "id -u; pwd; echo $GREETING $EXTRA");
    assert_eq!(exit_line(&lines)["code"], 0);
    assert_eq!(
        stream(&lines, "stdout"),
        "1000\n/work\nhello from the image api\n"
    );
    let res = api.post("/v1/sandboxes", &json!({"image": "nosuch:tag"}).to_string());
    let message = error(res, 400, "invalid_argument");
    assert!(message.contains("nosuch:tag"), "{message}");
    let res = api.post("/v1/sandboxes", &json!({"image": "../etc"}).to_string());
    let message = error(res, 400, "invalid_argument");
    assert!(message.contains("invalid image name"), "{message}");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
}

/// An image of the most layers a sandbox can stack (128) runs with all of them (the topmost file wins); more layers than a
/// sandbox can stack are refused at import.
#[test]
fn images_stack_many_layers_and_refuse_too_many() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let layers = |n: usize| -> Vec<Blob> {
        std::iter::once(blob(TGZ, LayerTar::new().busybox().finish()))
            .chain((1..n).map(|i| {
                let tar = LayerTar::new()
                    .file(&format!("l/{i}"), b"")
                    .file("top", i.to_string().as_bytes())
                    .finish();
                blob(TAR, tar)
            }))
            .collect()
    };
    let path = write(work.path(), "many.tar", &oci_tar(&layers(128), None));
    import(&env, &path, "many");
    // The working directory the image names but lacks is made for it.
    let out = run_in(&env, "many", &[], "pwd; cat /top; echo; ls /l");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("/srv/app"));
    assert_eq!(lines.next(), Some("127"));
    assert_eq!(lines.count(), 127, "{out}");

    let before = store_state(&env);
    let path = write(work.path(), "too-many.tar", &oci_tar(&layers(129), None));
    let out = env.output(["image", "import", &path.display().to_string(), "-t", "too"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("129 layers; at most 128"),
        "{}",
        stderr(&out)
    );
    assert_eq!(store_state(&env), before);
}
