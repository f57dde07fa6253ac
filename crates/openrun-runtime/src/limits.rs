//! Resource limits of a sandbox and the parsers for their human-written forms.
//!
//! Memory sizes use binary units like docker (`k` = 1024 bytes, `m` = 1024 k, ...); CPU counts
//! are decimal numbers of CPUs kept as thousandths (`1.5` → 1500); durations take `ms`, `s`, `m`
//! or `h` (a bare number is seconds). Numbers are parsed exactly, without floating point, so
//! `1.5G` is exactly 1610612736 bytes and `nan` or `inf` are simply not numbers.

use std::time::Duration;

/// Smallest accepted memory limit: less cannot start the sandbox agent plus a shell.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// Memory sizes must stay below 8 EiB (2^63 bytes) so they fit the kernel's signed counters.
pub const MAX_MEMORY_BYTES: u64 = i64::MAX as u64;
/// Smallest accepted CPU limit in thousandths of a CPU (0.01 CPUs: the kernel's 1 ms minimum
/// quota per 100 ms period).
pub const MIN_CPU_MILLIS: u64 = 10;
/// Largest accepted CPU limit in thousandths of a CPU (1024 CPUs).
pub const MAX_CPU_MILLIS: u64 = 1024 * 1000;
/// Smallest accepted process limit: the agent, a shell and a few children.
pub const MIN_PIDS: u64 = 8;
/// Largest accepted process limit (the kernel's `PID_MAX_LIMIT`).
pub const MAX_PIDS: u64 = 4 * 1024 * 1024;
/// Smallest accepted disk quota: the writable layer holds the sandbox's own `/etc` files and
/// overlayfs bookkeeping before anything the sandbox writes.
pub const MIN_DISK_BYTES: u64 = 1 << 20;
/// Largest accepted disk quota (the same 8 EiB bound as memory sizes).
pub const MAX_DISK_BYTES: u64 = i64::MAX as u64;
/// Smallest accepted open-files limit: a shell with its pipes and a few children's descriptors.
pub const MIN_OPEN_FILES: u64 = 64;
/// Largest accepted open-files limit: the kernel's default `fs.nr_open` (the most
/// `RLIMIT_NOFILE` can be set to without raising that sysctl), also Docker's default.
pub const MAX_OPEN_FILES: u64 = 1 << 20;
/// Open files per process when no limit is given (`RLIMIT_NOFILE`, soft = hard): what any
/// compiler, test runner or language server needs, 16 times below Docker's 1048576, so a
/// process that leaks descriptors fails early with `EMFILE` instead of pinning a million
/// kernel file objects.
pub const DEFAULT_OPEN_FILES: u64 = 65_536;
/// Longest accepted duration: 100 years (876000h), far below what `Instant` arithmetic allows.
pub const MAX_DURATION: Duration = Duration::from_secs(876_000 * 3600);

const MEMORY_FORM: &str = "expected a number with an optional unit k, m, g or t (e.g. 512M)";
const CPUS_FORM: &str = "expected a decimal number of cpus (e.g. 1.5)";
const PIDS_FORM: &str = "expected a whole number (e.g. 256)";
const OPEN_FILES_FORM: &str = "expected a whole number (e.g. 4096)";
const DURATION_FORM: &str = "expected a number with an optional unit ms, s, m or h (e.g. 30s)";

/// Processes and threads a sandbox may have when no limit is given: enough for any build, far
/// below the host's pid space, so a fork bomb is contained by default.
pub const DEFAULT_PIDS: u64 = 4096;

/// Resource limits of one sandbox. `None` means unlimited (the host's defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Memory limit in bytes (swap cannot be used to exceed it).
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU: 1500 = 1.5 CPUs.
    pub cpu_millis: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
    /// Quota of the writable layer in bytes (blocks and, proportionally, inodes): writes past
    /// it fail inside with `EDQUOT`. Needs the disk pool for `Storage::Disk` layers; a memory
    /// layer is a tmpfs of this size.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// `RLIMIT_NOFILE` (soft = hard) of every process in the sandbox;
    /// [`DEFAULT_OPEN_FILES`] when `None`.
    #[serde(default)]
    pub open_files: Option<u64>,
}

