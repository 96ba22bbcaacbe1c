//! Throttles as operators write them: a constant limit (`200mbit`), none (`off`), or a
//! time-of-day schedule (`09:00-18:00 100mbit, else off`).
//!
//! Times are UTC, minutes of the day; a window may cross midnight (`22:00-06:00 1gbit`).
//! Windows may not overlap, and a time no window covers gets the `else` rate (no limit when
//! there is no `else`). The coordinator keeps a throttle as its canonical text ([`Throttle`]'s
//! `Display`); agents parse it and evaluate it against their own clock ([`Throttle::rate_at`]).

use std::fmt;
use std::str::FromStr;

use crate::rate::{Rate, RateError};

const DAY_MINUTES: u32 = 24 * 60;
/// The longest throttle text accepted: every coordinator parses it when it applies the entry,
/// so its cost is bounded here, not by each caller.
pub const MAX_TEXT: usize = 1024;

/// A limit on bits per second, constant or by time of day (UTC). `Default` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Throttle {
    windows: Vec<Window>,
    otherwise: Option<Rate>,
}

/// One time-of-day window and its limit (`None`: no limit within it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    /// First minute of the day in the window.
    start: u32,
    /// First minute after it, at most 1440 (may be before `start`: the window crosses
    /// midnight).
    end: u32,
    rate: Option<Rate>,
}

impl Window {
    fn contains(&self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// A throttle that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThrottleError {
    /// A rate in it is not a rate.
    #[error(transparent)]
    Rate(#[from] RateError),
    /// A part is neither `RATE`, `off`, `HH:MM-HH:MM RATE|off` nor `else RATE|off`.
    #[error(
        "bad throttle part {0:?}: say RATE or off (e.g. 200mbit), or a schedule like \
         \"09:00-18:00 100mbit, else off\" (times UTC)"
    )]
    Unreadable(String),
    /// A time that is not `HH:MM` of a day.
    #[error("bad time {0:?}: say HH:MM, 00:00 to 24:00 (UTC)")]
    Time(String),
    /// A window that starts when it ends.
    #[error("window {0:?} is empty: its start and end are the same time")]
    Empty(String),
    /// Two windows covering the same minute.
    #[error("windows {0:?} and {1:?} overlap: each time of day may have one limit")]
    Overlap(String, String),
    /// Longer than [`MAX_TEXT`].
    #[error("a throttle is at most {MAX_TEXT} characters")]
    TooLong,
    /// `else` given twice, or a lone rate beside windows.
    #[error("{0:?}: a schedule has at most one \"else RATE\" (a lone rate stands alone)")]
    Otherwise(String),
}

fn limit(s: &str) -> Result<Option<Rate>, ThrottleError> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        Ok(Some(s.parse()?))
    }
}

fn minute(s: &str) -> Result<u32, ThrottleError> {
    let bad = || ThrottleError::Time(s.to_string());
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl FromStr for Throttle {
    type Err = ThrottleError;

    /// Reads a throttle; empty text is no throttle, like `off`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_TEXT {
            return Err(ThrottleError::TooLong);
        }
        if s.trim().is_empty() {
            return Ok(Throttle::default());
        }
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() == 1 && !parts[0].contains('-') && !starts_with_else(parts[0]) {
            return Ok(Throttle {
                windows: Vec::new(),
                otherwise: limit(parts[0])?,
            });
        }
        let mut t = Throttle::default();
        let mut seen_else = false;
        // Which window (by its text) covers each minute of the day.
        let mut owner: Vec<Option<&str>> = vec![None; DAY_MINUTES as usize];
        for p in parts {
            if let Some(rest) = strip_else(p) {
                if seen_else {
                    return Err(ThrottleError::Otherwise(s.to_string()));
                }
                seen_else = true;
                t.otherwise = limit(rest)?;
                continue;
            }
            let (span, rate) = p
                .split_once(char::is_whitespace)
                .ok_or_else(|| ThrottleError::Unreadable(p.to_string()))?;
            let (a, b) = span
                .split_once('-')
                .ok_or_else(|| ThrottleError::Unreadable(p.to_string()))?;
            let w = Window {
                start: minute(a)? % DAY_MINUTES,
                end: minute(b)?,
                rate: limit(rate)?,
            };
            if w.start == w.end {
                return Err(ThrottleError::Empty(p.to_string()));
            }
            for m in (0..DAY_MINUTES).filter(|&m| w.contains(m)) {
                if let Some(other) = owner[m as usize].replace(p) {
                    return Err(ThrottleError::Overlap(other.to_string(), p.to_string()));
                }
            }
            t.windows.push(w);
        }
        t.windows.sort_by_key(|w| w.start);
        Ok(t)
    }
}

fn strip_else(p: &str) -> Option<&str> {
    let rest = p.strip_prefix("else").or_else(|| p.strip_prefix("ELSE"))?;
    rest.starts_with(char::is_whitespace).then_some(rest)
}

fn starts_with_else(p: &str) -> bool {
    strip_else(p).is_some()
}

impl Throttle {
    /// How the coordinator keeps it: the canonical text, empty for no throttle.
    pub fn stored(&self) -> String {
        if self.is_off() {
            String::new()
        } else {
            self.to_string()
        }
    }

