//! Parsing and formatting of the human units used by the CLI and `tc`:
//! durations (`150ms`), bit rates (`1gbit`), loss percentages (`0.1%`) and
//! outage windows (`10s..15s`).

use std::time::Duration;

use crate::error::{Error, Result};

fn parse_err(what: &'static str, input: &str, reason: impl Into<String>) -> Error {
    Error::Parse {
        what,
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Splits `"12.5ms"` into (`12.5`, `"ms"`), trimming whitespace; the unit is lower-cased.
fn split_number(input: &str) -> Option<(f64, String)> {
    let s = input.trim();
    let end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    if num.is_empty() {
        return None;
    }
    let value: f64 = num.parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    Some((value, unit.trim().to_ascii_lowercase()))
}

const DURATION_FORMS: &str =
    "expected a number with a unit: ns, us, ms, s or min (e.g. 150ms, 1.5s, 250us)";

/// Parses a duration such as `150ms`, `1.5s`, `250us`, `100ns` or `2min`.
///
/// A bare `0` is accepted; any other number needs a unit.
pub fn parse_duration(input: &str) -> Result<Duration> {
    let (value, unit) =
        split_number(input).ok_or_else(|| parse_err("duration", input, DURATION_FORMS))?;
    let scale_ns = match unit.as_str() {
        "" if value == 0.0 => 0.0,
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" | "sec" => 1e9,
        "m" | "min" => 60e9,
        _ => return Err(parse_err("duration", input, DURATION_FORMS)),
    };
    let ns = value * scale_ns;
    if ns > u64::MAX as f64 / 2.0 {
        return Err(parse_err("duration", input, "too large"));
    }
    Ok(Duration::from_nanos(ns.round() as u64))
}

const RATE_FORMS: &str =
    "expected bits per second as NUMBER[k|m|g|t]bit (e.g. 1gbit, 200mbit, 500kbit), \
     bytes per second tc-style as NUMBER[k|m|g]bps, or `unlimited`/0";

/// Parses a bit rate into bits per second; `0` and `unlimited` mean no rate limit (0).
///
/// Units follow `tc`: `bit`, `kbit`, `mbit`, `gbit`, `tbit` are bits per second
/// (powers of 1000); `bps`, `kbps`, `mbps`, `gbps` are **bytes** per second.
pub fn parse_rate(input: &str) -> Result<u64> {
    if input.trim().eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let (value, unit) = split_number(input).ok_or_else(|| parse_err("rate", input, RATE_FORMS))?;
    let scale = match unit.as_str() {
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
        _ => return Err(parse_err("rate", input, RATE_FORMS)),
    };
    let bits = value * scale;
    if bits > 1e15 {
        return Err(parse_err("rate", input, "too large (max 1000tbit)"));
    }
    if bits > 0.0 && bits < 1000.0 {
        return Err(parse_err("rate", input, "too small (min 1kbit)"));
    }
    Ok(bits.round() as u64)
}

/// Parses a loss probability: `0.1%` means 0.001; a bare number is a fraction (`0.001`).
pub fn parse_loss(input: &str) -> Result<f64> {
    let s = input.trim();
    let (text, scale) = match s.strip_suffix('%') {
        Some(t) => (t.trim(), 0.01),
        None => (s, 1.0),
    };
    let value: f64 = text.parse().map_err(|_| {
        parse_err(
            "loss",
            input,
            "expected a percentage like 0.1% or a fraction like 0.001",
        )
    })?;
    let p = value * scale;
    if !(0.0..=1.0).contains(&p) || !p.is_finite() {
        return Err(parse_err("loss", input, "must be between 0% and 100%"));
    }
    Ok(p)
}

/// Parses an outage window `START..END` (both durations after the WAN comes up),
/// e.g. `10s..15s`. END must be after START.
pub fn parse_outage(input: &str) -> Result<(Duration, Duration)> {
    let (a, b) = input
        .split_once("..")
        .ok_or_else(|| parse_err("outage", input, "expected START..END, e.g. 10s..15s"))?;
    let start = parse_duration(a)?;
    let end = parse_duration(b)?;
    if end <= start {
        return Err(parse_err("outage", input, "END must be after START"));
    }
    Ok((start, end))
}

/// Formats a duration for `tc` in microseconds (`75000us`), which every `tc` accepts.
pub fn tc_time(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

/// Formats a rate for `tc` as bits per second (`1000000000bit`).
pub fn tc_rate(bits_per_sec: u64) -> String {
    format!("{bits_per_sec}bit")
}

/// Formats a rate for humans (`1 Gbit/s`, `200 Mbit/s`, `unlimited`).
pub fn human_rate(bits_per_sec: u64) -> String {
    let b = bits_per_sec as f64;
    match bits_per_sec {
        0 => "unlimited".to_string(),
        x if x >= 1_000_000_000 => format!("{} Gbit/s", trim_float(b / 1e9)),
        x if x >= 1_000_000 => format!("{} Mbit/s", trim_float(b / 1e6)),
        x if x >= 1_000 => format!("{} kbit/s", trim_float(b / 1e3)),
        _ => format!("{bits_per_sec} bit/s"),
    }
}

fn trim_float(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("150ms").ok(),
            Some(Duration::from_millis(150))
        );
        assert_eq!(
            parse_duration("1.5s").ok(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_duration(" 250us ").ok(),
            Some(Duration::from_micros(250))
        );
        assert_eq!(parse_duration("2min").ok(), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0").ok(), Some(Duration::ZERO));
        for bad in ["", "ms", "10", "10 parsecs", "-5ms", "1e3ms", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        let msg = parse_duration("10").map(|_| ()).unwrap_err().to_string();
        assert!(msg.contains("unit"), "{msg}");
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1gbit").ok(), Some(1_000_000_000));
        assert_eq!(parse_rate("200Mbit").ok(), Some(200_000_000));
        assert_eq!(parse_rate("1.5kbit").ok(), Some(1_500));
        assert_eq!(parse_rate("125mbps").ok(), Some(1_000_000_000));
        assert_eq!(parse_rate("unlimited").ok(), Some(0));
        assert_eq!(parse_rate("0").ok(), Some(0));
        for bad in ["1g", "fast", "10", "5bit", "mbit"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} should be rejected");
        }
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
        assert_eq!(
            parse_outage("10s..15s").ok(),
            Some((Duration::from_secs(10), Duration::from_secs(15)))
        );
        assert!(parse_outage("15s..10s").is_err());
        assert!(parse_outage("10s-15s").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(tc_time(Duration::from_millis(75)), "75000us");
        assert_eq!(tc_rate(200_000_000), "200000000bit");
        assert_eq!(human_rate(1_000_000_000), "1 Gbit/s");
        assert_eq!(human_rate(200_000_000), "200 Mbit/s");
        assert_eq!(human_rate(1_500_000), "1.5 Mbit/s");
        assert_eq!(human_rate(0), "unlimited");
    }
}
