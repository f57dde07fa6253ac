//! Timestamps: stored as milliseconds since the Unix epoch, shown as RFC 3339 in UTC.

/// Milliseconds since the Unix epoch, as stored in the database.
pub fn now_ms() -> i64 {
    i64::try_from(openrun_runtime::state::now_ms()).unwrap_or(i64::MAX)
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds, e.g. `2023-11-14T22:13:20.000Z`.
pub fn rfc3339(ms: i64) -> String {
    openrun_runtime::state::rfc3339(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }
}
