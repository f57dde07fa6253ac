//! Reading a process's output pipes (or terminal master) into its buffers.
//!
//! While a client follows the stream, the reader takes from the pipe only as fast as the
//! slowest follower sends ([`crate::output::OutputBuffer::room`]): the rest waits in the
//! pipe, and a process that fills it blocks in `write`. Unfollowed output is read at once and
//! kept up to the retention.

use std::rc::Rc;

use openrun_protocol::{Pid, Stream};
use rustix::buffer::spare_capacity;
use rustix::fd::OwnedFd;
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use crate::agent::Agent;
use crate::output::{Followers, MAX_CHUNK};
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
    // Uninitialised: a read fills only what the pipe held, so a process that writes little
    // touches (and faults in) little of it; a zeroed buffer cost every start 16 page faults.
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_CHUNK);
    let followers = agent.with_process(pid, |p| p.buffer(stream).followers());
    loop {
        let take = match &followers {
            Some(followers) => room(&agent, pid, stream, followers, &mut phase).await,
            None => Some(MAX_CHUNK),
        };
        // The read goes to the buffer's spare capacity, after `skip` bytes that leave `take`
        // of it. Only a stream whose retention is below a chunk reads less than a whole
        // buffer; its filler is written once and kept (its contents never matter).
        let skip = take.map_or(0, |take| buf.capacity().saturating_sub(take));
        buf.truncate(skip);
        buf.resize(skip, 0);
        let event = match take {
            Some(_) => tokio::select! {
                biased;
                r = fd.async_io(Interest::READABLE, |f| {
                    rustix::io::read(f, spare_capacity(&mut buf)).map_err(std::io::Error::from)
                }) => Event::Read(r),
                _ = phase.wait_for(|p| *p != Phase::Running) => Event::Stop,
            },
            None => Event::Stop,
        };
        match event {
            Event::Read(Ok(0)) => break,
            Event::Read(Ok(_)) => agent.append_output(pid, stream, &buf[skip..]),
            // A terminal master reports EIO once every slave descriptor is closed.
            Event::Read(Err(e)) if e.raw_os_error() == Some(Errno::IO.raw_os_error()) => break,
            Event::Read(Err(e)) => {
                tracing::warn!(pid, ?stream, error = %e, "reading process output failed");
                break;
            }
            Event::Stop => {
                // Followers or not: the process is gone (or killed) and the reader must end.
                // What the pipe still holds may push unsent bytes out of the retention; a
                // follower that reattaches learns how many.
                let mut taken = 0;
                while taken < DRAIN_LIMIT {
                    buf.clear();
                    match rustix::io::read(fd.get_ref(), spare_capacity(&mut buf)) {
                        Ok(0) => break,
                        Ok(n) => {
                            taken += n;
                            agent.append_output(pid, stream, &buf);
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

/// Waits until the stream's followers leave room for another read, and returns how much to
/// read; `None` once the phase says to stop (the process was reaped and its grace period
/// passed, after an exit, a kill or its timeout), so that a client that stopped reading
/// cannot keep the reader, and so the exit, waiting forever. Sleeps on the followers' moves,
/// never polls.
async fn room(
    agent: &Agent,
    pid: Pid,
    stream: Stream,
    followers: &Followers,
    phase: &mut watch::Receiver<Phase>,
) -> Option<usize> {
    loop {
        let moved = followers.moved();
        let room = agent
            .with_process(pid, |p| p.buffer(stream).room())
            .unwrap_or(MAX_CHUNK);
        if room > 0 {
            return Some(room);
        }
        tokio::select! {
            biased;
            _ = phase.wait_for(|p| *p != Phase::Running) => return None,
            () = moved => {}
        }
    }
}
