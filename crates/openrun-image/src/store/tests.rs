//! The store on a real data dir (as root).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::*;

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn record(layers: &[&str]) -> ImageRecord {
    ImageRecord {
        layers: layers.iter().map(|l| l.to_string()).collect(),
        config: ImageConfig {
            env: vec!["PATH=/bin".into(), "A=image".into(), "B=image".into()],
            working_dir: Some("/work".into()),
            user: Some("1000".into()),
            ..ImageConfig::default()
        },
        created_at: now(),
        source: "test".into(),
        parent: None,
        base: None,
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_layer_and_its_record_appear_only_at_commit() {
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let mode = fs::metadata(store.root()).unwrap().mode();
    assert_eq!(mode & 0o777, 0o700);
    let tar = tar_of(&[("etc/os-release", b"ID=test\n"), ("bin/tool", b"#!")]);
    let staged = store.stage_tar(&tar[..], "test", "layer 1").unwrap();
    assert_eq!(staged.digest, crate::digest::sha256_of(&tar));
    assert_eq!(staged.size, tar.len() as u64);
    assert!(!store.has_layer(&staged.digest));
    assert_eq!(
        names(&store.root().join("layers/sha256")),
        Vec::<String>::new()
    );
    let hex = staged.digest.clone();
    let r = ImageRef::parse("team/tool:v1").unwrap();
    store
        .commit(vec![staged], Some((&r, &record(&[&hex]))))
        .unwrap();
    assert!(store.has_layer(&hex));
    assert_eq!(
        fs::read(store.layer_dir(&hex).join("etc/os-release")).unwrap(),
        b"ID=test\n"
    );
    assert_eq!(store.layer_info(&hex).unwrap().size, tar.len() as u64);
    assert_eq!(store.get(&r).unwrap().layers, std::slice::from_ref(&hex));
    let listed: Vec<String> = store
        .list()
        .unwrap()
        .iter()
        .map(|(r, _)| r.to_string())
        .collect();
    assert_eq!(listed, ["team/tool:v1"]);
    // Nothing is left in tmp once the staged layer is committed.
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());

    store.remove(&r).unwrap();
    assert!(matches!(store.get(&r), Err(ImageError::NotFound(_))));
    assert!(matches!(store.remove(&r), Err(ImageError::NotFound(_))));
    // The empty name directory went with it; the layer stays until a prune.
    assert_eq!(names(&store.root().join("images")), Vec::<String>::new());
    assert!(store.has_layer(&hex));
}

#[test]
fn a_bad_layer_leaves_nothing_behind() {
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let mut tar = tar_of(&[("ok", b"fine")]);
    // A device entry after a good one.
    let mut h = tar::Header::new_gnu();
    h.set_path("dev/sda").unwrap();
    h.set_entry_type(tar::EntryType::Block);
    h.set_mode(0o600);
    h.set_size(0);
    h.set_cksum();
    let end = tar.len() - 1024;
    tar.truncate(end);
    tar.extend_from_slice(h.as_bytes());
    tar.extend(std::iter::repeat_n(0u8, 1024));
    let err = store.stage_tar(&tar[..], "test", "layer 1").unwrap_err();
    assert!(err.to_string().contains("dev/sda"), "{err}");
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
    assert_eq!(
        names(&store.root().join("layers/sha256")),
        Vec::<String>::new()
    );
}

#[test]
fn records_must_name_layers_in_the_store() {
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let r = ImageRef::parse("x").unwrap();
    let missing = "a".repeat(64);
    let err = store.put(&r, &record(&[&missing])).unwrap_err();
    assert!(
        matches!(&err, ImageError::MissingLayers(m) if m == std::slice::from_ref(&missing)),
        "{err:?}"
    );
    assert!(matches!(store.get(&r), Err(ImageError::NotFound(_))));
    let err = store
        .put(&ImageRef::parse("host").unwrap(), &record(&[&missing]))
        .unwrap_err();
    assert!(err.to_string().contains("built-in"), "{err}");
    assert!(store.put(&r, &record(&["nothex"])).is_err());
    assert!(store.put(&r, &record(&[])).is_err());
}

#[test]
fn concurrent_commits_of_one_layer_keep_one_copy() {
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(data.path()).unwrap());
    let tar = Arc::new(tar_of(&[("same", &vec![1u8; 1 << 20])]));
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (store, tar, barrier) = (store.clone(), tar.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let staged = store.stage_tar(&tar[..], "test", "layer").unwrap();
                let hex = staged.digest.clone();
                let r = ImageRef::parse(&format!("img{i}")).unwrap();
                store
                    .commit(vec![staged], Some((&r, &record(&[&hex]))))
                    .unwrap();
                hex
            })
        })
        .collect();
    let hexes: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(hexes.windows(2).all(|w| w[0] == w[1]));
    let hex = &hexes[0];
    assert_eq!(
        names(&store.root().join("layers/sha256")),
        [hex.clone(), format!("{hex}.json")]
    );
    assert_eq!(store.list().unwrap().len(), 4);
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
}

#[test]
fn open_sweeps_work_of_dead_processes_only() {
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let tmp = store.root().join("tmp");
    // pid_max is at most 2^22: this pid cannot be running.
    let dead = tmp.join("99999999.12345.0");
    fs::create_dir_all(dead.join("layer/deep")).unwrap();
    fs::write(tmp.join("junk"), b"x").unwrap();
    let live = store.work_dir().unwrap();
    fs::write(live.path().join("partial"), b"x").unwrap();
    let again = Store::open(data.path()).unwrap();
    assert!(!dead.exists());
    assert!(!tmp.join("junk").exists());
    assert!(live.path().join("partial").exists(), "live work is kept");
    drop(live);
    assert_eq!(names(&again.root().join("tmp")), Vec::<String>::new());
}

