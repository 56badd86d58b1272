//! Gateway API durations (GEP-2257): `^([0-9]{1,5}(h|m|s|ms)){1,4}$`.
//!
//! Contract: [`GwDuration`] parses exactly that grammar (so `1h30m`, `500ms`,
//! `0s`) and serializes back in a canonical form. Non-goals: Go's fractional
//! or `us`/`ns` units, which the Gateway API forbids.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written in Gateway API format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GwDuration(pub Duration);

impl GwDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Parses `1h30m`, `250ms`, `0s`... per GEP-2257.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid duration {s:?}: expected 1 to 4 groups of 1-5 digits followed by h, m, s or ms \
                 (e.g. \"10s\", \"1m30s\", \"500ms\")"
            )
        };
        if s.starts_with('-') {
            return Err(format!(
                "invalid duration {s:?}: durations cannot be negative (e.g. \"10s\", \"500ms\")"
            ));
        }
        let b = s.as_bytes();
        let mut i = 0;
        let mut groups = 0;
        let mut total_ms: u64 = 0;
        while i < b.len() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let digits = i - start;
            if digits == 0 || digits > 5 {
                return Err(bad());
            }
            // At most 5 digits: always fits in u64.
            let n: u64 = s[start..i].parse().map_err(|_| bad())?;
            let unit_ms = if s[i..].starts_with("ms") {
                i += 2;
                1
            } else if s[i..].starts_with('h') {
                i += 1;
                3_600_000
            } else if s[i..].starts_with('m') {
                i += 1;
                60_000
            } else if s[i..].starts_with('s') {
                i += 1;
                1_000
            } else {
                return Err(bad());
            };
            total_ms += n * unit_ms;
            groups += 1;
            if groups > 4 {
                return Err(bad());
            }
        }
        if groups == 0 {
            return Err(bad());
        }
        Ok(GwDuration(Duration::from_millis(total_ms)))
    }
}

impl fmt::Display for GwDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let h = ms / 3_600_000;
        ms %= 3_600_000;
        let m = ms / 60_000;
        ms %= 60_000;
        let s = ms / 1000;
        ms %= 1000;
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        if ms > 0 {
            write!(f, "{ms}ms")?;
        }
        Ok(())
    }
}

impl Serialize for GwDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GwDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GwDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_gateway_durations() {
        let ms = |s: &str| GwDuration::parse(s).unwrap().0.as_millis();
        assert_eq!(ms("10s"), 10_000);
        assert_eq!(ms("1h30m"), 5_400_000);
        assert_eq!(ms("500ms"), 500);
        assert_eq!(ms("1m1s1ms"), 61_001);
        assert_eq!(ms("0s"), 0);
        assert_eq!(ms("99999h"), 99_999 * 3_600_000);
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "100000s",
            "1s1s1s1s1s",
            "1d",
            "-1s",
            " 1s",
            "1us",
        ] {
            assert!(GwDuration::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn displays_canonically() {
        for (i, o) in [
            ("90s", "1m30s"),
            ("0ms", "0s"),
            ("1500ms", "1s500ms"),
            ("2h", "2h"),
        ] {
            assert_eq!(GwDuration::parse(i).unwrap().to_string(), o);
        }
    }
}
