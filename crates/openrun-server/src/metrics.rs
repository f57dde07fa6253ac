//! Operations: the request middleware (Prometheus counters and one log line per request) and
//! `GET /metrics`, in the Prometheus text format 0.0.4.
//!
//! Everything is measured from outside the handlers: [`observe`] wraps the whole router and
//! reads the matched route template ([`MatchedPath`]), the status, the error code an
//! [`ApiError`] leaves in its response ([`ErrorCodeTag`]) and the caller [`tag_caller`] copies
//! there; sandbox creation times come from the admission layer ([`crate::admission`]). The
//! format is small enough to write by hand, which keeps a metrics framework (and its global
//! registry) out of the server.
//!
//! Label values are bounded so that no client can grow the series without limit: methods
//! outside the standard set are `OTHER`, a path that matched no route is `unmatched`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;

use crate::api::{Caller, Shared};
use crate::error::{ApiError, DbError, ErrorCodeTag};
use crate::openapi::ErrorAnswers;

/// Upper bounds (seconds) of the sandbox create time histogram.
pub const CREATE_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Route templates whose successful answer started a command.
const EXEC_ROUTES: [&str; 2] = ["/v1/sandboxes/{id}/exec", "/v1/sandboxes/{id}/exec/ws"];

/// Sandbox states always reported, even at zero (the API's states).
const STATES: [&str; 5] = ["creating", "running", "paused", "stopped", "error"];

/// Content type of the Prometheus text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The server's counters, shared by the middleware, the admission layer and `/metrics`.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    execs: AtomicU64,
    creates_rejected: AtomicU64,
    create_seconds: Mutex<Histogram>,
}

