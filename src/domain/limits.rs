//! Per-tenant limits (`spec.limits`) and storage usage, as pure rules both the operator and the
//! API use: parsing the spec's durations and quantities, the quota's hysteresis, when a
//! measured usage is worth a status write, and the bounded set of per-tenant metric series.

use std::collections::BTreeMap;

/// The CRD pattern of `spec.limits.statementTimeout`: one or more `<integer><unit>` with the
/// units `ms`, `s`, `m`, `h` (`500ms`, `2s`, `1m30s`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// The CRD pattern of `spec.limits.storage`: a Kubernetes quantity without exponent, e.g.
/// `500Mi`, `2Gi`, `1.5G`, `1048576`.
pub const QUANTITY_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// The largest statement timeout accepted: 24 hours (PostgreSQL's own bound is ~24.8 days).
pub const MAX_STATEMENT_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// Writes resume once usage falls below this share of the quota (in per cent).
pub const RESUME_PERCENT: u64 = 90;

/// `spec.limits.statementTimeout` in milliseconds: at least 1 ms, at most 24 h.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad =
        || format!("{s:?} is not a duration such as 500ms, 2s, 1m or 1m30s (units ms, s, m, h)");
    let mut total: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if total == 0 {
        return Err(format!(
            "{s:?} is zero; a statement timeout must be at least 1ms (remove the field for the default)"
        ));
    }
    if total > MAX_STATEMENT_TIMEOUT_MS {
        return Err(format!("{s:?} is longer than 24h"));
    }
    Ok(total)
}

/// `spec.limits.storage` in bytes (rounded up to a whole byte): a quantity such as `500Mi`,
/// `2Gi`, `1.5G` or `1048576`; at least 1 byte.
pub fn parse_quantity_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a storage quantity such as 500Mi, 2Gi or 1048576");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(bad()),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (number.contains('.') && frac.is_empty())
        || frac.len() > 18
    {
        return Err(bad());
    }
    let int: u128 = int.parse().map_err(|_| bad())?;
    let scale = 10u128.pow(frac.len() as u32);
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let bytes = int
        .checked_mul(multiplier)
        .and_then(|i| frac.checked_mul(multiplier).map(|f| i + f.div_ceil(scale)))
        .filter(|b| *b <= i64::MAX as u128)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err(format!(
            "{s:?} is zero; a storage quota must be at least 1 byte (remove the field for no quota)"
        ));
    }
    Ok(bytes as u64)
}

/// Bytes as a short Kubernetes-style binary quantity for people: `0`, `812`, `96Ki`, `1.4Mi`,
/// `12Gi` (one decimal below 10 of a unit, none above).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut value = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    if value < 10.0 {
        let tenths = (value * 10.0).round() / 10.0;
        if tenths.fract() == 0.0 {
            format!("{}{unit}", tenths as u64)
        } else {
            format!("{tenths:.1}{unit}")
        }
    } else {
        format!("{}{unit}", value.round() as u64)
    }
}

/// Whether a tenant is over its storage quota now, given whether it was (the `QuotaExceeded`
/// condition), its measured usage and its quota: it enters above the quota and leaves once
/// usage falls below [`RESUME_PERCENT`] of it, so that a usage hovering at the quota does
/// not flip writes on and off. Without a measurement it stays as it was; without a quota it
/// is never over.
pub fn over_quota(was_over: bool, used: Option<u64>, quota: Option<u64>) -> bool {
    match (quota, used) {
        (None, _) => false,
        (Some(_), None) => was_over,
        (Some(q), Some(u)) if was_over => (u as u128) * 100 >= (q as u128) * RESUME_PERCENT as u128,
        (Some(q), Some(u)) => u > q,
    }
}

/// The smallest change of usage worth a status write: 1 % of the value shown …
pub const WRITE_CHANGE_PERCENT: u64 = 1;
/// … and at least one 8 KiB page, so that tiny tenants do not write on every row.
pub const WRITE_CHANGE_MIN_BYTES: u64 = 8192;
/// A usage shown longer ago than this is written again even if unchanged (so that
/// `measuredAt` says the measurement is alive), in seconds.
/// Six hours: 10,000 unchanging tenants then cost one status write every two seconds.
pub const WRITE_REFRESH_SECS: i64 = 6 * 3600;

