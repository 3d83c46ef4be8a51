//! The quantities people write in Ferry's configuration files and command lines, one parser per
//! concept:
//!
//! - durations ([`parse_duration`]): `"150ms"`, `"1.5s"`, `"250us"`, `"30m"`, `"1m 30s"`;
//! - bit rates ([`Bandwidth`], and [`parse_rate_limit`] where "no limit" is allowed): `"1gbit"`,
//!   `"800mbit"`, `"125mbps"` (`tc` units);
//! - byte sizes ([`ByteSize`]): `"256MiB"`, `"1.5GB"`, `"4096"`;
//! - loss probabilities ([`parse_loss`]): `"0.1%"`, `"0.001"`;
//! - outage windows ([`parse_outage`]): `"10s..15s"`.
//!
//! Every error says what was being parsed, the offending text and which forms are accepted, so a
//! config error that names the key (or a CLI error that names the flag) is enough to fix it.
//! [`Bandwidth`] and [`ByteSize`] deserialize from strings; [`duration_text`] is the serde adapter
//! for `Duration` fields.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};

/// A quantity that could not be parsed: the kind of quantity, the offending text and what was
/// expected. Displays as ``invalid KIND `TEXT`: REASON``.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} `{text}`: {reason}")]
pub struct ParseUnitError {
    kind: &'static str,
    text: String,
    reason: &'static str,
}

impl ParseUnitError {
    fn new(kind: &'static str, text: &str, reason: &'static str) -> Self {
        Self { kind, text: text.to_owned(), reason }
    }
}

/// Splits a leading unsigned decimal number off `text`: `"12.5ms"` → `(12.5, "ms")`. `None` when
/// `text` does not start with one.
fn split_number(text: &str) -> Option<(f64, &str)> {
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    if end == 0 {
        return None;
    }
    let value: f64 = text[..end].parse().ok()?;
    value.is_finite().then_some((value, &text[end..]))
}

// ---------------------------------------------------------------------------------------------
// Durations

const DURATION_FORMS: &str = "expected a number with a unit: ns, us, ms, s, m or min, h, d or w \
     (e.g. 150ms, 1.5s, 250us, 30m, or several: 1m 30s)";

/// Nanoseconds per unit of a duration. Units are case-sensitive, as humantime's (which the gateway
/// config and `ferry-host` used before): there `M` is a month, so accepting it as a minute would
/// silently change what `1M` means; upper-case units are refused instead.
fn duration_unit_ns(unit: &str) -> Option<f64> {
    Some(match unit {
        "ns" | "nsec" | "nanos" => 1.0,
        "us" | "µs" | "usec" => 1e3,
        "ms" | "msec" | "millis" => 1e6,
        "s" | "sec" | "secs" | "second" | "seconds" => 1e9,
        "m" | "min" | "mins" | "minute" | "minutes" => 60e9,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600e9,
        "d" | "day" | "days" => 86_400e9,
        "w" | "week" | "weeks" => 604_800e9,
        _ => return None,
    })
}

/// Parses a duration: one or more numbers, each with a unit (`150ms`, `1.5s`, `250us`, `100ns`,
/// `2min`, `30m`, `1h`, `1m 30s`). Numbers may have a fraction; units are ns, us (µs), ms, s,
/// m (min), h, d and w, in lower case (case-sensitive, as humantime's), with humantime's long
/// forms (`sec`, `minutes`, ...).
///
/// A bare `0` is accepted; any other number needs a unit.
pub fn parse_duration(text: &str) -> Result<Duration, ParseUnitError> {
    let err = |reason| ParseUnitError::new("duration", text, reason);
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(err(DURATION_FORMS));
    }
    if let Some((value, "")) = split_number(rest) {
        return if value == 0.0 { Ok(Duration::ZERO) } else { Err(err(DURATION_FORMS)) };
    }
    let mut total_ns = 0.0;
    while !rest.is_empty() {
        let (value, after) = split_number(rest).ok_or_else(|| err(DURATION_FORMS))?;
        let after = after.trim_start();
        let unit_end = after.find(|c: char| !c.is_alphabetic()).unwrap_or(after.len());
        let scale = duration_unit_ns(&after[..unit_end]).ok_or_else(|| err(DURATION_FORMS))?;
        total_ns += value * scale;
        rest = after[unit_end..].trim_start();
    }
    if total_ns > u64::MAX as f64 / 2.0 {
        return Err(err("too large"));
    }
    Ok(Duration::from_nanos(total_ns.round() as u64))
}

