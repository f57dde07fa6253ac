//! Users and groups from a sandbox's own `/etc/passwd` and `/etc/group`: the one parser and
//! the one resolution of a `user` field (`name`, `uid`, `uid:gid`, `name:group`), used by the
//! agent to run processes and by the server to find homes and name owners (so both follow the
//! same rules).
//!
//! The agent never calls `getpwnam` or anything else that goes through NSS: that would load
//! shared objects from the sandbox root into pid 1. The two files are parsed here instead;
//! malformed lines are skipped, like glibc's `files` backend does.
//!
//! Both files are the sandbox's to write, so parsing allocates in proportion to the file only:
//! a line is split into at most the fields it has by definition, and group member lists stay
//! one string, searched when needed.

use crate::{AgentError, ErrorCode};

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (may be empty).
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// The member list as written: comma-separated names (see [`GroupEntry::members`]).
    members: String,
}

impl GroupEntry {
    /// The member names.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
    }
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// Login name, when the uid has a passwd entry (or is the implicit root).
    pub name: Option<String>,
    /// User id.
    pub uid: u32,
    /// Group id the process runs with.
    pub gid: u32,
    /// Supplementary groups, primary gid first.
    pub groups: Vec<u32>,
    /// Home directory: the passwd entry's, `/root` for root without one, else `/`.
    pub home: String,
}