/// A fixed-bucket histogram ([`CREATE_BUCKETS`]).
#[derive(Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    counts: [u64; CREATE_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Metrics {
    /// Records one successful sandbox creation and how long it took.
    pub fn observe_create(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = CREATE_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(CREATE_BUCKETS.len());
        let mut h = lock(&self.create_seconds);
        h.counts[bucket] += 1;
        h.sum += secs;
        h.count += 1;
    }

    /// Mean sandbox creation time so far, if any was created.
    pub fn mean_create(&self) -> Option<Duration> {
        let h = lock(&self.create_seconds);
        (h.count > 0).then(|| Duration::from_secs_f64(h.sum / h.count as f64))
    }

    /// Records a create refused because the server was at capacity.
    pub fn reject_create(&self) {
        self.creates_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one answered request.
    fn observe_request(
        &self,
        method: &'static str,
        route: &str,
        status: StatusCode,
        code: Option<&str>,
    ) {
        *lock(&self.requests)
            .entry((method, route.to_string(), status.as_u16()))
            .or_default() += 1;
        if status.is_client_error() || status.is_server_error() {
            let code = code.map_or_else(|| format!("http_{}", status.as_u16()), str::to_string);
            *lock(&self.errors).entry(code).or_default() += 1;
        }
        let started_command = status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS;
        if started_command && EXEC_ROUTES.contains(&route) {
            self.execs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The text exposition, with `sandboxes` (state → count) and the warm pool's counters
    /// read at scrape time.
    fn render(&self, sandboxes: &BTreeMap<String, u64>, pool: crate::pool::Stats) -> String {
        let mut out = String::new();
        header_lines(
            &mut out,
            "openrun_sandboxes",
            "gauge",
            "Sandboxes by state (deleted ones excluded).",
        );
        let mut states: BTreeMap<&str, u64> = STATES.iter().map(|s| (*s, 0)).collect();
        for (state, n) in sandboxes {
            *states.entry(state.as_str()).or_default() += n;
        }
        for (state, n) in states {
            let _ = writeln!(out, "openrun_sandboxes{{state=\"{}\"}} {n}", escape(state));
        }

        let name = "openrun_sandbox_create_seconds";
        header_lines(
            &mut out,
            name,
            "histogram",
            "Time to create a sandbox (successful creates, after admission).",
        );
        {
            let h = lock(&self.create_seconds);
            let mut cumulative = 0;
            for (le, n) in CREATE_BUCKETS.iter().zip(h.counts) {
                cumulative += n;
                let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum {}", h.sum);
            let _ = writeln!(out, "{name}_count {}", h.count);
        }

        counter(
            &mut out,
            "openrun_exec_total",
            "Commands started (exec requests answered with success).",
            self.execs.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "openrun_creates_rejected_total",
            "Sandbox creates refused with 429 (create slots and queue full).",
            self.creates_rejected.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "openrun_warm_pool_size",
            "Sandboxes the warm pool keeps ready (--warm-pool).",
            pool.target as u64,
        );
        gauge(
            &mut out,
            "openrun_warm_pool_ready",
            "Warm-pool sandboxes ready now.",
            pool.ready as u64,
        );
        counter(
            &mut out,
            "openrun_warm_pool_hits_total",
            "Creates served from the warm pool.",
            pool.hits,
        );
        counter(
            &mut out,
            "openrun_warm_pool_misses_total",
            "Creates the warm pool could have served but found empty (made cold).",
            pool.misses,
        );

        header_lines(
            &mut out,
            "openrun_http_requests_total",
            "counter",
            "HTTP requests by method, route template and status.",
        );
        for ((method, route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "openrun_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }

        header_lines(
            &mut out,
            "openrun_http_errors_total",
            "counter",
            "HTTP answers with a 4xx or 5xx status, by error code.",
        );
        for (code, n) in lock(&self.errors).iter() {
            let _ = writeln!(
                out,
                "openrun_http_errors_total{{code=\"{}\"}} {n}",
                escape(code)
            );
        }
        out
    }
}

fn header_lines(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A gauge without labels.
fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header_lines(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A counter without labels.
fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header_lines(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// A poisoned lock still holds consistent counters (every update is one statement).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The label of a method: the standard ones by name, anything else `OTHER`.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    KNOWN
        .into_iter()
        .find(|m| *m == method.as_str())
        .unwrap_or("OTHER")
}

/// Middleware around the whole router: counts every request and logs it once (info for 4xx
/// and 5xx, debug otherwise) with its method, route template, status, latency (to the
/// response head: a stream may go on) and tenant when the key was valid.
pub async fn observe(
    State(metrics): State<std::sync::Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    let status = response.status();
    let code = response.extensions().get::<ErrorCodeTag>().map(|t| t.0);
    let tenant = response
        .extensions()
        .get::<Caller>()
        .map(|c| c.tenant.as_str());
    // Whole microseconds, so the field prints as e.g. 0.828.
    let latency_ms = started.elapsed().as_micros() as f64 / 1000.0;
    metrics.observe_request(method, &route, status, code);
    if status.is_client_error() || status.is_server_error() {
        tracing::info!(
            method,
            route,
            status = status.as_u16(),
            latency_ms,
            tenant,
            code,
            "request"
        );
    } else {
        tracing::debug!(
            method,
            route,
            status = status.as_u16(),
            latency_ms,
            tenant,
            "request"
        );
    }
    response
}

/// Route layer inside authentication: copies the [`Caller`] into the response, for
/// [`observe`]'s log line.
pub async fn tag_caller(
    Extension(caller): Extension<Caller>,
    req: Request,
    next: Next,
) -> Response {
    let mut response = next.run(req).await;
    response.extensions_mut().insert(caller);
    response
}

/// `GET /metrics`: the server's metrics in the Prometheus text format 0.0.4 (needs a key).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format 0.0.4: openrun_sandboxes{state}, \
        openrun_sandbox_create_seconds (histogram), openrun_exec_total, openrun_http_requests_total\
        {method,route,status}, openrun_http_errors_total{code}, openrun_creates_rejected_total",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String), ErrorAnswers))]
pub async fn scrape(State(s): State<Shared>) -> Result<Response, ApiError> {
    let sandboxes = s.db.call(sandboxes_by_state).await?;
    let body = s.metrics.render(&sandboxes, s.pool.stats());
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response())
}

/// Live (not deleted) sandboxes per state.
fn sandboxes_by_state(conn: &mut rusqlite::Connection) -> Result<BTreeMap<String, u64>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT state, COUNT(*) FROM sandboxes WHERE deleted_at IS NULL GROUP BY state",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (state, n) = row?;
        out.insert(state, u64::try_from(n).unwrap_or(0));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        let m = Metrics::default();
        m.observe_create(Duration::from_millis(3));
        m.observe_create(Duration::from_millis(300));
        m.observe_create(Duration::from_secs(60));
        m.observe_request("GET", "a\"b\\c\nd", StatusCode::NOT_FOUND, None);
        let text = m.render(
            &BTreeMap::from([("running".to_string(), 2)]),
            crate::pool::Stats::default(),
        );
        assert!(
            text.contains("openrun_sandbox_create_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("openrun_sandbox_create_seconds_bucket{le=\"0.25\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("openrun_sandbox_create_seconds_bucket{le=\"0.5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("openrun_sandbox_create_seconds_bucket{le=\"10\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("openrun_sandbox_create_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("openrun_sandbox_create_seconds_count 3\n"),
            "{text}"
        );
        assert!(
            text.contains("openrun_sandboxes{state=\"running\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("openrun_sandboxes{state=\"paused\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains(r#"route="a\"b\\c\nd",status="404"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("openrun_http_errors_total{code=\"http_404\"} 1\n"),
            "{text}"
        );
        assert_eq!(m.mean_create().map(|d| d.as_millis()), Some(20101));
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "OTHER");
    }
}
