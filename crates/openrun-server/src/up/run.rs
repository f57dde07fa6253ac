//! One command of an `up` (a clone, an install, a setup step, the check) run through the exec
//! core call ([`crate::exec::run_attached`]: the `process.exec`/`process.exit` events and
//! owed exits come with it), its output forwarded as progress and its end summarized.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine;
use openrun_protocol::{ExecRequest, Stream};

use super::{Progress, UpError, UpEvent};
use crate::api::{Caller, Shared};
use crate::exec::{Ended, NotEnded};

/// Bytes of output an [`Outcome`] keeps (the end of stdout and stderr, interleaved).
pub(crate) const TAIL_BYTES: usize = 4096;

/// How long past its timeout a command may go unreported before the sandbox is given up on
/// (the agent kills it at the timeout and reports the exit).
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// How a command ended.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    /// Its exit code; 128 + N for a signal N, 124 for a timeout without a code, 127 or 126
    /// for a command that could not start (not found, not executable).
    pub exit_code: i32,
    /// How long it ran.
    pub duration_ms: u64,
    /// The last [`TAIL_BYTES`] of its stdout and stderr (lossy UTF-8), then a line saying why
    /// it ended when it was not an exit of its own (a signal, the timeout, memory).
    pub tail: String,
}

impl Outcome {
    /// Whether it exited with 0.
    pub(crate) fn ok(&self) -> bool {
        self.exit_code == 0
    }

    /// The last `lines` non-empty lines of the tail.
    pub(crate) fn last_lines(&self, lines: usize) -> String {
        let kept: Vec<&str> = self
            .tail
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        kept[kept.len().saturating_sub(lines)..].join("\n")
    }
}

/// The end of a command's output, bounded to [`TAIL_BYTES`] (an up's commands, MCP `up`'s
/// log).
#[derive(Debug, Default)]
pub(crate) struct Tail(VecDeque<u8>);

impl Tail {
    /// Adds a chunk, keeping the last [`TAIL_BYTES`].
    pub(crate) fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(TAIL_BYTES)..];
        let excess = (self.0.len() + data.len()).saturating_sub(TAIL_BYTES);
        self.0.drain(..excess);
        self.0.extend(data);
    }

    /// The bytes kept, as lossy UTF-8.
    pub(crate) fn text(&self) -> String {
        let bytes: Vec<u8> = self.0.iter().copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Runs `argv` in the caller's sandbox `sandbox_id` as step `step` (`cwd`, extra `env`, as
/// `user`, killed after `timeout`), forwarding its output to `progress` as
/// [`UpEvent::Output`]. A command that ran (whatever its exit) is an `Ok`; an error is a
/// sandbox that could not run it or went away, or the progress reader (the client) leaving:
/// the command is then killed with its process group (`cancelled`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_command(
    s: &Shared,
    caller: &Caller,
    sandbox_id: &str,
    step: &str,
    argv: Vec<String>,
    cwd: Option<String>,
    env: BTreeMap<String, String>,
    user: Option<String>,
    timeout: Duration,
    progress: &Progress,
) -> Result<Outcome, UpError> {
    let started = Instant::now();
    let request = ExecRequest {
        argv,
        env,
        cwd,
        user,
        timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        attach: true,
        tag: Some(format!("up:{step}")),
        ..Default::default()
    };
    let mut tail = Tail::default();
    let elapsed = |started: Instant| u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
    let ended = crate::exec::run_to_end(
        s,
        caller,
        sandbox_id,
        request,
        None,
        EXIT_GRACE,
        // The client left: the open stops, and so does what it runs (with its children),
        // instead of a long install running on for nobody.
        reader_left(progress),
        |stream, data| forward(progress, step, stream, data, &mut tail),
    )
    .await;
    let Ended {
        pid: _,
        code,
        signal,
        timed_out,
        oom_killed,
    } = match ended {
        Ok(ended) => ended,
        Err(NotEnded::Refused(e)) => return Err(UpError::from(e).at_step(step)),
        Err(NotEnded::Cancelled) => return Err(super::cancelled(step)),
        Err(NotEnded::Lost) => {
            return Err(UpError::new(
                "agent_lost",
                format!(
                    "step {step}: the command's output ended without an exit status (the \
                     sandbox may have stopped)"
                ),
            )
            .at_step(step))
        }
        Err(NotEnded::NoEnd) => {
            return Err(UpError::new(
                "internal",
                format!(
                    "step {step}: the sandbox did not report the command's end {} s after \
                     its timeout",
                    EXIT_GRACE.as_secs()
                ),
            )
            .at_step(step))
        }
        Err(NotEnded::Error { code, message }) => {
            // A command that could not start is the step's failure, as a shell reports it.
            let exit_code = match code.as_str() {
                "command_not_found" => 127,
                "permission_denied" => 126,
                "not_found" | "not_a_directory" | "invalid_argument" => 126,
                _ => {
                    return Err(UpError::new(&code, format!("step {step}: {message}")).at_step(step))
                }
            };
            let note = format!("[openrun: {message}]\n");
            forward(progress, step, Stream::Stderr, note.as_bytes(), &mut tail);
            return Ok(Outcome {
                exit_code,
                duration_ms: elapsed(started),
                tail: tail.text(),
            });
        }
    };
    let exit_code = match (code, signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 124,
    };
    let mut why = Vec::new();
    if timed_out {
        why.push(format!(
            "killed at its timeout of {}",
            human_duration(timeout)
        ));
    }
    if oom_killed {
        why.push("killed by the sandbox's memory limit (out of memory)".to_string());
    }
    if why.is_empty() {
        if let (None, Some(signal)) = (code, signal) {
            why.push(format!("killed by signal {signal}"));
        }
    }
    let mut text = tail.text();
    if !why.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("[openrun: {}]\n", why.join("; ")));
    }
    let exit_code = if exit_code == 0 && (timed_out || oom_killed) {
        124
    } else {
        exit_code
    };
    Ok(Outcome {
        exit_code,
        duration_ms: elapsed(started),
        tail: text,
    })
}

