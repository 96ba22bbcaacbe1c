//! `-o yaml`: what `-o json` prints, as YAML 1.2 block style. Every string is written
//! double-quoted with JSON's escapes (a YAML double-quoted scalar accepts them), so no value
//! changes type on the way (`"no"`, `"1e3"`, `"null"` stay strings); keys are bare when they are
//! plain identifiers, quoted otherwise.

use serde_json::Value;

/// `v` as one YAML document (starting `---`, ending with a newline).
pub fn document(v: &Value) -> String {
    let mut out = String::from("---");
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            seq(&mut out, a, 0);
        }
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            map(&mut out, m, 0);
        }
        scalar => {
            out.push(' ');
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
    out
}

/// A scalar, or an empty collection, on one line.
fn inline(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => quoted(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn key(k: &str) -> String {
    let plain = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        k.to_string()
    } else {
        quoted(k)
    }
}

fn nested(v: &Value) -> bool {
    match v {
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
        _ => false,
    }
}

fn map(out: &mut String, m: &serde_json::Map<String, Value>, indent: usize) {
    let pad = " ".repeat(indent);
    for (k, v) in m {
        out.push_str(&pad);
        out.push_str(&key(k));
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                map(out, inner, indent + 2);
            }
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                seq(out, items, indent);
            }
            scalar => {
                out.push(' ');
                out.push_str(&inline(scalar));
                out.push('\n');
            }
        }
    }
}

fn seq(out: &mut String, items: &[Value], indent: usize) {
    let pad = " ".repeat(indent);
    for v in items {
        out.push_str(&pad);
        out.push('-');
        if !nested(v) {
            out.push(' ');
            out.push_str(&inline(v));
            out.push('\n');
            continue;
        }
        // A collection in a list starts on the dash's line, indented past it.
        let mut inner = String::new();
        match v {
            Value::Object(m) => map(&mut inner, m, indent + 2),
            Value::Array(a) => seq(&mut inner, a, indent + 2),
            _ => unreachable!("nested is a collection"),
        }
        out.push(' ');
        out.push_str(&inner[indent + 2..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_lists_and_scalars_in_block_style_with_every_string_quoted() {
        let v = json!({
            "name": "m1",
            "phase": "no",
            "bytes": 1024,
            "ratio": 0.5,
            "done": true,
            "error": null,
            "paths": ["/data", "/x y"],
            "empty": [],
            "nothing": {},
            "largest": [["/a", 3], ["/b", 2]],
            "runs": [{"congestion": "bbr", "streams": 1}, {"congestion": "cubic", "streams": 2}],
            "spec": {"source": "src:/data", "weird key": "line\nbreak"},
        });
        let want = r#"---
bytes: 1024
done: true
empty: []
error: null
largest:
- - "/a"
  - 3
- - "/b"
  - 2
name: "m1"
nothing: {}
paths:
- "/data"
- "/x y"
phase: "no"
ratio: 0.5
runs:
- congestion: "bbr"
  streams: 1
- congestion: "cubic"
  streams: 2
spec:
  source: "src:/data"
  "weird key": "line\nbreak"
"#;
        assert_eq!(document(&v), want);
        assert_eq!(document(&json!([])), "--- []\n");
        assert_eq!(document(&json!("x")), "--- \"x\"\n");
    }
}
