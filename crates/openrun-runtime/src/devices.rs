//! The sandbox `/dev`: a template directory built once on the host (device nodes, `pts` and
//! `shm` mount points, the usual symlinks), mounted read-only and idmapped into every sandbox
//! in one step, with a private devpts and `/dev/shm` on top inside the sandbox.
//!
//! Only these nodes exist: null, zero, full, random, urandom and tty (plus the sandbox's own
//! pseudo-terminals). The mount is read-only, so no sandbox can add nodes or files, and since
//! every sandbox shares the template, none can leave anything there for another.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{makedev, mknodat, FileType, Mode, CWD};

/// Character devices of the template: name, major, minor.
const NODES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Symlinks of the template: name, target.
const LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
];

/// Returns the template under `run_root`, building it if it is missing.
pub fn ensure_template(run_root: &Path) -> io::Result<PathBuf> {
    let dir = run_root.join("dev");
    if dir.join("tty").exists() {
        return Ok(dir);
    }
    let tmp = run_root.join(format!(".dev-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    build(&tmp)?;
    match fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Built concurrently by another creator: theirs is as good as ours.
        Err(_) if dir.join("tty").exists() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn build(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(dir)?;
    for (name, major, minor) in NODES {
        let path = dir.join(name);
        mknodat(
            CWD,
            &path,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            makedev(*major, *minor),
        )?;
        // mknod applies the umask: set the mode explicitly.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
    }
    for (name, mode) in [("pts", 0o755), ("shm", 0o1777)] {
        let path = dir.join(name);
        fs::create_dir(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    for (name, target) in LINKS {
        symlink(target, dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[test]
    fn the_template_holds_exactly_the_safe_nodes() {
        let root = tempfile::tempdir().unwrap();
        let dir = ensure_template(root.path()).unwrap();
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<&str> = NODES.iter().map(|n| n.0).collect();
        expected.extend(LINKS.iter().map(|l| l.0));
        expected.extend(["pts", "shm"]);
        expected.sort();
        assert_eq!(names, expected);
        let null = fs::metadata(dir.join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!(null.mode() & 0o777, 0o666);
        // Reused, not rebuilt.
        assert_eq!(ensure_template(root.path()).unwrap(), dir);
    }
}
