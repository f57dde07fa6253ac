//! `openrun image build` end to end: Dockerfiles built on a busybox base this test makes (with
//! `FROM scratch` + `COPY`), whose `RUN` steps run in real sandboxes; the build cache (a
//! second build takes every step from it, a changed `COPY` input rebuilds from that step on);
//! failing steps, bad Dockerfiles and refused inputs; and the Debian base made by debootstrap
//! from the Debian archive.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "id", "pwd", "env", "echo", "touch", "mkdir", "rm", "stat", "readlink",
    "false", "sleep", "wc", "chown",
];

/// A build context with a busybox root filesystem at `rootfs/` (applets as links, alice as
/// user 1000, /bin a link to usr/bin as on merged-/usr systems) and a Dockerfile that copies
/// it into an empty image.
fn busybox_context(dir: &Path) {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("tmp")).unwrap();
    fs::copy(BUSYBOX, root.join("usr/bin/busybox")).expect("busybox-static is needed");
    for applet in APPLETS {
        symlink("busybox", root.join("usr/bin").join(applet)).unwrap();
    }
    symlink("usr/bin", root.join("bin")).unwrap();
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000:alice:/home/alice:/bin/sh\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nalice:x:1000:\n").unwrap();
    fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/bin:/bin\nCMD [\"sh\"]\n",
    )
    .unwrap();
}

/// `openrun image build ARGS --json`, asserting success; returns the report.
fn build(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["image", "build", "--json"];
    all.extend_from_slice(args);
    let out = env.output(&all);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).expect("build --json prints the report")
}

/// The busybox base, built as `bb`.
fn base(env: &Env, work: &Path) {
    let dir = work.join("base");
    busybox_context(&dir);
    build(env, &["-t", "bb", dir.to_str().unwrap()]);
}

/// Each step's `cached` (`null` for FROM).
fn cached(report: &Value) -> Vec<Value> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cached"].clone())
        .collect()
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, contents).unwrap();
    path
}

/// `openrun run --image IMAGE [-- sh -c SCRIPT]` (no script: the image's command).
fn run(env: &Env, image: &str, script: Option<&str>) -> String {
    let mut args = vec!["run", "--image", image];
    if let Some(script) = script {
        args.extend(["--", "sh", "-c", script]);
    }
    let out = env.output(&args);
    assert_ok(&out);
    stdout(&out)
}