impl Limits {
    /// Checks that every set limit is within the bounds the parsers accept, for limits built
    /// directly rather than parsed (e.g. received as JSON).
    pub fn validate(&self) -> Result<(), LimitParseError> {
        if let Some(bytes) = self.memory_bytes {
            check_memory(bytes.to_string(), u128::from(bytes))?;
        }
        if let Some(millis) = self.cpu_millis {
            check_cpus(format_millis(millis), u128::from(millis))?;
        }
        if let Some(pids) = self.pids {
            check_pids(pids.to_string(), u128::from(pids))?;
        }
        if let Some(bytes) = self.disk_bytes {
            check_disk(bytes.to_string(), u128::from(bytes))?;
        }
        if let Some(n) = self.open_files {
            check_open_files(n.to_string(), u128::from(n))?;
        }
        Ok(())
    }

    /// The open-files limit asked for: the one given, else [`DEFAULT_OPEN_FILES`] (which the
    /// runtime lowers to the creator's own hard limit where that is smaller).
    pub fn open_files_or_default(&self) -> u64 {
        self.open_files.unwrap_or(DEFAULT_OPEN_FILES)
    }
}

/// A limit that could not be parsed or is out of range. The message names the value and what
/// was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitParseError {
    /// A bad memory size.
    #[error("invalid memory size {value:?}: {reason}")]
    Memory {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bad CPU count.
    #[error("invalid cpu count {value:?}: {reason}")]
    Cpus {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bad process limit.
    #[error("invalid pids limit {value:?}: {reason}")]
    Pids {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bad disk quota.
    #[error("invalid disk size {value:?}: {reason}")]
    Disk {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bad open-files limit.
    #[error("invalid open files limit {value:?}: {reason}")]
    OpenFiles {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bad duration.
    #[error("invalid duration {value:?}: {reason}")]
    Duration {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Parses a memory size such as `512M`, `1.5G`, `8192k`, `512MiB`, `2gb` or `8388608` (bytes).
///
/// Units are case-insensitive and binary (`k` = 1024), with an optional `b`, `ib` suffix. The
/// result must be at least [`MIN_MEMORY_BYTES`]; fractions of a byte are dropped.
pub fn parse_memory(s: &str) -> Result<u64, LimitParseError> {
    let err = |reason| LimitParseError::Memory {
        value: s.to_owned(),
        reason,
    };
    check_memory(s.to_owned(), parse_bytes(s, err)?)
}

/// Parses a disk quota such as `10G`, `512M` or `1.5T` (the units of [`parse_memory`]); at
/// least [`MIN_DISK_BYTES`].
pub fn parse_disk(s: &str) -> Result<u64, LimitParseError> {
    let err = |reason| LimitParseError::Disk {
        value: s.to_owned(),
        reason,
    };
    check_disk(s.to_owned(), parse_bytes(s, err)?)
}

/// Parses an open-files limit: a whole number from [`MIN_OPEN_FILES`] to [`MAX_OPEN_FILES`].
pub fn parse_open_files(s: &str) -> Result<u64, LimitParseError> {
    let n = parse_whole(s).ok_or_else(|| LimitParseError::OpenFiles {
        value: s.to_owned(),
        reason: OPEN_FILES_FORM,
    })?;
    check_open_files(s.to_owned(), n)
}

/// Parses a CPU count such as `1.5` (→ 1500), `0.25` (→ 250) or `2` (→ 2000) into thousandths
/// of a CPU. Accepts 0.01 to 1024; digits beyond the thousandths are dropped.
pub fn parse_cpus(s: &str) -> Result<u64, LimitParseError> {
    let number = Decimal::parse(s.trim()).ok_or_else(|| LimitParseError::Cpus {
        value: s.to_owned(),
        reason: CPUS_FORM,
    })?;
    // Saturate: anything that overflows is far above the maximum anyway.
    let millis = number.scale(1000).unwrap_or(u128::MAX);
    check_cpus(s.to_owned(), millis)
}

/// Parses a process limit: a whole number from [`MIN_PIDS`] to [`MAX_PIDS`].
pub fn parse_pids(s: &str) -> Result<u64, LimitParseError> {
    let n = parse_whole(s).ok_or_else(|| LimitParseError::Pids {
        value: s.to_owned(),
        reason: PIDS_FORM,
    })?;
    check_pids(s.to_owned(), n)
}

/// Parses a duration such as `30s`, `500ms`, `2m`, `1h`, `1.5s` or `90` (bare numbers are
/// seconds). It must be greater than zero and at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, LimitParseError> {
    let err = |reason| LimitParseError::Duration {
        value: s.to_owned(),
        reason,
    };
    let (number, unit) = split_unit(s.trim()).ok_or_else(|| err(DURATION_FORM))?;
    let nanos_per_unit: u128 = match unit.to_ascii_lowercase().as_str() {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3600 * 1_000_000_000,
        _ => return Err(err(DURATION_FORM)),
    };
    let too_large = "too large (at most 876000h)";
    let nanos = number.scale(nanos_per_unit).ok_or_else(|| err(too_large))?;
    if nanos == 0 {
        return Err(err("must be greater than zero"));
    }
    if nanos > MAX_DURATION.as_nanos() {
        return Err(err(too_large));
    }
    // Both parts fit: nanos is at most MAX_DURATION.
    let secs = (nanos / 1_000_000_000) as u64;
    let subsec = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, subsec))
}

const TOO_LARGE_MEMORY: &str = "must be less than 8 EiB";

/// A size with the units of [`unit_multiplier`], in bytes (not yet range-checked); `err`
/// makes the parser's own error from a reason.
fn parse_bytes(
    s: &str,
    err: impl Fn(&'static str) -> LimitParseError,
) -> Result<u128, LimitParseError> {
    let (number, unit) = split_unit(s.trim()).ok_or_else(|| err(MEMORY_FORM))?;
    let multiplier = unit_multiplier(unit).ok_or_else(|| err(MEMORY_FORM))?;
    number
        .scale(multiplier)
        .ok_or_else(|| err(TOO_LARGE_MEMORY))
}

/// A whole number of plain ASCII digits (surrounding whitespace allowed), not yet
/// range-checked; `None` if it is anything else. Overflow saturates: it is above any maximum.
fn parse_whole(s: &str) -> Option<u128> {
    let t = s.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: parsing fails only on overflow.
    Some(t.parse::<u128>().unwrap_or(u128::MAX))
}

fn check_memory(value: String, bytes: u128) -> Result<u64, LimitParseError> {
    in_range(
        bytes,
        MIN_MEMORY_BYTES,
        MAX_MEMORY_BYTES,
        "must be at least 4 MiB",
        TOO_LARGE_MEMORY,
    )
    .map_err(|reason| LimitParseError::Memory { value, reason })
}

/// Bytes per binary size unit (`k` = 1024), case-insensitive, with optional `b`/`ib`.
fn unit_multiplier(unit: &str) -> Option<u128> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    })
}

fn check_disk(value: String, bytes: u128) -> Result<u64, LimitParseError> {
    in_range(
        bytes,
        MIN_DISK_BYTES,
        MAX_DISK_BYTES,
        "must be at least 1 MiB",
        TOO_LARGE_MEMORY,
    )
    .map_err(|reason| LimitParseError::Disk { value, reason })
}

fn check_open_files(value: String, n: u128) -> Result<u64, LimitParseError> {
    in_range(
        n,
        MIN_OPEN_FILES,
        MAX_OPEN_FILES,
        "must be at least 64",
        "must be at most 1048576",
    )
    .map_err(|reason| LimitParseError::OpenFiles { value, reason })
}

fn check_cpus(value: String, millis: u128) -> Result<u64, LimitParseError> {
    in_range(
        millis,
        MIN_CPU_MILLIS,
        MAX_CPU_MILLIS,
        "must be at least 0.01",
        "must be at most 1024",
    )
    .map_err(|reason| LimitParseError::Cpus { value, reason })
}

fn check_pids(value: String, n: u128) -> Result<u64, LimitParseError> {
    in_range(
        n,
        MIN_PIDS,
        MAX_PIDS,
        "must be at least 8",
        "must be at most 4194304",
    )
    .map_err(|reason| LimitParseError::Pids { value, reason })
}

/// `n` as a `u64` if it lies in `min..=max`, else the reason it does not.
fn in_range(
    n: u128,
    min: u64,
    max: u64,
    too_small: &'static str,
    too_large: &'static str,
) -> Result<u64, &'static str> {
    if n < u128::from(min) {
        Err(too_small)
    } else if n > u128::from(max) {
        Err(too_large)
    } else {
        // At most `max`, a u64.
        Ok(n as u64)
    }
}