/// Resolves once the progress reader left (never for progress nobody reads).
async fn reader_left(progress: &Progress) {
    progress.reader_left().await;
}

/// Sends an output chunk as progress (dropped while the stream is full) and keeps its end.
fn forward(progress: &Progress, step: &str, stream: Stream, data: &[u8], tail: &mut Tail) {
    tail.push(data);
    let stream = match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    };
    progress.output(UpEvent::Output {
        step: step.to_string(),
        stream,
        data_b64: base64::engine::general_purpose::STANDARD.encode(data),
    });
}

/// `5 min`, `30 s`.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_bytes() {
        let mut tail = Tail::default();
        tail.push(&[b'a'; 3000]);
        tail.push(&[b'b'; 3000]);
        let text = tail.text();
        assert_eq!(text.len(), TAIL_BYTES);
        assert!(text.ends_with(&"b".repeat(3000)));
        tail.push(&vec![b'c'; 10_000]);
        assert_eq!(tail.text(), "c".repeat(TAIL_BYTES));
    }

    #[tokio::test]
    async fn a_reader_leaving_is_noticed_and_no_reader_never_leaves() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let progress = Progress::new(tx);
        let waiting = tokio::time::timeout(Duration::from_millis(50), reader_left(&progress));
        assert!(waiting.await.is_err(), "the reader is still there");
        drop(rx);
        tokio::time::timeout(Duration::from_secs(1), reader_left(&progress))
            .await
            .expect("the reader left");
        let nobody = Progress::unread();
        let waiting = tokio::time::timeout(Duration::from_millis(50), reader_left(&nobody));
        assert!(waiting.await.is_err());
    }

    #[test]
    fn last_lines_skip_blank_ones() {
        let outcome = Outcome {
            exit_code: 1,
            duration_ms: 0,
            tail: "a\nb\n\nc\n\n".into(),
        };
        assert_eq!(outcome.last_lines(2), "b\nc");
        assert_eq!(outcome.last_lines(10), "a\nb\nc");
    }
}