#[test]
fn layers_from_directories_shift_ids_and_hash_their_tree() {
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let src = tempfile::tempdir().unwrap();
    let base = 1 << 30;
    fs::create_dir(src.path().join("app")).unwrap();
    fs::write(src.path().join("app/main.py"), b"print(1)\n").unwrap();
    for p in ["app", "app/main.py"] {
        std::os::unix::fs::lchown(src.path().join(p), Some(base + 1000), Some(base + 1000))
            .unwrap();
    }
    let shift = Some(IdShift { base, size: 65_536 });
    let staged = store.stage_dir(src.path(), shift, "snapshot:test").unwrap();
    let again = store.stage_dir(src.path(), shift, "snapshot:test").unwrap();
    assert_eq!(staged.digest, again.digest, "same tree, same id");
    let mut tar = Vec::new();
    layer::write_tree(src.path(), shift, &mut tar).unwrap();
    assert_eq!(staged.digest, crate::digest::sha256_of(&tar));
    let hex = staged.digest.clone();
    store.commit(vec![staged, again], None).unwrap();
    let meta = fs::metadata(store.layer_dir(&hex).join("app/main.py")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    // A tree with an id outside the range is refused, and nothing is staged.
    std::os::unix::fs::lchown(src.path().join("app"), Some(0), None).unwrap();
    let err = store.stage_dir(src.path(), shift, "x").unwrap_err();
    assert!(err.to_string().contains("app"), "{err}");
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
}

#[test]
fn sandbox_images_resolve_with_their_defaults() {
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let staged = store
        .stage_tar(&tar_of(&[("a", b"a")])[..], "t", "l")
        .unwrap();
    let hex = staged.digest.clone();
    let r = ImageRef::parse("app").unwrap();
    store
        .commit(vec![staged], Some((&r, &record(&[&hex]))))
        .unwrap();

    let host = store.sandbox_image("host").unwrap();
    assert_eq!(host.source, ImageSource::Host);
    assert!(host.lease.is_none());
    let image = store.sandbox_image("app").unwrap();
    assert_eq!(
        image.source,
        ImageSource::Layers {
            name: "app".into(),
            layers: vec![store.layer_dir(&hex)]
        }
    );
    let mut spec = SandboxSpec::new(ImageSource::Host);
    spec.env.insert("A".into(), "explicit".into());
    spec.user = Some("root".into());
    image.apply(&mut spec);
    assert_eq!(spec.env["A"], "explicit", "explicit variables win");
    assert_eq!(spec.env["B"], "image");
    assert_eq!(spec.cwd.as_deref(), Some("/work"));
    assert_eq!(spec.user.as_deref(), Some("root"));
    assert!(matches!(store.sandbox_image("nope"), Err(ImageError::NotFound(n)) if n == "nope"));
    assert!(matches!(
        store.sandbox_image("Bad Name"),
        Err(ImageError::InvalidName { .. })
    ));
    // Its lease goes before the next commit (which waits for every lease).
    drop(image);
    // An image on the host image resolves to its layers over the host's mounts; its record
    // says so, and a record without `base` (written before it existed) reads as none.
    let on_host = ImageRef::parse("snap:v1").unwrap();
    let mut snap = record(&[&hex]);
    snap.base = Some(ImageBase::Host);
    store.put(&on_host, &snap).unwrap();
    let text = fs::read_to_string(store.record_path(&on_host)).unwrap();
    assert!(text.contains("\"base\": \"host\""), "{text}");
    assert!(!fs::read_to_string(store.record_path(&r))
        .unwrap()
        .contains("base"));
    assert_eq!(store.get(&on_host).unwrap().base, Some(ImageBase::Host));
    assert_eq!(
        store.sandbox_image("snap:v1").unwrap().source,
        ImageSource::HostLayers {
            name: "snap:v1".into(),
            layers: vec![store.layer_dir(&hex)]
        }
    );
}

#[test]
fn prune_removes_unnamed_layers_and_waits_for_leases() {
    let data = tempfile::tempdir_in("/tmp").unwrap();
    let store = Arc::new(Store::open(data.path()).unwrap());
    let runtime = Arc::new(Runtime::open(data.path()).unwrap());
    let kept = store
        .stage_tar(&tar_of(&[("kept", b"k")])[..], "t", "l")
        .unwrap();
    let loose = store
        .stage_tar(&tar_of(&[("loose", b"l")])[..], "t", "l")
        .unwrap();
    let (kept_hex, loose_hex) = (kept.digest.clone(), loose.digest.clone());
    let r = ImageRef::parse("kept").unwrap();
    store
        .commit(vec![kept, loose], Some((&r, &record(&[&kept_hex]))))
        .unwrap();
    // An interrupted move-in leaves an info file without its layer: prune clears it.
    fs::write(
        store
            .root()
            .join("layers/sha256")
            .join(format!("{}.json", "b".repeat(64))),
        b"{}",
    )
    .unwrap();

    let lease = store.lease().unwrap();
    let pruning = {
        let (store, runtime) = (store.clone(), runtime.clone());
        std::thread::spawn(move || store.prune(&runtime).unwrap())
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pruning.is_finished(), "prune waits for the lease");
    assert!(store.has_layer(&loose_hex));
    let released = Instant::now();
    drop(lease);
    let report = pruning.join().unwrap();
    assert!(released.elapsed() < Duration::from_secs(10));
    assert_eq!(report.layers, std::slice::from_ref(&loose_hex));
    assert!(report.bytes > 0);
    assert!(!store.has_layer(&loose_hex));
    assert!(store.has_layer(&kept_hex));
    assert_eq!(
        names(&store.root().join("layers/sha256")),
        [kept_hex.clone(), format!("{kept_hex}.json")]
    );
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
}
