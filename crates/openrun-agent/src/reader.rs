//! Reading a process's output pipes (or terminal master) into its buffers.

use std::rc::Rc;

use openrun_protocol::{Pid, Stream};
use rustix::fd::OwnedFd;
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use crate::agent::Agent;
use crate::output::MAX_CHUNK;
use crate::process::Phase;

/// How much a stopping reader still takes from the pipe (what is already there), so a
/// grandchild that keeps writing cannot keep it busy forever.
const DRAIN_LIMIT: usize = 4 << 20;

enum Event {
    Read(std::io::Result<usize>),
    Stop,
}

/// Reads `fd` until EOF, or until the process's phase says to stop (then takes what is
/// already buffered in the pipe), appending everything to the process's `stream` buffer.
pub(crate) async fn read_stream(
    agent: Rc<Agent>,
    pid: Pid,
    stream: Stream,
    fd: Rc<AsyncFd<OwnedFd>>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let event = tokio::select! {
            biased;
            r = fd.async_io(Interest::READABLE, |f| {
                rustix::io::read(f, &mut buf[..]).map_err(std::io::Error::from)
            }) => Event::Read(r),
            _ = phase.wait_for(|p| *p != Phase::Running) => Event::Stop,
        };
        match event {
            Event::Read(Ok(0)) => break,
            Event::Read(Ok(n)) => agent.append_output(pid, stream, &buf[..n]),
            // A terminal master reports EIO once every slave descriptor is closed.
            Event::Read(Err(e)) if e.raw_os_error() == Some(Errno::IO.raw_os_error()) => break,
            Event::Read(Err(e)) => {
                tracing::warn!(pid, ?stream, error = %e, "reading process output failed");
                break;
            }
            Event::Stop => {
                let mut taken = 0;
                while taken < DRAIN_LIMIT {
                    match rustix::io::read(fd.get_ref(), &mut buf[..]) {
                        Ok(0) => break,
                        Ok(n) => {
                            taken += n;
                            agent.append_output(pid, stream, &buf[..n]);
                        }
                        Err(Errno::INTR) => {}
                        Err(_) => break,
                    }
                }
                break;
            }
        }
    }
    drop(fd);
    agent.reader_closed(pid);
}
