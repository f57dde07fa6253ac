//! Wire types shared by the openrun agent (pid 1 in every sandbox), the runtime that talks to it,
//! and the clients built on top.
//!
//! The agent protocol is a stream of frames over a Unix socket (or, later, vsock). Each frame is a
//! small JSON header (a typed serde enum, never a string to parse) plus an optional raw byte
//! payload, so process output, stdin and file contents travel without base64.
//! See [`frame`] for the byte layout and [`message`] for the messages.

#![forbid(unsafe_code)]

pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod users;

pub use frame::{Frame, FrameError, MAX_DATA_LEN, MAX_HEADER_LEN};
pub use message::*;

/// Version of the agent protocol; a client and an agent agree on it in [`Request::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