/// Serde adapter for `Duration` fields written as `"150ms"`: `#[serde(with = "duration_text")]`.
pub mod duration_text {
    use super::*;

    /// Deserializes a duration string (see [`parse_duration`]).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Bit rates

const BANDWIDTH_FORMS: &str = "expected bits per second as NUMBER[k|m|g|t]bit (e.g. 1gbit, \
     2.5gbit, 800mbit)";

/// Why a bandwidth refuses `bps` units: the gateway config took a bare `bps` as bits per second,
/// `tc` (and so the WAN emulator's CLI) takes `bps` as *bytes* per second. Rather than silently
/// mean 8x more or less than an operator meant, a bandwidth accepts bit units only.
const BANDWIDTH_NO_BPS: &str = "`bps` units are ambiguous here (tc reads them as bytes per \
     second): give bits per second as NUMBER[k|m|g|t]bit, e.g. 1gbit";

const RATE_LIMIT_FORMS: &str = "expected bits per second as NUMBER[k|m|g|t]bit (e.g. 1gbit, \
     200mbit, 500kbit), bytes per second tc-style as NUMBER[k|m|g]bps, or `unlimited`/0";

/// Smallest rate accepted, bits per second.
const MIN_BITS_PER_SECOND: f64 = 1e3;
/// Largest rate accepted, bits per second.
const MAX_BITS_PER_SECOND: f64 = 1e15;

/// A bit rate, 1 kbit/s to 1000 tbit/s. Parses from `tc` units: `bit`, `kbit`, `mbit`, `gbit`,
/// `tbit` are bits per second (powers of 1000); `bps`, `kbps`, `mbps`, `gbps` are **bytes** per
/// second; units are case-insensitive. E.g. `"1gbit"`, `"2.5gbit"`, `"800mbit"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bandwidth {
    bits_per_second: u64,
}

impl Bandwidth {
    /// A rate of `bits_per_second`.
    pub const fn from_bits_per_second(bits_per_second: u64) -> Self {
        Self { bits_per_second }
    }

    /// The rate in bits per second.
    pub const fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }

    /// The rate in bytes per second.
    pub const fn bytes_per_second(self) -> u64 {
        self.bits_per_second / 8
    }

    /// Bytes in flight on a path of this rate and round-trip time (the bandwidth-delay product).
    pub fn bdp_bytes(self, rtt: Duration) -> u64 {
        (self.bytes_per_second() as f64 * rtt.as_secs_f64()).ceil() as u64
    }
}

/// Parses a rate in `tc` units into bits per second; 0 stays 0 (a bare `0` needs no unit).
fn parse_bits_per_second(text: &str, kind: &'static str, forms: &'static str) -> Result<f64, ParseUnitError> {
    let err = |reason| ParseUnitError::new(kind, text, reason);
    let (value, unit) = split_number(text.trim()).ok_or_else(|| err(forms))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" if value == 0.0 => 0.0,
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "tbit" => 1e12,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => return Err(err(forms)),
    };
    let bits = value * scale;
    if bits > MAX_BITS_PER_SECOND {
        return Err(err("too large (max 1000tbit)"));
    }
    if bits > 0.0 && bits < MIN_BITS_PER_SECOND {
        return Err(err("too small (min 1kbit)"));
    }
    Ok(bits)
}

impl FromStr for Bandwidth {
    type Err = ParseUnitError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().to_ascii_lowercase().ends_with("bps") {
            return Err(ParseUnitError::new("bandwidth", text, BANDWIDTH_NO_BPS));
        }
        let bits = parse_bits_per_second(text, "bandwidth", BANDWIDTH_FORMS)?;
        if bits == 0.0 {
            return Err(ParseUnitError::new("bandwidth", text, "must be greater than zero"));
        }
        Ok(Self::from_bits_per_second(bits.round() as u64))
    }
}

