//! Pseudo-terminals for processes started with `pty`.
//!
//! The master comes from `/dev/ptmx` as the agent sees it: inside a sandbox that is the
//! sandbox's own devpts instance. The slave is obtained from the master with `TIOCGPTPEER`
//! (no path lookup at all), falling back to the `ptsname` path on kernels without it.

use openrun_protocol::PtySize;
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

/// Both ends of a new terminal.
#[derive(Debug)]
pub(crate) struct PtyPair {
    /// The agent's end: reads the terminal output, writes typed input.
    pub(crate) master: OwnedFd,
    /// The process's end: its stdin, stdout, stderr and controlling terminal.
    pub(crate) slave: OwnedFd,
}

/// Opens a new terminal of the given size.
pub(crate) fn open(size: PtySize) -> Result<PtyPair, Errno> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let slave = match rustix::pty::ioctl_tiocgptpeer(
        &master,
        OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC,
    ) {
        Ok(slave) => slave,
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new())?;
            rustix::fs::open(
                name.as_c_str(),
                OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
                Mode::empty(),
            )?
        }
    };
    resize(&master, size)?;
    Ok(PtyPair { master, slave })
}

/// Sets the terminal size (`TIOCSWINSZ`); the foreground process group gets `SIGWINCH`.
pub(crate) fn resize(master: &OwnedFd, size: PtySize) -> Result<(), Errno> {
    rustix::termios::tcsetwinsize(
        master,
        Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_pty_has_the_requested_size_and_can_be_resized() {
        let pair = open(PtySize { rows: 24, cols: 80 }).expect("open /dev/ptmx");
        assert!(rustix::termios::isatty(&pair.slave));
        let ws = rustix::termios::tcgetwinsize(&pair.slave).unwrap();
        assert_eq!((ws.ws_row, ws.ws_col), (24, 80));
        resize(
            &pair.master,
            PtySize {
                rows: 50,
                cols: 132,
            },
        )
        .unwrap();
        let ws = rustix::termios::tcgetwinsize(&pair.slave).unwrap();
        assert_eq!((ws.ws_row, ws.ws_col), (50, 132));
    }
}
