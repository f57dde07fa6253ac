//! Timeline events of the egress proxy (`network.allow`, `network.deny`), written through the
//! database's single writer, at most [`PER_SECOND`] per sandbox and second and
//! [`SERVER_PER_SECOND`] for all sandboxes together: sandboxes looping on connections must not
//! flood the timeline or the writer, alone or together. Beyond that, events are counted and one
//! `network.suppressed` event (`{"count": N}`) per sandbox records them once the second is
//! over. Connections are decided either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::AppState;
use crate::db::{self, NewEvent};

/// Events per sandbox and second before they are only counted.
pub(crate) const PER_SECOND: u32 = 20;
/// Events of all sandboxes together per second before they are only counted.
pub(crate) const SERVER_PER_SECOND: u32 = 200;
/// Length of one counting window.
const WINDOW: Duration = Duration::from_secs(1);
/// Sandboxes tracked before idle windows are forgotten.
const MAX_TRACKED: usize = 4096;

#[derive(Debug)]
struct Window {
    start: Instant,
    count: u32,
    suppressed: u64,
    flush_pending: bool,
}

/// Per-sandbox counting windows, and the server's.
#[derive(Default)]
pub(crate) struct Limiter {
    windows: Mutex<HashMap<String, Window>>,
    /// Start and count of the server-wide window (`None` before the first event).
    server: Mutex<Option<(Instant, u32)>>,
}

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Write it, after a `network.suppressed` event for `carried` (when not 0).
    Write { carried: u64 },
    /// Only count it; `flush_after`: schedule the suppressed event then.
    Count { flush_after: Option<Duration> },
}

impl Limiter {
    fn decide(&self, sandbox: &str, now: Instant) -> Verdict {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_TRACKED && !windows.contains_key(sandbox) {
            windows.retain(|_, w| now.duration_since(w.start) < WINDOW || w.suppressed > 0);
        }
        let w = windows.entry(sandbox.to_string()).or_insert(Window {
            start: now,
            count: 0,
            suppressed: 0,
            flush_pending: false,
        });
        let mut carried = 0;
        if now.duration_since(w.start) >= WINDOW {
            carried = std::mem::take(&mut w.suppressed);
            w.start = now;
            w.count = 0;
        }
        if w.count < PER_SECOND && self.server_slot(now) {
            w.count += 1;
            return Verdict::Write { carried };
        }
        // Counted with the sandbox's other suppressed events (a carried count included).
        w.suppressed += carried + 1;
        let flush_after = (!w.flush_pending).then(|| {
            w.flush_pending = true;
            WINDOW.saturating_sub(now.duration_since(w.start))
        });
        Verdict::Count { flush_after }
    }

    /// Takes one of the server's events of this second, if any is left.
    fn server_slot(&self, now: Instant) -> bool {
        let mut server = self.server.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count) = server.get_or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        if *count < SERVER_PER_SECOND {
            *count += 1;
            true
        } else {
            false
        }
    }

    /// The suppressed count of `sandbox`, once its window is over.
    fn take_suppressed(&self, sandbox: &str) -> u64 {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        match windows.get_mut(sandbox) {
            Some(w) => {
                w.flush_pending = false;
                std::mem::take(&mut w.suppressed)
            }
            None => 0,
        }
    }
}

fn suppressed_event(sandbox: &str, tenant: &str, count: u64) -> NewEvent {
    NewEvent {
        sandbox_id: sandbox.to_string(),
        tenant: tenant.to_string(),
        actor: "system".into(),
        kind: "network.suppressed",
        payload: serde_json::json!({
            "count": count,
            "per_second": PER_SECOND,
            "server_per_second": SERVER_PER_SECOND,
        }),
    }
}