/// `openrun image build -t TAG CTX`, asserting the refusal (125); returns stderr.
fn refused(env: &Env, tag: &str, ctx: &Path) -> String {
    let out = env.output(["image", "build", "-t", tag, ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(125));
    stderr(&out)
}

fn image_names(env: &Env) -> Vec<String> {
    let out = env.output(["image", "ls", "--json"]);
    assert_ok(&out);
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    all.iter()
        .map(|i| i["image"].as_str().unwrap().to_string())
        .collect()
}

const APP: &str = r#"# The application image.
FROM bb
ARG WHO=world
ENV GREETING="hello $WHO" \
    EMPTY=
WORKDIR /srv/app
COPY --chown=alice:alice greeting.txt ./
COPY conf/ /etc/app/
RUN echo "RUN as $(id -u) in $(pwd) sees $GREETING and WHO=$WHO" \
 && cat greeting.txt && echo built > built.txt && rm /etc/app/drop.conf && chown alice .
USER alice
RUN touch /srv/app/mine && echo "$(id -u) made mine"
LABEL org.example.stage=test
CMD ["sh", "-c", "echo \"$GREETING as $(id -u) in $(pwd) WHO=${WHO:-unset}\"; stat -c '%u:%g %a %n' greeting.txt built.txt mine /etc/app/a.conf; ls /etc/app; readlink /bin"]
"#;

#[test]
fn a_dockerfile_builds_runs_and_caches_every_step() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    base(&env, work.path());
    let ctx = work.path().join("app");
    write(&ctx, "Dockerfile", APP);
    write(&ctx, "greeting.txt", "hi from the context\n");
    write(&ctx, "conf/a.conf", "a=1\n");
    write(&ctx, "conf/drop.conf", "x\n");

    let first = env.output([
        "image",
        "build",
        "--json",
        "-t",
        "app:v1",
        ctx.to_str().unwrap(),
    ]);
    assert_ok(&first);
    let log = stderr(&first);
    // Steps are announced and RUN output streamed; ARG values reach RUN but not the image.
    assert!(log.contains("Step 1/11 : FROM bb"), "{log}");
    assert!(log.contains("Step 7/11 : RUN echo"), "{log}");
    assert!(
        log.contains("RUN as 0 in /srv/app sees hello world and WHO=world\nhi from the context\n"),
        "{log}"
    );
    assert!(log.contains("1000 made mine"), "{log}");
    let report: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(report["image"], "app:v1");
    assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
    let mut expected = vec![Value::Null];
    expected.extend(vec![Value::Bool(false); 10]);
    assert_eq!(cached(&report), expected);
    assert_eq!(report["record"]["parent"], "bb:latest");
    // bb's one layer, WORKDIR, two COPYs and two RUNs.
    assert_eq!(report["record"]["layers"].as_array().unwrap().len(), 6);

    let out = run(&env, "app:v1", None);
    assert_eq!(
        out,
        "hello world as 1000 in /srv/app WHO=unset\n\
         1000:1000 644 greeting.txt\n0:0 644 built.txt\n1000:1000 644 mine\n0:0 644 /etc/app/a.conf\n\
         a.conf\nusr/bin\n",
        "config applied, owners kept, the RUN's deletion a whiteout, /bin still a link"
    );
    let inspect = env.output(["image", "inspect", "--json", "app:v1"]);
    assert_ok(&inspect);
    let inspect: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(inspect["config"]["user"], "alice");
    assert_eq!(inspect["config"]["working_dir"], "/srv/app");
    assert_eq!(inspect["config"]["labels"]["org.example.stage"], "test");
    let env_list: Vec<&str> = inspect["config"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        env_list,
        ["PATH=/usr/bin:/bin", "GREETING=hello world", "EMPTY="]
    );

    // Again: every step from the cache, the same image, and nothing run.
    let started = Instant::now();
    let second = env.output([
        "image",
        "build",
        "--json",
        "-t",
        "app:v1",
        ctx.to_str().unwrap(),
    ]);
    assert_ok(&second);
    let again: Value = serde_json::from_slice(&second.stdout).unwrap();
    let mut all_cached = vec![Value::Null];
    all_cached.extend(vec![Value::Bool(true); 10]);
    assert_eq!(cached(&again), all_cached);
    assert_eq!(again["digest"], report["digest"]);
    assert_eq!(again["record"]["layers"], report["record"]["layers"]);
    assert!(
        !stderr(&second).contains("RUN as 0"),
        "a cached RUN does not run"
    );
    assert!(stderr(&second).contains("10 of 10 steps from the cache"));
    assert!(started.elapsed() < Duration::from_secs(5));

    // A changed COPY input: the steps before it cached, it and every later one rebuilt.
    write(&ctx, "conf/a.conf", "a=2\n");
    let third = build(&env, &["-t", "app:v2", ctx.to_str().unwrap()]);
    let mut from_copy = vec![Value::Null];
    from_copy.extend(vec![Value::Bool(true); 4]);
    from_copy.extend(vec![Value::Bool(false); 6]);
    assert_eq!(cached(&third), from_copy);
    assert_eq!(run(&env, "app:v2", Some("cat /etc/app/a.conf")), "a=2\n");
    assert_eq!(run(&env, "app:v1", Some("cat /etc/app/a.conf")), "a=1\n");
    // A touch (a new time only) is no input change; a mode change is.
    let path = ctx.join("greeting.txt");
    fs::File::open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    let touched = build(&env, &["-t", "app:v2", ctx.to_str().unwrap()]);
    assert!(cached(&touched)[1..]
        .iter()
        .all(|c| c == &Value::Bool(true)));
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let chmodded = build(&env, &["-t", "app:v2", ctx.to_str().unwrap()]);
    assert_eq!(
        cached(&chmodded)[4],
        Value::Bool(false),
        "the COPY of the file"
    );
    assert_eq!(cached(&chmodded)[3], Value::Bool(true));

    // A build argument reaches ARG: from the ENV that uses it on, nothing is cached.
    let args = build(
        &env,
        &[
            "-t",
            "app:you",
            "--build-arg",
            "WHO=you",
            ctx.to_str().unwrap(),
        ],
    );
    let c = cached(&args);
    assert_eq!(c[1], Value::Bool(false), "the ARG's value changed");
    assert!(c[2..].iter().all(|c| c == &Value::Bool(false)));
    assert!(run(&env, "app:you", None).starts_with("hello you as 1000"));

    // --no-cache runs everything again.
    let fresh = build(&env, &["--no-cache", "-t", "app:v1", ctx.to_str().unwrap()]);
    assert!(cached(&fresh)[1..].iter().all(|c| c == &Value::Bool(false)));
    // An unused build argument is a warning, not an error.
    let out = env.output([
        "image",
        "build",
        "-t",
        "app:v1",
        "--build-arg",
        "NOBODY=1",
        ctx.to_str().unwrap(),
    ]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("not used by any ARG: NOBODY"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_failing_run_names_its_line_shows_its_output_and_tags_nothing() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    base(&env, work.path());
    let ctx = work.path().join("bad");
    write(
        &ctx,
        "Dockerfile",
        "FROM bb\nRUN echo first step\n\n# the failing one\nRUN echo to stdout; echo to stderr >&2; \\\n    exit 3\nRUN echo never\n",
    );
    let log = refused(&env, "bad", &ctx);
    assert!(log.contains("first step"), "{log}");
    assert!(log.contains("to stdout\nto stderr\n"), "{log}");
    assert!(
        log.contains("Dockerfile line 5: RUN echo to stdout; echo to stderr >&2;     exit 3: the command exited with code 3"),
        "{log}"
    );
    assert!(!log.contains("never"), "{log}");
    assert_eq!(image_names(&env), ["bb:latest"], "nothing tagged");
    // A command that does not exist, in exec form.
    write(
        &ctx,
        "Dockerfile",
        "FROM bb\nRUN [\"no-such-program\", \"x\"]\n",
    );
    let log = refused(&env, "bad", &ctx);
    assert!(
        log.contains(
            "Dockerfile line 2: RUN [\"no-such-program\", \"x\"]: cannot run \"no-such-program\""
        ),
        "{log}"
    );
    // No sandbox is left behind by the failed steps.
    let ps = env.output(["ps", "--json"]);
    assert_eq!(stdout(&ps).trim(), "[]");
    assert_eq!(image_names(&env), ["bb:latest"]);
}

#[test]
fn bad_dockerfiles_and_inputs_are_refused_with_their_line() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    base(&env, work.path());
    let ctx = work.path().join("ctx");
    write(&ctx, "file.txt", "x\n");
    write(
        &work.path().join("outside"),
        "secret.txt",
        "outside the context\n",
    );
    // A snapshot of a sandbox on the built-in host image sits on the host's /usr: not a base.
    let id = env.create(&[]);
    assert_ok(&env.output(["snapshot", &id, "-t", "hostsnap"]));
    assert_ok(&env.output(["rm", &id]));
    let cases: &[(&str, &str)] = &[
        ("FROM bb\nENV A=\"unterminated\n", "Dockerfile line 2: unterminated double quote"),
        ("FROM bb\nRUN true\nHEALTHCHECK CMD true\n", "Dockerfile line 3: HEALTHCHECK is not supported"),
        ("FROM bb\nRUN \\\n  true\nFROBNICATE x\n", "Dockerfile line 4: unknown instruction FROBNICATE"),
        ("FROM bb\nFROM bb\n", "Dockerfile line 2: a second FROM: multi-stage builds are not supported"),
        ("FROM bb\nCOPY --from=x /a /b\n", "Dockerfile line 2: COPY --from is not supported"),
        ("RUN true\n", "Dockerfile line 1: RUN before FROM"),
        ("# only a comment\n", "no FROM instruction"),
        ("FROM bb\nADD https://example.com/x.tar.gz /x/\n", "Dockerfile line 2: ADD https://example.com/x.tar.gz /x/: ADD of a URL (https://example.com/x.tar.gz) is not supported: builds have no network"),
        ("FROM bb\nCOPY ../outside/secret.txt /x\n", "Dockerfile line 2: COPY ../outside/secret.txt /x: \"../outside/secret.txt\" is outside the build context"),
        ("FROM bb\nCOPY missing.txt /x\n", "Dockerfile line 2: COPY missing.txt /x: \"missing.txt\" does not exist in the build context"),
        ("FROM bb\nCOPY *.none /x/\n", "no file in the build context matches \"*.none\""),
        ("FROM bb\nCOPY file.txt file.txt /x\n", "needs a destination directory ending in /"),
        ("FROM bb\nCOPY --chown=nobody file.txt /x\n", "Dockerfile line 2: COPY --chown=nobody file.txt /x: --chown=nobody: no user \"nobody\" in the image's /etc/passwd"),
        ("FROM bb\nCOPY --chmod=999 file.txt /x\n", "--chmod=999: expected an octal mode"),
        ("FROM bb\nCOPY file.txt /etc/passwd/x\n", "/etc/passwd is not a directory in the image"),
        ("FROM missing-base\n", "Dockerfile line 1: FROM missing-base: image \"missing-base:latest\" not found"),
        ("FROM host\n", "the built-in host image cannot be built on"),
        ("FROM hostsnap\n", "Dockerfile line 1: FROM hostsnap: hostsnap:latest is a snapshot of a sandbox on the built-in host image, which cannot be built on"),
        ("FROM scratch\nRUN true\n", "Dockerfile line 2: RUN true: the image is empty (FROM scratch)"),
        ("FROM scratch\nENV A=1\n", "the image has no layers"),
        ("FROM bb\nENV A=\"${B:?must be given}\"\n", "Dockerfile line 2: ENV A=\"${B:?must be given}\": B: must be given"),
        ("FROM bb\nEXPOSE http\n", "invalid port \"http\""),
    ];
    for (dockerfile, message) in cases {
        write(&ctx, "Dockerfile", dockerfile);
        let out = env.output(["image", "build", "-t", "refused", ctx.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(125), "{dockerfile}");
        assert!(
            stderr(&out).contains(message),
            "{dockerfile:?}: expected {message:?} in\n{}",
            stderr(&out)
        );
    }
    assert_eq!(
        image_names(&env),
        ["bb:latest", "hostsnap:latest"],
        "nothing tagged"
    );
    // Arguments the CLI refuses before building.
    let out = env.output(["image", "build", ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("needs a name for its image: -t NAME"),
        "{}",
        stderr(&out)
    );
    let out = env.output(["image", "build", "-t", "Bad Name", ctx.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("invalid image name"),
        "{}",
        stderr(&out)
    );
    let out = env.output([
        "image",
        "build",
        "-t",
        "x",
        "-f",
        "/nonexistent/Dockerfile",
        ".",
    ]);
    assert!(stderr(&out).contains("cannot read the Dockerfile /nonexistent/Dockerfile"));
}

/// A tar.gz with a directory, a file owned by 1000 and a symlink; or with a whiteout entry.
fn tar_gz(whiteout: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o750);
    dir.set_size(0);
    b.append_data(&mut dir, "pkg/", &[][..]).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o640);
    file.set_uid(1000);
    file.set_gid(1000);
    file.set_size(6);
    let name = if whiteout {
        "pkg/.wh.passwd"
    } else {
        "pkg/data"
    };
    b.append_data(&mut file, name, &b"inside"[..]).unwrap();
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    b.append_link(&mut link, "pkg/link", "data").unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

#[test]
fn add_extracts_archives_and_copy_stays_inside_context_and_image() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    base(&env, work.path());
    let ctx = work.path().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("pkg.tar.gz"), tar_gz(false)).unwrap();
    fs::write(work.path().join("secret"), "host secret\n").unwrap();
    // Links in the context: one leaving it (copied as a link, its target never read), one
    // resolved inside it when named as a source.
    fs::create_dir_all(ctx.join("tree")).unwrap();
    symlink(work.path().join("secret"), ctx.join("tree/escape")).unwrap();
    symlink("../../secret", ctx.join("up")).unwrap();
    fs::write(ctx.join("tool"), "#!/bin/sh\necho tool ran\n").unwrap();
    write(
        &ctx,
        "Dockerfile",
        "FROM bb\nADD pkg.tar.gz /opt/\nCOPY tree /tree/\nCOPY --chmod=755 tool /bin/\nRUN tool\nCOPY . /all/\n",
    );
    // What .dockerignore names is not in the context's copy.
    fs::write(ctx.join("build.log"), "log\n").unwrap();
    fs::write(ctx.join(".dockerignore"), "*.log\n").unwrap();
    let report = build(&env, &["-t", "added", ctx.to_str().unwrap()]);
    assert_eq!(report["steps"].as_array().unwrap().len(), 6);
    assert_eq!(
        run(&env, "added", Some("ls -A /all")),
        ".dockerignore\nDockerfile\npkg.tar.gz\ntool\ntree\nup\n"
    );
    let out = run(
        &env,
        "added",
        Some("stat -c '%u:%g %a %n' /opt/pkg /opt/pkg/data; cat /opt/pkg/link; readlink /tree/escape; cat /tree/escape 2>&1; readlink /bin; ls /bin/tool /bin/busybox"),
    );
    assert_eq!(
        out,
        format!(
            "0:0 750 /opt/pkg\n1000:1000 640 /opt/pkg/data\ninside{}\n\
             cat: can't open '/tree/escape': No such file or directory\nusr/bin\n/bin/busybox\n/bin/tool\n",
            work.path().join("secret").display()
        ),
        "the archive's owners kept, the context's link copied as a link, /bin stays a link"
    );
    // A named source that is a link leaving the context is resolved inside it: not found.
    write(&ctx, "Dockerfile", "FROM bb\nCOPY up /up\n");
    let log = refused(&env, "up", &ctx);
    assert!(
        log.contains("\"up\" does not exist in the build context"),
        "{log}"
    );
    // Whiteouts in an ADD archive would delete the image's files: refused.
    fs::write(ctx.join("pkg.tar.gz"), tar_gz(true)).unwrap();
    write(&ctx, "Dockerfile", "FROM bb\nADD pkg.tar.gz /etc/\n");
    let log = refused(&env, "wh", &ctx);
    assert!(log.contains("Dockerfile line 2: ADD pkg.tar.gz /etc/: ADD archive \"pkg.tar.gz\" has the whiteout entry \"pkg/.wh.passwd\""), "{log}");
    assert!(!image_names(&env).contains(&"wh:latest".to_string()));
}

/// The Debian base: debootstrap from the Debian archive (about a minute here, within CI's
/// budget, so it runs every time), then cached.
#[test]
fn the_debian_base_is_built_with_debootstrap_and_cached() {
    let env = Env::new();
    let started = Instant::now();
    let out = env.output(["image", "build", "--debian", "bookworm"]);
    assert_ok(&out);
    eprintln!("debootstrap build: {:?}", started.elapsed());
    assert_eq!(
        stdout(&out).split_whitespace().next(),
        Some("debian:bookworm")
    );
    assert!(
        stderr(&out).contains("Downloading packages"),
        "{}",
        stderr(&out)
    );
    let probe = "cat /etc/debian_version; bash -c 'echo bash $BASH_VERSION' | cut -c1-6; \
                 python3 -c 'print(\"python\", 6 * 7)'; git --version | cut -d' ' -f1-2; \
                 ls /etc/ssl/certs/ca-certificates.crt; echo $PATH; cat /etc/resolv.conf";
    let out = run(&env, "debian:bookworm", Some(probe));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("12."), "{out}");
    assert_eq!(
        &lines[1..],
        [
            "bash 5",
            "python 42",
            "git version",
            "/etc/ssl/certs/ca-certificates.crt",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            // The sandbox's own resolver file (bound over the image's, which debootstrap's
            // copy of the host's left empty): never the host's resolvers.
            "nameserver 169.254.1.1"
        ]
    );
    // Cached: the same suite and packages again is instant.
    let again = Instant::now();
    let out = env.output([
        "image", "build", "--debian", "bookworm", "-t", "deb", "--json",
    ]);
    assert_ok(&out);
    assert!(again.elapsed() < Duration::from_secs(5));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cached"], true);
    assert_eq!(report["image"], "deb:latest");
    // A Dockerfile on top of it: RUN uses its python3 and bash.
    let work = tempfile::tempdir().unwrap();
    write(
        work.path(),
        "Dockerfile",
        "FROM deb\nSHELL [\"/bin/bash\", \"-c\"]\nRUN python3 -c 'open(\"/made-by-python\", \"w\").write(\"ok\")' && [[ -f /made-by-python ]]\nCMD [\"cat\", \"/made-by-python\"]\n",
    );
    build(&env, &["-t", "on-debian", work.path().to_str().unwrap()]);
    assert_eq!(run(&env, "on-debian", None), "ok");
    // Bad suites are refused before anything runs.
    let out = env.output(["image", "build", "--debian", "no such suite"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("invalid Debian suite"),
        "{}",
        stderr(&out)
    );
}