    /// No limit at any time.
    pub fn is_off(&self) -> bool {
        self.otherwise.is_none() && self.windows.iter().all(|w| w.rate.is_none())
    }

    /// The limit at `secs` seconds after midnight UTC (`None`: no limit).
    pub fn rate_at(&self, secs: u64) -> Option<Rate> {
        let minute = ((secs / 60) % u64::from(DAY_MINUTES)) as u32;
        self.windows
            .iter()
            .find(|w| w.contains(minute))
            .map_or(self.otherwise, |w| w.rate)
    }

    /// The limit now, by this machine's clock.
    pub fn rate_now(&self) -> Option<Rate> {
        self.rate_at(secs_of_day_utc(std::time::SystemTime::now()))
    }
}

/// Seconds since midnight UTC at `t` (0 for a clock before 1970).
pub fn secs_of_day_utc(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() % 86_400)
}

fn fmt_limit(f: &mut fmt::Formatter<'_>, r: Option<Rate>) -> fmt::Result {
    match r {
        Some(r) => write!(f, "{r}"),
        None => f.write_str("off"),
    }
}

impl fmt::Display for Throttle {
    /// The canonical text: `off`, `200mbit`, or `09:00-18:00 100mbit, else off`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.windows.is_empty() {
            return fmt_limit(f, self.otherwise);
        }
        for w in &self.windows {
            write!(
                f,
                "{:02}:{:02}-{:02}:{:02} ",
                w.start / 60,
                w.start % 60,
                w.end / 60,
                w.end % 60
            )?;
            fmt_limit(f, w.rate)?;
            f.write_str(", ")?;
        }
        f.write_str("else ")?;
        fmt_limit(f, self.otherwise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Throttle {
        s.parse().unwrap()
    }

    #[test]
    fn constant_limits_and_off() {
        assert_eq!(t("200mbit").rate_at(0), Some(Rate(200_000_000)));
        assert_eq!(t("200mbit").to_string(), "200mbit");
        assert!(t("off").is_off());
        assert_eq!(t("OFF").rate_at(12_345), None);
        assert_eq!(Throttle::default().to_string(), "off");
        assert_eq!(t(" "), Throttle::default());
        assert_eq!(
            (t("off").stored(), t("5mbit").stored()),
            (String::new(), "5mbit".into())
        );
    }

    #[test]
    fn schedules_apply_by_minute_of_the_day_utc() {
        let s = t("09:00-18:00 100mbit, else off");
        assert_eq!(s.rate_at(9 * 3600 - 1), None);
        assert_eq!(s.rate_at(9 * 3600), Some(Rate(100_000_000)));
        assert_eq!(s.rate_at(18 * 3600 - 1), Some(Rate(100_000_000)));
        assert_eq!(s.rate_at(18 * 3600), None);
        assert_eq!(s.rate_at(86_400 + 10 * 3600), Some(Rate(100_000_000)));
        assert!(!s.is_off());
        assert_eq!(s.to_string(), "09:00-18:00 100mbit, else off");
        assert_eq!(t(&s.to_string()), s);

        let night = t("22:00-06:00 1gbit, 06:00-22:00 50mbit");
        assert_eq!(night.rate_at(23 * 3600), Some(Rate(1_000_000_000)));
        assert_eq!(night.rate_at(3600), Some(Rate(1_000_000_000)));
        assert_eq!(night.rate_at(12 * 3600), Some(Rate(50_000_000)));
        assert_eq!(
            night.to_string(),
            "06:00-22:00 50mbit, 22:00-06:00 1gbit, else off"
        );
        assert_eq!(
            t("00:00-24:00 10mbit").rate_at(86_399),
            Some(Rate(10_000_000))
        );
        assert_eq!(t("else 5mbit, 01:00-02:00 off").rate_at(90 * 60), None);
        assert!(t("01:00-02:00 off, else off").is_off());
    }

    #[test]
    fn bad_throttles_say_what_is_wrong() {
        assert!(matches!(
            "09:00-18:00 100mbit, 17:00-19:00 1gbit".parse::<Throttle>(),
            Err(ThrottleError::Overlap(..))
        ));
        assert!(matches!(
            "23:00-01:00 1mbit, 00:30-02:00 1mbit".parse::<Throttle>(),
            Err(ThrottleError::Overlap(..))
        ));
        assert!(matches!(
            "09:00-09:00 1mbit".parse::<Throttle>(),
            Err(ThrottleError::Empty(_))
        ));
        assert!(matches!(
            "25:00-26:00 1mbit".parse::<Throttle>(),
            Err(ThrottleError::Time(_))
        ));
        assert!(matches!(
            "09:00-18:00".parse::<Throttle>(),
            Err(ThrottleError::Unreadable(_))
        ));
        assert!(matches!(
            "fast".parse::<Throttle>(),
            Err(ThrottleError::Rate(_))
        ));
        let long = vec!["01:00-02:00 1mbit"; 100].join(", ");
        assert!(matches!(
            long.parse::<Throttle>(),
            Err(ThrottleError::TooLong)
        ));
        assert!(matches!(
            "else off, else 1mbit".parse::<Throttle>(),
            Err(ThrottleError::Otherwise(_))
        ));
        assert!(matches!(
            "09:00-18:00 0mbit".parse::<Throttle>(),
            Err(ThrottleError::Rate(RateError::NotPositive(_)))
        ));
    }
}