/// Parses a rate limit: a [`Bandwidth`], or `unlimited` / `0` for none (`None`).
pub fn parse_rate_limit(text: &str) -> Result<Option<Bandwidth>, ParseUnitError> {
    if text.trim().eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let bits = parse_bits_per_second(text, "rate", RATE_LIMIT_FORMS)?;
    Ok((bits > 0.0).then(|| Bandwidth::from_bits_per_second(bits.round() as u64)))
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits_per_second as f64;
        if bits >= 1e9 {
            write!(f, "{}gbit", bits / 1e9)
        } else if bits >= 1e6 {
            write!(f, "{}mbit", bits / 1e6)
        } else {
            write!(f, "{}bit", self.bits_per_second)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte sizes

const SIZE_FORMS: &str =
    "expected a number of bytes, optionally followed by B, KiB, MiB, GiB, TiB, kB, MB, GB or TB, e.g. \"256MiB\"";

/// A number of bytes. Accepts a plain number of bytes or binary (`KiB`, `MiB`, `GiB`, `TiB`) and
/// decimal (`kB`, `MB`, `GB`, `TB`) units, e.g. `"256MiB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ParseUnitError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseUnitError::new("size", text, SIZE_FORMS);
        let (value, unit) = split_number(text.trim()).ok_or_else(err)?;
        let scale: f64 = match unit.trim() {
            "" | "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            "kB" | "KB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            _ => return Err(err()),
        };
        let bytes = value * scale;
        if bytes > u64::MAX as f64 {
            return Err(err());
        }
        Ok(Self(bytes as u64))
    }
}

// ---------------------------------------------------------------------------------------------
// Loss and outages

/// Parses a loss probability: `0.1%` means 0.001; a bare number is a fraction (`0.001`).
pub fn parse_loss(text: &str) -> Result<f64, ParseUnitError> {
    let trimmed = text.trim();
    let (number, scale) = match trimmed.strip_suffix('%') {
        Some(t) => (t.trim(), 0.01),
        None => (trimmed, 1.0),
    };
    let value: f64 = number.parse().map_err(|_| {
        ParseUnitError::new("loss", text, "expected a percentage like 0.1% or a fraction like 0.001")
    })?;
    let p = value * scale;
    if !(0.0..=1.0).contains(&p) || !p.is_finite() {
        return Err(ParseUnitError::new("loss", text, "must be between 0% and 100%"));
    }
    Ok(p)
}

/// Parses an outage window `START..END` (two durations, see [`parse_duration`]), e.g.
/// `10s..15s`. END must be after START.
pub fn parse_outage(text: &str) -> Result<(Duration, Duration), ParseUnitError> {
    let (a, b) =
        text.split_once("..").ok_or_else(|| ParseUnitError::new("outage", text, "expected START..END, e.g. 10s..15s"))?;
    let start = parse_duration(a)?;
    let end = parse_duration(b)?;
    if end <= start {
        return Err(ParseUnitError::new("outage", text, "END must be after START"));
    }
    Ok((start, end))
}

// ---------------------------------------------------------------------------------------------
// Serde

/// Serde adapter: deserializes any `FromStr` quantity from a string.
fn deserialize_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(de::Error::custom)
}

