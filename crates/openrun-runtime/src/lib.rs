//! openrun's namespace backend: Linux sandboxes built from the kernel's own primitives.
//!
//! A sandbox is a process tree in fresh user (its own 65,536 host ids), mount, pid, network
//! (loopback only), uts, ipc and cgroup namespaces, on an overlay root (read-only image plus a
//! per-sandbox writable layer), limited by cgroups (v1 or v2), whose pid 1 is the openrun agent.
//! See [`Runtime`] to create, list, reattach to and destroy sandboxes, and [`client`] to talk to
//! their agents.

pub mod cgroup;
mod cleaner;
pub mod client;
mod devices;
mod disk_pool;
pub mod error;
pub mod host_limits;
pub mod ids;
pub mod image;
mod init;
mod landlock;
pub mod limits;
mod network;
mod sandbox;
mod seccomp;
mod setup_channel;
pub mod spec;
pub mod state;
mod sys;
pub mod zygote;

pub use cleaner::exit_process;
pub use client::{AgentClient, AgentReceiver, AgentSender, AgentStream, ClientError};
pub use error::{Result, RuntimeError};
pub use limits::Limits;
pub use sandbox::{Runtime, Sandbox, SandboxOverlay};
pub use spec::{ImageSource, SandboxSpec, Storage};
pub use state::{MountRecord, SandboxRecord};
