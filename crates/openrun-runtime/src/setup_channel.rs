//! The socketpair between the creator (host side) and the sandbox's init while the sandbox is
//! being built: the host sends `Go` with the cgroup's v1 `tasks` files and the idmapped lower
//! mounts attached; the init answers
//! `Ready` or the exact step that failed, so setup errors reach the caller instead of a log.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors one message carries: a v1 cgroup's `tasks` files, every lower mount of a
/// sandbox and its `/dev`.
pub const MAX_FDS: usize = crate::cgroup::MAX_TASKS_FILES + crate::image::MAX_LOWERS + 1;
const MAX_MESSAGE: usize = 4096;

/// Messages on the setup channel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SetupMessage {
    /// Host → init: id maps and the cgroup are in place. Attached: the cgroup's v1 `tasks`
    /// files for the init to join it through (the first `tasks_files`; none on v2, where the
    /// init was made inside its cgroup), then the lower mounts, then the `/dev` template.
    Go {
        /// How many of the descriptors are `tasks` files.
        tasks_files: usize,
    },
    /// Init → host: the agent is about to serve.
    Ready,
    /// Init → host: a step failed.
    Failed {
        /// What the init was doing.
        stage: String,
        /// errno of the failure, when it was a syscall.
        errno: Option<i32>,
        /// Description.
        message: String,
    },
}

/// Sends a message with file descriptors attached.
pub fn send(
    sock: BorrowedFd<'_>,
    msg: &SetupMessage,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    send_bytes(sock, &serde_json::to_vec(msg)?, fds)
}

/// Sends `bytes` as one message with `fds` (at most [`MAX_FDS`]) attached, retrying on
/// `EINTR`. Shared by the setup channel and the create zygote's channels.
pub(crate) fn send_bytes(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(
            "too many descriptors for one message",
        ));
    }
    loop {
        match sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receives a message and any descriptors attached to it. A closed peer is `UnexpectedEof`.
pub fn recv(sock: impl AsFd) -> std::io::Result<(SetupMessage, Vec<OwnedFd>)> {
    let mut buf = [0u8; MAX_MESSAGE];
    let (len, fds) = recv_bytes(sock.as_fd(), &mut buf)?;
    if len == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let got = &buf[..len];
    let msg = serde_json::from_slice(got)?;
    Ok((msg, fds))
}

/// Receives one message into `buf` with the descriptors attached to it (close-on-exec, at
/// most [`MAX_FDS`]), retrying on `EINTR`: its length (0 at end of file) and the descriptors.
pub(crate) fn recv_bytes(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    Ok((got.bytes, fds))
}
