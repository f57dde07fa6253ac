//! Timestamps: stored as milliseconds since the Unix epoch, shown as RFC 3339 in UTC.

/// Milliseconds since the Unix epoch, as stored in the database.
pub fn now_ms() -> i64 {
    i64::try_from(openrun_runtime::state::now_ms()).unwrap_or(i64::MAX)
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds, e.g. `2023-11-14T22:13:20.000Z`.
pub fn rfc3339(ms: i64) -> String {
    openrun_runtime::state::rfc3339(ms)
}
