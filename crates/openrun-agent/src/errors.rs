//! Turning system errors into protocol errors with a clear, lower-case message.

use openrun_protocol::{AgentError, ErrorCode, Pid};
use rustix::io::Errno;

/// Maps an errno from an operation on `path` to an [`AgentError`].
///
/// `EXDEV` and `ELOOP` are *not* treated as escapes here: only the path resolver knows whether
/// its resolve flags refused to leave the root (see `files::Files::resolve_error`).
pub(crate) fn errno_error(errno: Errno, path: &str) -> AgentError {
    let (code, what) = match errno {
        Errno::NOENT => (ErrorCode::NotFound, "no such file or directory"),
        Errno::ACCESS | Errno::PERM | Errno::ROFS => {
            (ErrorCode::PermissionDenied, "permission denied")
        }
        Errno::EXIST => (ErrorCode::AlreadyExists, "already exists"),
        Errno::NOTDIR => (ErrorCode::NotADirectory, "not a directory"),
        Errno::ISDIR => (ErrorCode::IsADirectory, "is a directory"),
        Errno::NOTEMPTY => (ErrorCode::DirectoryNotEmpty, "directory not empty"),
        Errno::NAMETOOLONG => (ErrorCode::InvalidArgument, "file name too long"),
        Errno::INVAL => (ErrorCode::InvalidArgument, "invalid argument"),
        Errno::FBIG => (ErrorCode::TooLarge, "file too large"),
        Errno::NOSPC | Errno::DQUOT => (ErrorCode::TooLarge, "no space left on device"),
        // Removing or replacing a mount point (`/tmp`, `/proc`, `/etc/hosts`): the sandbox's
        // mounts are fixed, so this is a refusal, not a failure of the agent.
        Errno::BUSY => (
            ErrorCode::PermissionDenied,
            "device or resource busy (a mount point cannot be removed or replaced)",
        ),
        other => {
            return AgentError::new(
                ErrorCode::Internal,
                format!("{}: {path}", errno_text(other)),
            )
        }
    };
    if errno == Errno::ROFS {
        return AgentError::new(code, format!("read-only file system: {path}"));
    }
    AgentError::new(code, format!("{what}: {path}"))
}

/// The C library's description of an errno, lower-cased and without the "(os error N)" suffix.
pub(crate) fn errno_text(errno: Errno) -> String {
    let text = std::io::Error::from_raw_os_error(errno.raw_os_error()).to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    lower_first(text)
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The process is not in the table.
pub(crate) fn no_such_process(pid: Pid) -> AgentError {
    AgentError::new(ErrorCode::NoSuchProcess, format!("no such process: {pid}"))
}

/// A generic internal failure with context.
pub(crate) fn internal(context: &str, err: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorCode::Internal, format!("{context}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_errnos_map_to_codes_and_name_the_path() {
        let cases = [
            (
                Errno::NOENT,
                ErrorCode::NotFound,
                "no such file or directory: /x/y",
            ),
            (
                Errno::ACCESS,
                ErrorCode::PermissionDenied,
                "permission denied: /x/y",
            ),
            (
                Errno::PERM,
                ErrorCode::PermissionDenied,
                "permission denied: /x/y",
            ),
            (
                Errno::EXIST,
                ErrorCode::AlreadyExists,
                "already exists: /x/y",
            ),
            (
                Errno::NOTDIR,
                ErrorCode::NotADirectory,
                "not a directory: /x/y",
            ),
            (
                Errno::ISDIR,
                ErrorCode::IsADirectory,
                "is a directory: /x/y",
            ),
            (
                Errno::NOTEMPTY,
                ErrorCode::DirectoryNotEmpty,
                "directory not empty: /x/y",
            ),
            (
                Errno::BUSY,
                ErrorCode::PermissionDenied,
                "device or resource busy (a mount point cannot be removed or replaced): /x/y",
            ),
            (
                Errno::ROFS,
                ErrorCode::PermissionDenied,
                "read-only file system: /x/y",
            ),
        ];
        for (errno, code, message) in cases {
            let err = errno_error(errno, "/x/y");
            assert_eq!(err.code, code, "{errno:?}");
            assert_eq!(err.message, message);
        }
    }

    #[test]
    fn escape_errnos_are_internal_outside_the_resolver() {
        let err = errno_error(Errno::XDEV, "/a");
        assert_eq!(err.code, ErrorCode::Internal);
        assert_eq!(err.message, "invalid cross-device link: /a");
        let err = errno_error(Errno::LOOP, "/b");
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(
            err.message.starts_with("too many levels of symbolic links"),
            "{}",
            err.message
        );
    }

    #[test]
    fn errno_text_has_no_suffix_and_is_lower_case() {
        assert_eq!(errno_text(Errno::IO), "input/output error");
    }
}
