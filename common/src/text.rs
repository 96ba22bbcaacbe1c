//! Bounded text: what ferry keeps of a command's output or an agent's message.

/// The last `max` bytes of `s`, starting on a character boundary (the tail of an output is
/// where a failing command says why).
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The first `max` bytes of `s`, ending on a character boundary.
pub fn head(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `n` bytes in decimal units with at most two decimals, as people read sizes and rates:
/// `512 B`, `1.2 GB`, `40 MB`, `1.25 TB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let (mut v, mut u) = (n, 0);
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        return format!("{v:.0} B");
    }
    let digits = format!("{v:.2}");
    let digits = digits.trim_end_matches('0').trim_end_matches('.');
    format!("{digits} {}", UNITS[u])
}

/// `ms` (unix) as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1.2e9), "1.2 GB");
        assert_eq!(bytes(4e7), "40 MB");
        assert_eq!(bytes(1.25e12), "1.25 TB");
        assert_eq!(bytes(1.005e15), "1 PB");
    }

    use super::*;

    #[test]
    fn cuts_on_character_boundaries() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        // "é" is 2 bytes and "€" 3: the last 4 bytes start inside "é".
        assert_eq!(tail("aé€", 4), "€");
        assert_eq!(head("aé€", 2), "a");
        assert_eq!(head("abc", 9), "abc");
    }
}
