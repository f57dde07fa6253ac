//! What a sandbox can see of the host: nothing but its image.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;

#[test]
fn host_paths_outside_the_image_are_invisible() {
    let env = Env::new();
    let marker = format!("/tmp/openrun-host-marker-{}", std::process::id());
    std::fs::write(&marker, "host secret").unwrap();
    let script = format!(
        "test -e {marker} && echo marker-visible; \
         test -e /etc/shadow && echo shadow-visible; \
         ls -A /home /root; \
         test -e {data} && echo data-dir-visible; \
         test -e /work && echo work-visible; \
         cat /etc/hostname; echo done",
        data = env.data_dir().display()
    );
    let out = env.sh(&script);
    std::fs::remove_file(&marker).unwrap();
    assert!(!out.contains("visible"), "host paths leaked: {out}");
    assert!(out.trim_end().ends_with("done"), "{out}");
    // /home and /root are empty: only the headers of `ls` are printed.
    assert!(out.contains("/home:\n\n/root:\n"), "{out}");
}

#[test]
fn proc_lists_only_the_sandbox_processes() {
    let env = Env::new();
    let out = env.sh("for p in /proc/[0-9]*; do echo ${p#/proc/}; done");
    let pids: Vec<u32> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert!(pids.contains(&1), "pid 1 (the agent) missing: {pids:?}");
    // The agent, the shell, and nothing from the host.
    assert!(pids.len() <= 3, "sandbox sees foreign processes: {pids:?}");
    let host_pids = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    assert!(host_pids > pids.len());
}

#[test]
fn hostname_is_the_sandbox_id_and_only_lo_exists() {
    let env = Env::new();
    let id = env.create(&[]);
    let out = env.exec_sh(
        &id,
        "cat /proc/sys/kernel/hostname; ls /sys/class/net; cat /proc/net/dev",
    );
    assert_ok(&out);
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(id.as_str()));
    assert_eq!(lines.next(), Some("lo"), "{text}");
    let interfaces: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(':') && !l.contains('|'))
        .map(|l| l.split(':').next().unwrap().trim())
        .collect();
    assert_eq!(interfaces, ["lo"], "{text}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(host.trim(), id);
}

#[test]
fn every_namespace_of_the_sandbox_is_its_own() {
    // The init makes its mount, network, uts and ipc namespaces itself after clone3: each must
    // still differ from the host's (and the user, pid and cgroup namespaces too).
    let env = Env::new();
    let id = env.create(&[]);
    let kinds = ["user", "pid", "mnt", "net", "uts", "ipc", "cgroup"];
    let script: String = kinds
        .iter()
        .map(|k| format!("readlink /proc/self/ns/{k}; "))
        .collect();
    let out = env.exec_sh(&id, &script);
    assert_ok(&out);
    let text = stdout(&out);
    let inside: Vec<&str> = text.lines().collect();
    assert_eq!(inside.len(), kinds.len(), "{text}");
    for (kind, seen) in kinds.iter().zip(inside) {
        let host = std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        assert!(seen.starts_with(&format!("{kind}:[")), "{seen}");
        assert_ne!(
            seen,
            host.to_string_lossy(),
            "the sandbox shares the host's {kind} namespace"
        );
    }
}

#[test]
fn root_inside_writes_files_owned_by_an_unprivileged_host_uid() {
    let env = Env::new();
    let id = env.create(&[]);
    let out = env.exec_sh(
        &id,
        "echo data > /root/owned; id -u; cat /proc/self/uid_map",
    );
    assert_ok(&out);
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("0"), "not root inside: {text}");
    let map: Vec<u64> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(map[0], 0);
    assert!(map[1] >= 1 << 30, "uid 0 maps to a low host uid: {map:?}");
    assert_eq!(map[2], 65536);
    let file = env.upper_dir(&id).join("root/owned");
    assert!(
        file.starts_with(env.data_dir()),
        "create keeps its layer on disk: {}",
        file.display()
    );
    let meta = std::fs::metadata(&file).expect("file in the writable layer");
    assert_eq!(u64::from(meta.uid()), map[1], "owner on the host");
    assert_ne!(meta.uid(), 0);
    assert_eq!(std::fs::read_to_string(file).unwrap(), "data\n");
}

#[test]
fn the_image_is_read_only_below_and_writable_through_the_layer() {
    let env = Env::new();
    let out = env.sh(
        "echo hi > /usr/local/openrun-probe && cat /usr/local/openrun-probe; \
         stat -c '%u %g' /usr/bin/env; touch /tmp/x && echo tmp-ok",
    );
    assert_eq!(out, "hi\n0 0\ntmp-ok\n");
    assert!(!std::path::Path::new("/usr/local/openrun-probe").exists());
}

#[test]
fn a_rootfs_directory_becomes_the_root() {
    let env = Env::new();
    let rootfs = tempfile::tempdir_in("/tmp").unwrap();
    let root = rootfs.path();
    // A minimal root: dash and the libraries it links to.
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/usr/bin/dash", root.join("bin/sh")).unwrap();
    let ldd = std::process::Command::new("ldd")
        .arg("/usr/bin/dash")
        .output()
        .unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        if lib.starts_with('/') {
            let dst = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(lib, dst).unwrap();
        }
    }
    std::fs::write(root.join("marker"), "rootfs").unwrap();
    let out = env.output([
        "run",
        "--rootfs",
        root.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "read m < /marker; echo $m; test -O /marker && echo owned-by-root; test -e /usr/bin/python3 || echo no-host-usr; echo /*",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.starts_with("rootfs\nowned-by-root\nno-host-usr\n"),
        "{text}"
    );
    assert!(
        text.contains("/proc") && text.contains("/dev") && text.contains("/tmp"),
        "{text}"
    );
}

#[test]
fn privileges_are_reduced_and_the_agent_is_out_of_reach() {
    let env = Env::new();
    let out = env.sh("grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; \
         cat /proc/1/environ >/dev/null 2>&1 && echo environ-readable; \
         readlink /proc/1/exe >/dev/null 2>&1 && echo exe-readable; \
         cat /proc/1/maps >/dev/null 2>&1 && echo maps-readable; \
         mount -t tmpfs x /mnt 2>/dev/null && echo mount-allowed; \
         echo done");
    // Docker's default set less net_raw, mknod and audit_write (init.rs, KEPT_CAPS): chown,
    // dac_override, fowner, fsetid, kill, setgid, setuid, setpcap, net_bind_service,
    // sys_chroot, setfcap.
    assert!(out.contains("CapBnd:\t00000000800405fb"), "{out}");
    assert!(out.contains("CapEff:\t00000000800405fb"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(
        !out.contains("readable"),
        "the agent (pid 1) is reachable: {out}"
    );
    assert!(!out.contains("mount-allowed"), "{out}");
    assert!(out.ends_with("done\n"));
}

#[test]
fn env_workdir_and_user_apply() {
    let env = Env::new();
    let out = env.output([
        "run",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\"; pwd; id -u; echo $HOSTNAME | wc -c",
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "hi there\n/tmp\n65534\n13\n");
    let out = env.output(["run", "-w", "/no/such/dir", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("/no/such/dir"), "{}", stderr(&out));
}
