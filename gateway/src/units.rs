//! Human-friendly quantities used in the configuration: link bandwidth (`"1gbit"`), byte sizes
//! (`"256MiB"`) and durations (`"150ms"`).
//!
//! Each type deserializes from a string, and its error message says what forms are accepted so
//! that a config error pointing at the key is enough to fix it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};

/// A parse failure of a quantity: the offending text and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind} `{text}`: {hint}")]
pub struct ParseQuantityError {
    kind: &'static str,
    text: String,
    hint: &'static str,
}

/// Splits `"1.5gbit"` into `(1.5, "gbit")`.
fn split_number(text: &str) -> Option<(f64, &str)> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let value: f64 = text[..end].parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Some((value, text[end..].trim()))
}

/// A link rate in bits per second. Accepts `bit`, `kbit`, `mbit`, `gbit`, `tbit` (decimal
/// prefixes, as `tc` uses them), e.g. `"1gbit"`, `"2.5gbit"`, `"800mbit"`.
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

impl FromStr for Bandwidth {
    type Err = ParseQuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseQuantityError {
            kind: "bandwidth",
            text: text.to_owned(),
            hint: "expected a positive number followed by bit, kbit, mbit, gbit or tbit, e.g. \"1gbit\"",
        };
        let (value, unit) = split_number(text).ok_or_else(err)?;
        let scale = match unit.to_ascii_lowercase().as_str() {
            "bit" | "bps" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "tbit" => 1e12,
            _ => return Err(err()),
        };
        let bits = value * scale;
        if bits < 1.0 || bits > u64::MAX as f64 {
            return Err(err());
        }
        Ok(Self::from_bits_per_second(bits as u64))
    }
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

/// A number of bytes. Accepts a plain number of bytes or binary (`KiB`, `MiB`, `GiB`, `TiB`) and
/// decimal (`kB`, `MB`, `GB`, `TB`) units, e.g. `"256MiB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ParseQuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseQuantityError {
            kind: "size",
            text: text.to_owned(),
            hint: "expected a number of bytes, optionally followed by B, KiB, MiB, GiB, TiB, kB, MB, GB or TB, e.g. \"256MiB\"",
        };
        let (value, unit) = split_number(text).ok_or_else(err)?;
        let scale: f64 = match unit {
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

/// Parses a duration such as `"150ms"`, `"2s"` or `"1m 30s"`.
pub fn parse_duration(text: &str) -> Result<Duration, ParseQuantityError> {
    humantime::parse_duration(text.trim()).map_err(|_| ParseQuantityError {
        kind: "duration",
        text: text.to_owned(),
        hint: "expected a number with a unit such as ms, s or m, e.g. \"150ms\"",
    })
}

/// Serde adapter: deserializes any `FromStr` quantity from a TOML string.
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

/// Serde adapter for `Duration` fields written as `"150ms"`.
pub mod duration_text {
    use super::*;

    /// Deserializes a duration string (see [`parse_duration`]).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(de::Error::custom)
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
    }
}
