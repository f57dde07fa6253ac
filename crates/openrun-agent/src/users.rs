//! Users and groups from the sandbox's own `/etc/passwd` and `/etc/group`. The parser and the
//! resolution of a request's `user` live in [`openrun_protocol::users`], shared with the
//! server (which finds homes and names owners by the same rules).

pub(crate) use openrun_protocol::users::{parse_group, parse_passwd, resolve_user, ResolvedUser};
