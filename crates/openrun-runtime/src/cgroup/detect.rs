//! Finding the cgroup layout in the mount table.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{v1, v2, CgroupError, Layout};

/// One cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    /// `cgroup` (v1) or `cgroup2`.
    fstype: String,
    /// Superblock options; for v1 they name the hierarchy's controllers (`rw,cpu,cpuacct`).
    super_options: String,
}

/// Picks v2 when a cgroup2 mount offers every controller we need, else v1 when every needed
/// controller has a v1 hierarchy. `controllers` reads a v2 mount's `cgroup.controllers`.
pub(super) fn layout(
    mountinfo: &str,
    controllers: impl Fn(&Path) -> io::Result<String>,
) -> Result<Layout, CgroupError> {
    let mounts = cgroup_mounts(mountinfo);

    let mut v2_problem = String::from("no cgroup2 filesystem is mounted");
    for mount in mounts.iter().filter(|m| m.fstype == "cgroup2") {
        let path = mount.point.join("cgroup.controllers");
        match controllers(&path) {
            Ok(offered) => {
                let offered: Vec<&str> = offered.split_whitespace().collect();
                let missing: Vec<&str> = v2::CONTROLLERS
                    .into_iter()
                    .filter(|c| !offered.contains(c))
                    .collect();
                if missing.is_empty() {
                    return Ok(Layout::V2(v2::Hierarchy::new(mount.point.clone())));
                }
                v2_problem = format!(
                    "cgroup2 at {} lacks {}",
                    mount.point.display(),
                    missing.join(", ")
                );
            }
            Err(e) => v2_problem = format!("cannot read {}: {e}", path.display()),
        }
    }

    let v1_mount = |controller: &str| {
        mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == controller))
            .map(|m| m.point.clone())
    };
    let found = v1::CONTROLLERS.map(v1_mount);
    if let [Some(memory), Some(pids), Some(cpu), Some(freezer)] = found.clone() {
        return Ok(Layout::V1(v1::Hierarchies {
            memory,
            pids,
            cpu,
            freezer,
        }));
    }
    let missing: Vec<&str> = v1::CONTROLLERS
        .into_iter()
        .zip(found)
        .filter(|(_, mount)| mount.is_none())
        .map(|(controller, _)| controller)
        .collect();
    Err(CgroupError::NoHierarchy(format!(
        "{v2_problem}; cgroup v1 has no hierarchy for {}",
        missing.join(", ")
    )))
}

/// The cgroup and cgroup2 mounts, in mount-table order.
///
/// A mountinfo line is `id parent major:minor root mount-point options [optional fields...] -
/// fstype source super-options`.
fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|&f| f == "-")?;
            let point = fields.get(4)?;
            let fstype = *fields.get(separator + 1)?;
            let super_options = fields.get(separator + 3).copied().unwrap_or("");
            (fstype == "cgroup" || fstype == "cgroup2").then(|| Mount {
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_owned(),
                super_options: super_options.to_owned(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes of space, tab, newline and backslash (`\040`).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/mountinfo` of the project's hybrid machines (trimmed).
    const HYBRID: &str = "\
22 1 254:1 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd host with only the unified hierarchy (optional fields before the separator).
    const PURE_V2: &str = "\
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn controllers(
        map: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&Path) -> io::Result<String> {
        move |path| {
            map.iter()
                .find(|(p, _)| Path::new(p) == path)
                .map(|(_, c)| c.to_string())
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn hybrid_host_uses_v1_hierarchies() {
        let read = controllers(&[("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n")]);
        match layout(HYBRID, read).unwrap() {
            Layout::V1(h) => {
                assert_eq!(h.memory, Path::new("/sys/fs/cgroup/memory"));
                assert_eq!(h.pids, Path::new("/sys/fs/cgroup/pids"));
                assert_eq!(h.cpu, Path::new("/sys/fs/cgroup/cpu"));
                assert_eq!(h.freezer, Path::new("/sys/fs/cgroup/freezer"));
            }
            Layout::V2(_) => panic!("hybrid host must use v1"),
        }
    }

    #[test]
    fn pure_v2_host_uses_the_unified_hierarchy() {
        let read = controllers(&[(
            "/sys/fs/cgroup/cgroup.controllers",
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )]);
        match layout(PURE_V2, read).unwrap() {
            Layout::V2(h) => assert_eq!(h.root(), Path::new("/sys/fs/cgroup")),
            Layout::V1(_) => panic!("pure v2 host must use v2"),
        }
    }

    #[test]
    fn v2_with_controllers_wins_over_v1() {
        let read = controllers(&[(
            "/sys/fs/cgroup/unified/cgroup.controllers",
            "memory pids cpu",
        )]);
        assert!(matches!(layout(HYBRID, read).unwrap(), Layout::V2(_)));
    }

    #[test]
    fn co_mounted_v1_controllers_share_a_hierarchy() {
        let mountinfo = "\
1 0 0:1 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
2 0 0:2 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
4 0 0:4 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
";
        match layout(mountinfo, controllers(&[])).unwrap() {
            Layout::V1(h) => assert_eq!(h.cpu, Path::new("/sys/fs/cgroup/cpu,cpuacct")),
            Layout::V2(_) => panic!("no cgroup2 mount"),
        }
    }

    #[test]
    fn missing_hierarchies_are_named() {
        let mountinfo = "\
1 0 0:1 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
2 0 0:2 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
3 0 0:3 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        let read = controllers(&[("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb")]);
        let err = layout(mountinfo, read).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no usable cgroup hierarchy: cgroup2 at /sys/fs/cgroup/unified lacks memory, pids, \
             cpu; cgroup v1 has no hierarchy for pids, freezer"
        );

        let err = layout("22 1 254:1 / / rw - ext4 /dev/vda rw\n", controllers(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no usable cgroup hierarchy: no cgroup2 filesystem is mounted; cgroup v1 has no \
             hierarchy for memory, pids, cpu, freezer"
        );
    }

    #[test]
    fn mount_points_are_unescaped() {
        let mountinfo = "1 0 0:1 / /mnt/cg\\040v2\\134x rw - cgroup2 cgroup2 rw\n";
        let read = controllers(&[("/mnt/cg v2\\x/cgroup.controllers", "cpu memory pids")]);
        match layout(mountinfo, read).unwrap() {
            Layout::V2(h) => assert_eq!(h.root(), Path::new("/mnt/cg v2\\x")),
            Layout::V1(_) => panic!("expected v2"),
        }
        assert_eq!(unescape("a\\011b\\012c\\9"), "a\tb\nc\\9");
    }
}