/// `1500` → `"1.5"`, for messages about CPU limits given in thousandths.
fn format_millis(millis: u64) -> String {
    let (whole, frac) = (millis / 1000, millis % 1000);
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{frac:03}")
            .trim_end_matches('0')
            .to_owned()
    }
}

/// Splits `"1.5 GiB"` into the number and the unit (`"GiB"`); one space may separate them.
fn split_unit(s: &str) -> Option<(Decimal, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    Some((Decimal::parse(number)?, unit))
}

/// A non-negative decimal `int.frac`, kept exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    int: u128,
    /// The fraction's digits as an integer (`.25` → 25).
    frac: u128,
    /// How many fraction digits `frac` holds (`.25` → 2).
    frac_digits: u32,
}

impl Decimal {
    /// Most fraction digits kept; later ones are below any unit we scale by and are dropped.
    const MAX_FRAC_DIGITS: usize = 18;

    /// Parses `digits` or `digits.digits`: no sign, exponent, or leading/trailing dot.
    fn parse(s: &str) -> Option<Self> {
        let (int, frac) = match s.split_once('.') {
            Some((int, frac)) => (int, Some(frac)),
            None => (s, None),
        };
        let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || !frac.is_none_or(all_digits) {
            return None;
        }
        let frac = frac.unwrap_or("");
        let frac = &frac[..frac.len().min(Self::MAX_FRAC_DIGITS)];
        Some(Self {
            // All digits: parsing fails only on overflow; treat it as the largest value.
            int: int.parse().unwrap_or(u128::MAX),
            frac: if frac.is_empty() {
                0
            } else {
                frac.parse().ok()?
            },
            frac_digits: frac.len() as u32,
        })
    }

