//! A small JSON value and its pretty printer, for `vsockd status --json`
//! (the document is built field by field, so a derive-based serializer
//! would buy nothing).
//!
//! Strings are escaped as RFC 8259 requires: `"` and `\`, and every control
//! character below U+0020. Numbers are integers, or decimals the caller
//! formats with a fixed number of digits (never NaN or infinite). Object
//! keys keep the order they were given in.

use std::fmt::Write;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// An integer.
    Int(i128),
    /// A decimal with `digits` digits after the point.
    Fixed {
        value: f64,
        digits: usize,
    },
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(&'static str, Json)>),
}

impl Json {
    /// An integer, or null.
    pub fn opt_int(v: Option<impl Into<i128>>) -> Json {
        v.map_or(Json::Null, |v| Json::Int(v.into()))
    }

    /// The document, indented by two spaces per level, with a final
    /// newline.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Fixed { value, digits } => {
                if value.is_finite() {
                    let _ = write!(out, "{value:.digits$}");
                } else {
                    out.push_str("null");
                }
            }
            Json::Str(s) => escape_into(out, s),
            Json::Array(items) if items.is_empty() => out.push_str("[]"),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    item.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push(']');
            }
            Json::Object(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Object(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    escape_into(out, key);
                    out.push_str(": ");
                    value.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push('}');
            }
        }
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

/// Appends `s` as a JSON string literal.
fn escape_into(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_rfc_8259_requires() {
        let mut out = String::new();
        escape_into(&mut out, "a\"b\\c\nd\u{1}é/");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é/""#);
    }

    #[test]
    fn pretty_prints_nested_values() {
        let doc = Json::Object(vec![
            ("n", Json::Int(-3)),
            (
                "t",
                Json::Fixed {
                    value: 1.5,
                    digits: 3,
                },
            ),
            (
                "nan",
                Json::Fixed {
                    value: f64::NAN,
                    digits: 3,
                },
            ),
            ("list", Json::Array(vec![Json::Bool(true), Json::Null])),
            ("empty", Json::Array(vec![])),
            ("obj", Json::Object(vec![("s", Json::Str("x".into()))])),
            ("none", Json::opt_int(None::<u32>)),
        ]);
        let want = "{\n  \"n\": -3,\n  \"t\": 1.500,\n  \"nan\": null,\n  \"list\": [\n    true,\n    null\n  ],\n  \"empty\": [],\n  \"obj\": {\n    \"s\": \"x\"\n  },\n  \"none\": null\n}\n";
        assert_eq!(doc.pretty(), want);
    }
}