/// Parses `/etc/passwd` content, skipping comments and malformed lines.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            // name:password:uid:gid:gecos:home:shell; more colons are left in the last field.
            let fields: Vec<&str> = line.splitn(7, ':').collect();
            if fields.len() < 7 || fields[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_string(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` content, skipping comments and malformed lines.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end_matches('\r');
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            // name:password:gid:members; anything after a further colon is not a member.
            let fields: Vec<&str> = line.splitn(5, ':').collect();
            if fields.len() < 4 || fields[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: fields[0].to_string(),
                gid: fields[2].parse().ok()?,
                members: fields[3].to_string(),
            })
        })
        .collect()
}

/// Resolves a request's `user` field (`None` = root, a name, `uid` or `uid:gid`) against the
/// parsed databases.
pub fn resolve_user(
    spec: Option<&str>,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<ResolvedUser, AgentError> {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty());
    let (user_part, group_part) = match spec {
        None => ("0", None),
        Some(s) => match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        },
    };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|e| e.uid == uid).cloned().map(Ok),
        Err(_) => Some(
            passwd
                .iter()
                .find(|e| e.name == user_part)
                .cloned()
                .ok_or_else(|| {
                    AgentError::new(
                        ErrorCode::NotFound,
                        format!("no such user in /etc/passwd: {user_part}"),
                    )
                }),
        ),
    }
    .transpose()?;
    let uid = match &entry {
        Some(e) => e.uid,
        None => user_part.parse::<u32>().map_err(|_| {
            AgentError::new(
                ErrorCode::InvalidArgument,
                format!("invalid user: {user_part}"),
            )
        })?,
    };

    let explicit_gid = match group_part {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| {
                    AgentError::new(
                        ErrorCode::NotFound,
                        format!("no such group in /etc/group: {g}"),
                    )
                })?,
        }),
    };
    // Without a passwd entry, a bare uid gets the group of the same number rather than
    // group 0, which would hand out root's group.
    let gid = explicit_gid.unwrap_or_else(|| entry.as_ref().map_or(uid, |e| e.gid));

    let name = entry
        .as_ref()
        .map(|e| e.name.clone())
        .or_else(|| (uid == 0).then(|| "root".to_string()));
    let home = match &entry {
        Some(e) if !e.home.is_empty() => e.home.clone(),
        _ if uid == 0 => "/root".to_string(),
        _ => "/".to_string(),
    };

    let mut supplementary = vec![gid];
    // An explicit group (`uid:gid`) means exactly that group, like `docker run --user`.
    if explicit_gid.is_none() {
        if let Some(name) = &name {
            for group in groups {
                if !supplementary.contains(&group.gid) && group.members().any(|m| m == name) {
                    supplementary.push(group.gid);
                }
            }
        }
    }

    Ok(ResolvedUser {
        name,
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin

broken line without colons
short:x:5:5
baduid:x:abc:5::/home/bad:/bin/sh
:x:7:7::/home/noname:/bin/sh
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\r
bob:x:1001:1001::/home/bob:/bin/sh
";

    const GROUP: &str = "\
root:x:0:
alice:x:1000:
bob:x:1001:
docker:x:999:alice,bob
wheel:x:10: alice
broken
badgid:x:zz:alice
users:x:100:
";

    #[test]
    fn passwd_skips_comments_and_malformed_lines() {
        let entries = parse_passwd(PASSWD);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["root", "daemon", "alice", "bob"]);
        assert_eq!(entries[2].uid, 1000);
        assert_eq!(entries[2].home, "/home/alice");
    }

    #[test]
    fn group_skips_malformed_lines_and_trims_members() {
        let groups = parse_group(GROUP);
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["root", "alice", "bob", "docker", "wheel", "users"]);
        let members = |i: usize| groups[i].members().collect::<Vec<_>>();
        assert_eq!(members(3), ["alice", "bob"]);
        assert_eq!(members(4), ["alice"]);
    }

    #[test]
    fn extra_fields_and_huge_lines_parse_in_bounded_form() {
        let passwd = parse_passwd("carol:x:7:8:gecos:/home/c:/bin/sh:extra:fields\n");
        assert_eq!(passwd.len(), 1);
        assert_eq!((passwd[0].uid, passwd[0].gid), (7, 8));
        assert_eq!(passwd[0].home, "/home/c");
        let groups = parse_group("g:x:9:carol,dave:ignored\n");
        assert_eq!(groups[0].members().collect::<Vec<_>>(), ["carol", "dave"]);
        // A member list of a million names is kept as the one string it is.
        let huge = format!("big:x:10:{}carol\n", "m,".repeat(1_000_000));
        let groups = parse_group(&huge);
        assert_eq!(groups[0].members.len(), 2_000_005);
        let p = parse_passwd("carol:x:7:8::/home/c:/bin/sh\n");
        let carol = resolve_user(Some("carol"), &p, &groups).unwrap();
        assert_eq!(carol.groups, [8, 10]);
        // A line of nothing but colons.
        assert!(parse_passwd(&":".repeat(1_000_000)).is_empty());
    }

    #[test]
    fn names_resolve_with_supplementary_groups() {
        let (p, g) = (parse_passwd(PASSWD), parse_group(GROUP));
        let alice = resolve_user(Some("alice"), &p, &g).unwrap();
        assert_eq!((alice.uid, alice.gid), (1000, 1000));
        assert_eq!(alice.groups, [1000, 999, 10]);
        assert_eq!(alice.home, "/home/alice");
        assert_eq!(alice.name.as_deref(), Some("alice"));
    }

    #[test]
    fn default_is_root() {
        let (p, g) = (parse_passwd(PASSWD), parse_group(GROUP));
        let root = resolve_user(None, &p, &g).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        let bare = resolve_user(None, &[], &[]).unwrap();
        assert_eq!((bare.uid, bare.gid), (0, 0));
        assert_eq!(bare.name.as_deref(), Some("root"));
        assert_eq!(bare.home, "/root");
    }

    #[test]
    fn numeric_forms() {
        let (p, g) = (parse_passwd(PASSWD), parse_group(GROUP));
        let known = resolve_user(Some("1001"), &p, &g).unwrap();
        assert_eq!(known.name.as_deref(), Some("bob"));
        assert_eq!(known.groups, [1001, 999]);
        let unknown = resolve_user(Some("4242"), &p, &g).unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4242, 4242));
        assert_eq!(unknown.name, None);
        assert_eq!(unknown.home, "/");
        let pair = resolve_user(Some("4242:77"), &p, &g).unwrap();
        assert_eq!((pair.uid, pair.gid), (4242, 77));
        assert_eq!(pair.groups, [77]);
        let named_group = resolve_user(Some("alice:users"), &p, &g).unwrap();
        assert_eq!((named_group.uid, named_group.gid), (1000, 100));
        assert_eq!(named_group.groups, [100]);
    }

    #[test]
    fn unknown_names_are_not_found() {
        let (p, g) = (parse_passwd(PASSWD), parse_group(GROUP));
        let err = resolve_user(Some("mallory"), &p, &g).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert_eq!(err.message, "no such user in /etc/passwd: mallory");
        let err = resolve_user(Some("alice:nogroup"), &p, &g).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotFound);
        assert!(err.message.contains("nogroup"), "{}", err.message);
    }
}