    /// `self * unit`, rounded down; `None` on overflow.
    fn scale(self, unit: u128) -> Option<u128> {
        let whole = self.int.checked_mul(unit)?;
        let part = self.frac.checked_mul(unit)? / 10u128.pow(self.frac_digits);
        whole.checked_add(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn memory_units_are_binary_and_case_insensitive() {
        let cases: &[(&str, u64)] = &[
            ("512M", 512 * MIB),
            ("512m", 512 * MIB),
            ("1G", GIB),
            ("1.5G", GIB + GIB / 2),
            ("512MiB", 512 * MIB),
            ("512mib", 512 * MIB),
            ("2gb", 2 * GIB),
            ("2GB", 2 * GIB),
            ("4096K", 4 * MIB),
            ("4096kib", 4 * MIB),
            ("1t", 1 << 40),
            ("1.25TiB", (1 << 40) + (1 << 38)),
            ("4194304", 4 * MIB),
            ("4194304b", 4 * MIB),
            ("  8M  ", 8 * MIB),
            ("8 MiB", 8 * MIB),
            ("0.5g", GIB / 2),
            ("4.0000001M", 4 * MIB), // fractions of a byte are dropped
        ];
        for &(input, want) in cases {
            assert_eq!(parse_memory(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn memory_below_minimum_names_it() {
        for input in ["64k", "1048576", "0", "0M", "3.99M", "4194303", "1b"] {
            let err = parse_memory(input).unwrap_err();
            assert_eq!(
                err,
                LimitParseError::Memory {
                    value: input.into(),
                    reason: "must be at least 4 MiB"
                },
                "{input}"
            );
            assert!(err.to_string().contains("4 MiB"), "{err}");
        }
        assert_eq!(MIN_MEMORY_BYTES, 4 * MIB);
        assert_eq!(parse_memory("4M"), Ok(MIN_MEMORY_BYTES));
    }

    #[test]
    fn memory_garbage_is_rejected_with_the_expected_form() {
        for input in [
            "", " ", "12Q", "-1G", "-512", "+1G", "1.5.5G", ".5G", "1.G", "G", "1 G B", "1  G",
            "1e9", "nan", "inf", "1,5G", "1kk", "1pb", "½G", "１G", "1G\n2",
        ] {
            let err = parse_memory(input).unwrap_err();
            assert_eq!(
                err,
                LimitParseError::Memory {
                    value: input.into(),
                    reason: MEMORY_FORM
                },
                "{input:?}"
            );
        }
    }

    #[test]
    fn memory_overflow_is_rejected() {
        for input in [
            "8388608T", // exactly 2^63 bytes
            "18446744073709551616",
            "99999999999999999999999999999999999999999999T",
            "999999999999999999999999999999999999999999999999999",
        ] {
            let err = parse_memory(input).unwrap_err();
            assert!(
                matches!(
                    err,
                    LimitParseError::Memory {
                        reason: TOO_LARGE_MEMORY,
                        ..
                    }
                ),
                "{input}: {err}"
            );
        }
        assert_eq!(parse_memory("8388607T"), Ok(8_388_607 << 40));
    }

    #[test]
    fn memory_error_message_is_exact() {
        assert_eq!(
            parse_memory("12Q").unwrap_err().to_string(),
            r#"invalid memory size "12Q": expected a number with an optional unit k, m, g or t (e.g. 512M)"#
        );
        assert_eq!(
            parse_memory("1M").unwrap_err().to_string(),
            r#"invalid memory size "1M": must be at least 4 MiB"#
        );
    }

    #[test]
    fn cpus_are_thousandths() {
        let cases: &[(&str, u64)] = &[
            ("1.5", 1500),
            ("0.25", 250),
            ("2", 2000),
            ("0.01", 10),
            ("0.010", 10),
            ("0.0199", 19),
            ("1024", 1_024_000),
            ("1024.000", 1_024_000),
            (" 3 ", 3000),
            ("007", 7000),
        ];
        for &(input, want) in cases {
            assert_eq!(parse_cpus(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn cpus_out_of_range_or_garbage_are_rejected() {
        let low = "must be at least 0.01";
        let high = "must be at most 1024";
        let cases: &[(&str, &str)] = &[
            ("0", low),
            ("0.0", low),
            ("0.009", low),
            ("0.0099999", low),
            ("1024.001", high),
            ("1025", high),
            ("99999999999999999999999999999999999999999999", high),
            ("", CPUS_FORM),
            ("nan", CPUS_FORM),
            ("NaN", CPUS_FORM),
            ("inf", CPUS_FORM),
            ("-inf", CPUS_FORM),
            ("-1", CPUS_FORM),
            ("1.5cpus", CPUS_FORM),
            ("1e3", CPUS_FORM),
            ("1,5", CPUS_FORM),
            (".5", CPUS_FORM),
            ("1.", CPUS_FORM),
            ("1500m", CPUS_FORM),
        ];
        for &(input, reason) in cases {
            assert_eq!(
                parse_cpus(input),
                Err(LimitParseError::Cpus {
                    value: input.into(),
                    reason
                }),
                "{input:?}"
            );
        }
        assert_eq!(
            parse_cpus("abc").unwrap_err().to_string(),
            r#"invalid cpu count "abc": expected a decimal number of cpus (e.g. 1.5)"#
        );
    }

    #[test]
    fn pids_need_a_whole_number_of_at_least_eight() {
        assert_eq!(parse_pids("8"), Ok(8));
        assert_eq!(parse_pids("256"), Ok(256));
        assert_eq!(parse_pids(" 4194304 "), Ok(4_194_304));
        let cases: &[(&str, &str)] = &[
            ("7", "must be at least 8"),
            ("0", "must be at least 8"),
            ("4194305", "must be at most 4194304"),
            ("184467440737095516160000", "must be at most 4194304"),
            ("", PIDS_FORM),
            ("-8", PIDS_FORM),
            ("+8", PIDS_FORM),
            ("8.0", PIDS_FORM),
            ("1e3", PIDS_FORM),
            ("ten", PIDS_FORM),
        ];
        for &(input, reason) in cases {
            assert_eq!(
                parse_pids(input),
                Err(LimitParseError::Pids {
                    value: input.into(),
                    reason
                }),
                "{input:?}"
            );
        }
        assert_eq!(
            parse_pids("3").unwrap_err().to_string(),
            r#"invalid pids limit "3": must be at least 8"#
        );
    }

    #[test]
    fn durations_take_units_and_bare_seconds() {
        let cases: &[(&str, Duration)] = &[
            ("30s", Duration::from_secs(30)),
            ("500ms", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1.5s", Duration::from_millis(1500)),
            ("90", Duration::from_secs(90)),
            ("0.5", Duration::from_millis(500)),
            ("1.5h", Duration::from_secs(5400)),
            ("0.001ms", Duration::from_nanos(1000)),
            ("10S", Duration::from_secs(10)),
            ("10MS", Duration::from_millis(10)),
            ("5 m", Duration::from_secs(300)),
            ("876000h", MAX_DURATION),
        ];
        for &(input, want) in cases {
            assert_eq!(parse_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn bad_durations_are_rejected() {
        let zero = "must be greater than zero";
        let large = "too large (at most 876000h)";
        let cases: &[(&str, &str)] = &[
            ("0", zero),
            ("0s", zero),
            ("0.0000000001s", zero),
            ("876000.001h", large),
            ("99999999999999999999999999999999h", large),
            (
                "999999999999999999999999999999999999999999999999999999",
                large,
            ),
            ("", DURATION_FORM),
            ("-1s", DURATION_FORM),
            ("1d", DURATION_FORM),
            ("1us", DURATION_FORM),
            ("1h30m", DURATION_FORM),
            ("s", DURATION_FORM),
            ("1.s", DURATION_FORM),
            ("inf", DURATION_FORM),
            ("nan", DURATION_FORM),
        ];
        for &(input, reason) in cases {
            assert_eq!(
                parse_duration(input),
                Err(LimitParseError::Duration {
                    value: input.into(),
                    reason
                }),
                "{input:?}"
            );
        }
        assert_eq!(
            parse_duration("1x").unwrap_err().to_string(),
            r#"invalid duration "1x": expected a number with an optional unit ms, s, m or h (e.g. 30s)"#
        );
    }

    #[test]
    fn validate_applies_the_parsers_bounds() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let ok = Limits {
            memory_bytes: Some(MIN_MEMORY_BYTES),
            cpu_millis: Some(MIN_CPU_MILLIS),
            pids: Some(MIN_PIDS),
            disk_bytes: Some(MIN_DISK_BYTES),
            open_files: Some(MIN_OPEN_FILES),
        };
        assert_eq!(ok.validate(), Ok(()));

        let small_memory = Limits {
            memory_bytes: Some(1024),
            ..Limits::default()
        };
        assert_eq!(
            small_memory.validate().unwrap_err().to_string(),
            r#"invalid memory size "1024": must be at least 4 MiB"#
        );
        let small_cpu = Limits {
            cpu_millis: Some(5),
            ..Limits::default()
        };
        assert_eq!(
            small_cpu.validate().unwrap_err().to_string(),
            r#"invalid cpu count "0.005": must be at least 0.01"#
        );
        let big_cpu = Limits {
            cpu_millis: Some(MAX_CPU_MILLIS + 500),
            ..Limits::default()
        };
        assert_eq!(
            big_cpu.validate().unwrap_err().to_string(),
            r#"invalid cpu count "1024.5": must be at most 1024"#
        );
        let zero_pids = Limits {
            pids: Some(0),
            ..Limits::default()
        };
        assert!(matches!(
            zero_pids.validate(),
            Err(LimitParseError::Pids { .. })
        ));
        let small_disk = Limits {
            disk_bytes: Some(4096),
            ..Limits::default()
        };
        assert_eq!(
            small_disk.validate().unwrap_err().to_string(),
            r#"invalid disk size "4096": must be at least 1 MiB"#
        );
        let many_files = Limits {
            open_files: Some(MAX_OPEN_FILES + 1),
            ..Limits::default()
        };
        assert_eq!(
            many_files.validate().unwrap_err().to_string(),
            r#"invalid open files limit "1048577": must be at most 1048576"#
        );
    }

    #[test]
    fn disk_sizes_take_memory_units_and_a_1_mib_minimum() {
        assert_eq!(parse_disk("10G"), Ok(10 * GIB));
        assert_eq!(parse_disk("1M"), Ok(MIB));
        assert_eq!(parse_disk("1.5t"), Ok((1 << 40) + (1 << 39)));
        assert_eq!(parse_disk(" 512 MiB "), Ok(512 * MIB));
        let cases: &[(&str, &str)] = &[
            ("1023k", "must be at least 1 MiB"),
            ("0", "must be at least 1 MiB"),
            ("8388608T", TOO_LARGE_MEMORY),
            ("", MEMORY_FORM),
            ("-1G", MEMORY_FORM),
            ("10Q", MEMORY_FORM),
            ("1e9", MEMORY_FORM),
            ("nan", MEMORY_FORM),
        ];
        for &(input, reason) in cases {
            assert_eq!(
                parse_disk(input),
                Err(LimitParseError::Disk {
                    value: input.into(),
                    reason
                }),
                "{input:?}"
            );
        }
        assert_eq!(
            parse_disk("lots").unwrap_err().to_string(),
            r#"invalid disk size "lots": expected a number with an optional unit k, m, g or t (e.g. 512M)"#
        );
    }

    #[test]
    fn open_files_need_a_whole_number_from_64_to_nr_open() {
        assert_eq!(parse_open_files("64"), Ok(64));
        assert_eq!(parse_open_files(" 4096 "), Ok(4096));
        assert_eq!(parse_open_files("1048576"), Ok(MAX_OPEN_FILES));
        let cases: &[(&str, &str)] = &[
            ("63", "must be at least 64"),
            ("0", "must be at least 64"),
            ("1048577", "must be at most 1048576"),
            ("99999999999999999999999999999", "must be at most 1048576"),
            ("", OPEN_FILES_FORM),
            ("-1", OPEN_FILES_FORM),
            ("4k", OPEN_FILES_FORM),
            ("1e6", OPEN_FILES_FORM),
            ("unlimited", OPEN_FILES_FORM),
        ];
        for &(input, reason) in cases {
            assert_eq!(
                parse_open_files(input),
                Err(LimitParseError::OpenFiles {
                    value: input.into(),
                    reason
                }),
                "{input:?}"
            );
        }
        assert_eq!(
            Limits::default().open_files_or_default(),
            DEFAULT_OPEN_FILES
        );
        let set = Limits {
            open_files: Some(128),
            ..Limits::default()
        };
        assert_eq!(set.open_files_or_default(), 128);
    }

    #[test]
    fn limits_round_trip_through_json() {
        let limits = Limits {
            memory_bytes: Some(512 * MIB),
            cpu_millis: Some(1500),
            pids: None,
            disk_bytes: Some(GIB),
            open_files: None,
        };
        let json = serde_json::to_string(&limits).unwrap();
        assert_eq!(
            json,
            r#"{"memory_bytes":536870912,"cpu_millis":1500,"pids":null,"disk_bytes":1073741824,"open_files":null}"#
        );
        // Records written before disk and open-files limits existed still load.
        assert_eq!(
            serde_json::from_str::<Limits>(r#"{"memory_bytes":null,"cpu_millis":null,"pids":7}"#)
                .unwrap(),
            Limits {
                pids: Some(7),
                ..Limits::default()
            }
        );
        assert_eq!(serde_json::from_str::<Limits>(&json).unwrap(), limits);
        assert_eq!(
            serde_json::from_str::<Limits>("{}").unwrap(),
            Limits::default()
        );
    }

    #[test]
    fn format_millis_drops_trailing_zeros() {
        assert_eq!(format_millis(1500), "1.5");
        assert_eq!(format_millis(2000), "2");
        assert_eq!(format_millis(5), "0.005");
        assert_eq!(format_millis(250), "0.25");
    }
}
