//! The local terminal during `-t` sessions: raw mode (restored on drop) and its size.

use openrun_protocol::PtySize;
use rustix::termios::{self, OptionalActions, Termios};

/// Puts stdin's terminal in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Enters raw mode if stdin is a terminal; `None` otherwise.
    pub fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        if !termios::isatty(&stdin) {
            return None;
        }
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        // Release builds abort on panic, so no drop would run: the hook puts the terminal back.
        let restore = saved.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &restore);
            previous(info);
        }));
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// Size of the local terminal (stdout's, else stdin's), or 24x80.
pub fn size() -> PtySize {
    let from = |ws: termios::Winsize| PtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    };
    termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin()))
        .ok()
        .filter(|ws| ws.ws_row > 0 && ws.ws_col > 0)
        .map(from)
        .unwrap_or(PtySize { rows: 24, cols: 80 })
}
