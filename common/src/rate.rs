//! Rates on the wire, as operators write them: `1gbit`, `200mbit`, `500kbit`, or bits per
//! second.

use std::str::FromStr;

/// A rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

/// A rate that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not a number with a known unit.
    #[error("bad rate {0:?}: say e.g. 1gbit, 200mbit, 500kbit or bits per second")]
    Unreadable(String),
    /// Zero or negative.
    #[error("rate {0:?} must be positive")]
    NotPositive(String),
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let l = s.trim().to_ascii_lowercase();
        let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)]
            .iter()
            .find_map(|(unit, mult)| l.strip_suffix(unit).map(|n| (n, *mult)))
            .unwrap_or((l.as_str(), 1.0));
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| RateError::Unreadable(s.to_string()))?;
        if v.is_nan() || v <= 0.0 {
            return Err(RateError::NotPositive(s.to_string()));
        }
        Ok(Rate((v * mult) as u64))
    }
}

impl std::fmt::Display for Rate {
    /// The largest unit the rate is a whole number of: `1gbit`, `200mbit`, `1500kbit`, `9600`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        match [
            (1_000_000_000, "gbit"),
            (1_000_000, "mbit"),
            (1_000, "kbit"),
        ]
        .iter()
        .find(|(m, _)| n >= *m && n.is_multiple_of(*m))
        {
            Some((m, unit)) => write!(f, "{}{unit}", n / m),
            None => write!(f, "{n}"),
        }
    }
}

impl Rate {
    /// Bytes per second (at least 1).
    pub fn bytes_per_sec(self) -> u64 {
        (self.0 / 8).max(1)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!("1gbit".parse::<Rate>().unwrap(), Rate(1_000_000_000));
        assert_eq!("2.5mbit".parse::<Rate>().unwrap(), Rate(2_500_000));
        assert_eq!(" 200 Mbit ".parse::<Rate>().unwrap(), Rate(200_000_000));
        assert_eq!("9600".parse::<Rate>().unwrap(), Rate(9600));
        assert_eq!(Rate(200_000_000).to_string(), "200mbit");
        assert_eq!(Rate(2_500_000).to_string(), "2500kbit");
        assert_eq!(Rate(9600).to_string(), "9600");
        assert!(matches!(
            "fast".parse::<Rate>(),
            Err(RateError::Unreadable(_))
        ));
        assert!(matches!(
            "0mbit".parse::<Rate>(),
            Err(RateError::NotPositive(_))
        ));
    }
}