/// Whether a new measurement should replace the usage the status shows (`shown`: bytes and
/// when they were measured, RFC 3339). The rule keeps apiserver writes bounded: a write when
/// nothing is shown yet; when usage moved by at least 1 % (and one page); when it crossed the
/// quota or the resume threshold; and once every 6 hours. Everything else waits.
pub fn usage_worth_writing(
    shown: Option<(u64, &str)>,
    measured: u64,
    measured_at: &str,
    quota: Option<u64>,
) -> bool {
    let Some((old, old_at)) = shown else {
        return true;
    };
    let diff = old.abs_diff(measured);
    if diff >= WRITE_CHANGE_MIN_BYTES && diff * 100 >= old.max(1) * WRITE_CHANGE_PERCENT {
        return true;
    }
    if let Some(q) = quota {
        let resume = (q as u128 * RESUME_PERCENT as u128 / 100) as u64;
        for threshold in [q, resume] {
            if (old > threshold) != (measured > threshold) {
                return true;
            }
        }
    }
    let age = |a: &str, b: &str| -> Option<i64> {
        let a: k8s_openapi::jiff::Timestamp = a.parse().ok()?;
        let b: k8s_openapi::jiff::Timestamp = b.parse().ok()?;
        Some(b.as_second() - a.as_second())
    };
    age(old_at, measured_at).is_none_or(|secs| secs >= WRITE_REFRESH_SECS)
}

/// Tenants with their own storage series: the largest, the rest summed as `other`.
pub const TOP_TENANTS: usize = 20;
/// The label of the series summing every tenant outside the top ones.
pub const OTHER: &str = "other";

/// The per-tenant storage series to export: the [`TOP_TENANTS`] largest tenants by bytes
/// (ties by name), plus `other` with the sum of the rest (0 when there is none), so that the
/// series count stays at most `TOP_TENANTS + 1` whatever the fleet size.
pub fn top_with_other<'a>(usage: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<(String, u64)> {
    let mut all: Vec<(&str, u64)> = usage.into_iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let rest: u64 = all.iter().skip(TOP_TENANTS).map(|(_, b)| *b).sum();
    let mut out: Vec<(String, u64)> = all
        .iter()
        .take(TOP_TENANTS)
        .map(|(n, b)| (n.to_string(), *b))
        .collect();
    out.push((OTHER.to_string(), rest));
    out
}

/// The parsed limits of one Tenant (see `spec.limits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// `CONNECTION LIMIT` of each of the tenant's login roles, overriding the operator's
    /// `--tenant-connection-limit`.
    pub connections: Option<i32>,
    pub statement_timeout_ms: Option<u64>,
    pub storage_bytes: Option<u64>,
}

impl TenantLimits {
    /// Parses `spec.limits`; the error names the field.
    pub fn of(spec: &super::crd::LimitsSpec) -> Result<Self, String> {
        if let Some(c) = spec.connections {
            if !(0..=10_000).contains(&c) {
                return Err(format!("spec.limits.connections {c} is outside 0..10000"));
            }
        }
        Ok(Self {
            connections: spec.connections,
            statement_timeout_ms: spec
                .statement_timeout
                .as_deref()
                .map(parse_duration_ms)
                .transpose()
                .map_err(|e| format!("spec.limits.statementTimeout: {e}"))?,
            storage_bytes: spec
                .storage
                .as_deref()
                .map(parse_quantity_bytes)
                .transpose()
                .map_err(|e| format!("spec.limits.storage: {e}"))?,
        })
    }
}

