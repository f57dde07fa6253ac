//! Users and groups from the sandbox's own `/etc/passwd` and `/etc/group`. The parser and the
//! resolution of a request's `user` live in [`openrun_protocol::users`], shared with the
//! server (which finds homes and names owners by the same rules).

pub(crate) use openrun_protocol::users::{parse_group, parse_passwd, resolve_user, ResolvedUser};

use openrun_protocol::users::{GroupEntry, PasswdEntry};

use crate::files::FileStamp;

/// How long after its last change a user database may be cached (see [`FileStamp::settled`]):
/// many ticks of any file system clock.
pub(crate) const SETTLED: std::time::Duration = std::time::Duration::from_millis(100);

/// `/etc/passwd` and `/etc/group`, parsed, with the stamps they had when read: reused for as
/// long as both files keep these stamps, so an exec does not read and parse them again.
#[derive(Debug)]
pub(crate) struct UserDb {
    pub(crate) stamps: [FileStamp; 2],
    pub(crate) passwd: Vec<PasswdEntry>,
    pub(crate) groups: Vec<GroupEntry>,
}
