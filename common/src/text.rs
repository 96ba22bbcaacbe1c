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

#[cfg(test)]
mod tests {
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