/// Measured usage of every tenant schema, by schema name.
pub type Measurement = BTreeMap<String, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, ms) in [
            ("500ms", 500),
            ("2s", 2000),
            ("1m", 60_000),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
            ("24h", MAX_STATEMENT_TIMEOUT_MS),
        ] {
            assert_eq!(parse_duration_ms(s), Ok(ms), "{s}");
        }
        for s in [
            "", "2", "s", "2 s", "1.5s", "-1s", "0s", "0ms", "25h", "2S", "1d",
        ] {
            assert!(parse_duration_ms(s).is_err(), "{s}");
        }
    }

    #[test]
    fn quantities() {
        for (s, b) in [
            ("1", 1),
            ("1048576", 1 << 20),
            ("500Mi", 500 << 20),
            ("2Gi", 2 << 30),
            ("1.5Gi", 3 << 29),
            ("1k", 1000),
            ("1.5k", 1500),
            ("0.1", 1),
            ("2G", 2_000_000_000),
        ] {
            assert_eq!(parse_quantity_bytes(s), Ok(b), "{s}");
        }
        for s in [
            "", "0", "0Mi", "Mi", "1.Mi", ".5Mi", "1 Mi", "1mi", "-1", "1e3", "9Ei",
        ] {
            assert!(parse_quantity_bytes(s).is_err(), "{s}");
        }
    }

    #[test]
    fn bytes_read_well() {
        for (b, s) in [
            (0, "0"),
            (1023, "1023"),
            (1024, "1Ki"),
            (1536, "1.5Ki"),
            (98304, "96Ki"),
            (1_468_006, "1.4Mi"),
            (12 << 30, "12Gi"),
        ] {
            assert_eq!(format_bytes(b), s, "{b}");
        }
    }

    #[test]
    fn the_quota_has_hysteresis() {
        let q = Some(1000);
        assert!(
            !over_quota(false, Some(1000), q),
            "at the quota is within it"
        );
        assert!(over_quota(false, Some(1001), q));
        assert!(over_quota(true, Some(950), q), "stays over down to 90 %");
        assert!(over_quota(true, Some(900), q), "90 % is not below 90 %");
        assert!(!over_quota(true, Some(899), q));
        assert!(over_quota(true, None, q), "no measurement: as it was");
        assert!(!over_quota(false, None, q));
        assert!(!over_quota(true, Some(5000), None), "no quota: never over");
    }

    #[test]
    fn usage_is_written_when_it_says_something_new() {
        let t0 = "2026-01-01T00:00:00Z";
        let t1 = "2026-01-01T00:01:00Z";
        let late = "2026-01-01T06:00:00Z";
        assert!(usage_worth_writing(None, 0, t0, None));
        let shown = Some((1_000_000, t0));
        assert!(!usage_worth_writing(shown, 1_009_000, t1, None), "< 1 %");
        assert!(usage_worth_writing(shown, 1_010_000, t1, None), "1 %");
        assert!(usage_worth_writing(shown, 990_000, t1, None), "1 % down");
        assert!(usage_worth_writing(shown, 1_000_000, late, None), "refresh");
        // Tiny tenants: 1 % of 100 kB is under a page.
        let small = Some((100_000, t0));
        assert!(!usage_worth_writing(small, 108_000, t1, None));
        assert!(usage_worth_writing(small, 108_192, t1, None));
        // Crossing the quota or the resume threshold, however small the step.
        assert!(usage_worth_writing(small, 100_001, t1, Some(100_000)));
        assert!(usage_worth_writing(
            Some((90_001, t0)),
            90_000,
            t1,
            Some(100_000)
        ));
        assert!(!usage_worth_writing(
            Some((95_000, t0)),
            95_100,
            t1,
            Some(100_000)
        ));
    }

    #[test]
    fn metric_series_stay_bounded_with_a_thousand_tenants() {
        let names: Vec<String> = (0..1000).map(|i| format!("ns/t{i:04}")).collect();
        let usage = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u64));
        let series = top_with_other(usage);
        assert_eq!(series.len(), TOP_TENANTS + 1);
        assert_eq!(series[0], ("ns/t0999".to_string(), 999));
        assert_eq!(series[19].0, "ns/t0980");
        let rest: u64 = (0..980).sum();
        assert_eq!(series[20], (OTHER.to_string(), rest));
        // A small fleet: every tenant, and an `other` of 0.
        let series = top_with_other([("a/x", 5), ("a/y", 7)]);
        assert_eq!(
            series,
            [
                ("a/y".to_string(), 7),
                ("a/x".to_string(), 5),
                (OTHER.to_string(), 0)
            ]
        );
    }
}