/// Records one connection event of `sandbox` (rate-limited, see the module's doc). Waits for
/// the write, so the event is on the timeline when the client gets its answer.
pub(crate) async fn record(
    state: &Arc<AppState>,
    sandbox: &str,
    tenant: &str,
    kind: &'static str,
    payload: serde_json::Value,
) {
    match state.egress.events.decide(sandbox, Instant::now()) {
        Verdict::Write { carried } => {
            let mut events = Vec::with_capacity(2);
            if carried > 0 {
                events.push(suppressed_event(sandbox, tenant, carried));
            }
            events.push(NewEvent {
                sandbox_id: sandbox.to_string(),
                tenant: tenant.to_string(),
                actor: "system".into(),
                kind,
                payload,
            });
            write(state, events).await;
        }
        Verdict::Count { flush_after: None } => {}
        Verdict::Count {
            flush_after: Some(after),
        } => {
            let (state, sandbox, tenant) = (state.clone(), sandbox.to_string(), tenant.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let count = state.egress.events.take_suppressed(&sandbox);
                if count > 0 {
                    write(&state, vec![suppressed_event(&sandbox, &tenant, count)]).await;
                }
            });
        }
    }
}

async fn write(state: &AppState, events: Vec<NewEvent>) {
    let result = state
        .db
        .call(move |c| {
            let tx = c.transaction()?;
            for event in &events {
                db::append_event(&tx, event)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot record a network event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_counted_then_reported_once() {
        let limiter = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..PER_SECOND {
            assert_eq!(limiter.decide("a", t0), Verdict::Write { carried: 0 });
        }
        assert_eq!(
            limiter.decide("a", t0 + Duration::from_millis(250)),
            Verdict::Count {
                flush_after: Some(Duration::from_millis(750))
            }
        );
        for _ in 0..9 {
            assert_eq!(
                limiter.decide("a", t0 + Duration::from_millis(300)),
                Verdict::Count { flush_after: None }
            );
        }
        // Another sandbox has its own budget.
        assert_eq!(limiter.decide("b", t0), Verdict::Write { carried: 0 });
        // The next window carries the count when nothing flushed it first...
        assert_eq!(
            limiter.decide("a", t0 + WINDOW),
            Verdict::Write { carried: 10 }
        );
        // ...and a flush after it finds nothing left.
        assert_eq!(limiter.take_suppressed("a"), 0);
    }

    #[test]
    fn many_sandboxes_together_are_limited_too() {
        let limiter = Limiter::default();
        let t0 = Instant::now();
        let sandboxes = SERVER_PER_SECOND / PER_SECOND;
        // Every sandbox within its own budget, the server's used up exactly...
        for s in 0..sandboxes {
            for _ in 0..PER_SECOND {
                assert_eq!(
                    limiter.decide(&format!("s{s}"), t0),
                    Verdict::Write { carried: 0 }
                );
            }
        }
        // ...so a fresh sandbox's events are only counted, flushed when its own second ends...
        assert_eq!(
            limiter.decide("late", t0 + Duration::from_millis(100)),
            Verdict::Count {
                flush_after: Some(WINDOW)
            }
        );
        assert_eq!(
            limiter.decide("late", t0 + Duration::from_millis(200)),
            Verdict::Count { flush_after: None }
        );
        assert_eq!(limiter.take_suppressed("late"), 2);
        // ...until the next second.
        assert_eq!(
            limiter.decide("late", t0 + WINDOW),
            Verdict::Write { carried: 0 }
        );
    }

    #[test]
    fn a_carried_count_is_not_lost_when_the_server_is_full() {
        let limiter = Limiter::default();
        let t0 = Instant::now();
        for _ in 0..PER_SECOND + 3 {
            limiter.decide("a", t0);
        }
        // A new second for "a", but the server's budget is used up by others meanwhile.
        let t1 = t0 + WINDOW;
        for s in 0..SERVER_PER_SECOND / PER_SECOND {
            for _ in 0..PER_SECOND {
                limiter.decide(&format!("s{s}"), t1);
            }
        }
        assert!(matches!(limiter.decide("a", t1), Verdict::Count { .. }));
        assert_eq!(limiter.take_suppressed("a"), 4);
    }
}
