//! What the verbs print: tables, ages, id lists. Shared by the local and the server verbs.

use std::io::Write;

use anyhow::Result;

/// A short age or duration: `42s`, `3m5s`, `2h10m`.
pub fn format_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// When something expires, relative to `now_ms`: `in 14m59s`, `expired`, or `never`.
pub fn expires_in(expires_at_ms: Option<u64>, now_ms: u64) -> String {
    match expires_at_ms {
        None => "never".into(),
        Some(t) if t <= now_ms => "expired".into(),
        Some(t) => format!("in {}", format_ms(t - now_ms)),
    }
}

/// Prints ids one a line, or as a JSON array.
pub fn print_ids(ids: &[String], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(ids)?);
    } else {
        for id in ids {
            println!("{id}");
        }
    }
    Ok(())
}

/// Left-aligned columns separated by three spaces (the last one unpadded), headers first.
/// Control characters in cells are shown escaped (`\u{1b}`): cells may hold what a sandbox
/// wrote (its hostname, os-release, tool versions), which must not drive our terminal.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| inert(cell)).collect())
        .collect();
    let rows = &rows[..];
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i < last {
                let pad = widths
                    .get(i)
                    .map_or(0, |w| w.saturating_sub(cell.chars().count()));
                line.extend(std::iter::repeat_n(' ', pad + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` with its control characters escaped, so printing it cannot move the cursor, retitle
/// the window or otherwise command the terminal.
pub(crate) fn inert(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Writes `text` to stdout; a closed stdout (`| head`) is not an error.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        tracing::debug!("stdout closed");
    }
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp as the server writes them
/// (`2023-11-14T22:13:20.123Z`; fractions and a `+00:00` offset accepted).
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time
        .strip_suffix(['Z', 'z'])
        .or_else(|| time.strip_suffix("+00:00"))?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    // RFC 3339 years have four digits (a larger one would overflow the arithmetic below).
    let in_range = (0..=9999).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&day);
    if !in_range || !(0..=23).contains(&h) || !(0..=59).contains(&min) || !(0..=60).contains(&s) {
        return None;
    }
    let millis = match frac.len() {
        0 => 0,
        _ if frac.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{:0<3}", &frac[..frac.len().min(3)])
                .parse::<i64>()
                .ok()?
        }
        _ => return None,
    };
    let secs = days_from_civil(y, m, day) * 86_400 + h * 3600 + min * 60 + s;
    u64::try_from(secs * 1000 + millis).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_servers_timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00.000Z"),
            Some(951_782_400_000)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123Z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59.9Z"),
            Some(1_709_251_199_900)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59+00:00"),
            Some(1_709_251_199_000)
        );
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        // A hostile server's timestamps: no overflow, no negative time.
        assert_eq!(parse_rfc3339("99999999999999999-01-01T00:00:00Z"), None);
        assert_eq!(
            parse_rfc3339("2024-01-01T00:00:-9223372036854775808Z"),
            None
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00.x1Z"), None);
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["a".to_string(), "long value".to_string(), "x".to_string()],
            vec!["bbbb".to_string(), "v".to_string(), String::new()],
        ];
        assert_eq!(
            table(&["ID", "VALUE", "LAST"], &rows),
            "ID     VALUE        LAST\na      long value   x\nbbbb   v\n"
        );
        let rows = vec![vec!["\u{1b}]0;owned\u{7}".to_string(), "x".to_string()]];
        assert_eq!(
            table(&["HOST", "V"], &rows),
            "HOST                  V\n\\u{1b}]0;owned\\u{7}   x\n"
        );
    }

    #[test]
    fn ages_and_expiry() {
        assert_eq!(format_ms(59_999), "59s");
        assert_eq!(format_ms(185_000), "3m5s");
        assert_eq!(format_ms(7_800_000), "2h10m");
        assert_eq!(expires_in(None, 5), "never");
        assert_eq!(expires_in(Some(5), 5), "expired");
        assert_eq!(expires_in(Some(65_000), 5_000), "in 1m0s");
    }
}