impl<'de> Deserialize<'de> for Bandwidth {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_from_str(deserializer)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_from_str(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_forms() {
        assert_eq!("1gbit".parse::<Bandwidth>().unwrap().bits_per_second(), 1_000_000_000);
        assert_eq!("2.5gbit".parse::<Bandwidth>().unwrap().bits_per_second(), 2_500_000_000);
        assert_eq!("800mbit".parse::<Bandwidth>().unwrap().bits_per_second(), 800_000_000);
        assert_eq!("1GBIT".parse::<Bandwidth>().unwrap().bytes_per_second(), 125_000_000);
        for bad in ["", "gbit", "1gb", "-1gbit", "1 furlong", "0bit"] {
            let err = bad.parse::<Bandwidth>().unwrap_err().to_string();
            assert!(err.contains("invalid bandwidth"), "{bad}: {err}");
        }
        // tc's bytes-per-second units would mean 8x what a bare `bps` used to mean here.
        for bad in ["1000000000bps", "125mbps", "1GBPS"] {
            let err = bad.parse::<Bandwidth>().unwrap_err().to_string();
            assert!(err.contains("ambiguous"), "{bad}: {err}");
        }
    }

    #[test]
    fn bdp() {
        let bw: Bandwidth = "1gbit".parse().unwrap();
        assert_eq!(bw.bdp_bytes(Duration::from_millis(150)), 18_750_000);
    }

    #[test]
    fn sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap().0, 256 << 20);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("1.5GB".parse::<ByteSize>().unwrap().0, 1_500_000_000);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("150ms").unwrap(), Duration::from_millis(150));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("1.5s").ok(), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 250us ").ok(), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("2min").ok(), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0").ok(), Some(Duration::ZERO));
        for bad in ["", "ms", "10", "10 parsecs", "-5ms", "1e3ms", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        let msg = parse_duration("10").map(|_| ()).unwrap_err().to_string();
        assert!(msg.contains("unit"), "{msg}");
        let msg = parse_duration("150 furlongs").unwrap_err().to_string();
        assert!(msg.contains("invalid duration"), "{msg}");
    }

    /// The forms the host-plugin's CLI defaults and humantime users write.
    #[test]
    fn durations_humantime_style() {
        assert_eq!(parse_duration("500ms").ok(), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30m").ok(), Some(Duration::from_secs(30 * 60)));
        assert_eq!(parse_duration("1h").ok(), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m 30s").ok(), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s").ok(), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2 seconds").ok(), Some(Duration::from_secs(2)));
        // Case-sensitive like humantime: `1M` was a month there, it must not become a minute.
        assert!(parse_duration("1M").is_err());
        assert!(parse_duration("1MS").is_err());
        assert!(parse_duration("1m 30").is_err());
        assert!(parse_duration("1m,30s").is_err());
    }

    /// Bits per second of a rate limit, 0 for none.
    fn limit_bits(text: &str) -> Option<u64> {
        parse_rate_limit(text).ok().map(|r| r.map_or(0, Bandwidth::bits_per_second))
    }

    #[test]
    fn rates() {
        assert_eq!(limit_bits("1gbit"), Some(1_000_000_000));
        assert_eq!(limit_bits("200Mbit"), Some(200_000_000));
        assert_eq!(limit_bits("1.5kbit"), Some(1_500));
        assert_eq!(limit_bits("125mbps"), Some(1_000_000_000));
        assert_eq!(limit_bits("unlimited"), Some(0));
        assert_eq!(limit_bits("0"), Some(0));
        for bad in ["1g", "fast", "10", "5bit", "mbit"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!("unlimited".parse::<Bandwidth>().is_err(), "a bandwidth is never unlimited");
    }

    #[test]
    fn losses() {
        assert_eq!(parse_loss("0.1%").ok(), Some(0.001));
        assert_eq!(parse_loss("1 %").ok(), Some(0.01));
        assert_eq!(parse_loss("0.02").ok(), Some(0.02));
        for bad in ["101%", "-1%", "x%", "2"] {
            assert!(parse_loss(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn outages() {
        assert_eq!(parse_outage("10s..15s").ok(), Some((Duration::from_secs(10), Duration::from_secs(15))));
        assert!(parse_outage("15s..10s").is_err());
        assert!(parse_outage("10s-15s").is_err());
    }

    #[test]
    fn deserializes_from_strings() {
        let bw: Bandwidth = serde_json::from_str(r#""1gbit""#).unwrap();
        assert_eq!(bw.bits_per_second(), 1_000_000_000);
        let err = serde_json::from_str::<ByteSize>(r#""12 parsecs""#).unwrap_err().to_string();
        assert!(err.contains("invalid size"), "{err}");
    }
}
