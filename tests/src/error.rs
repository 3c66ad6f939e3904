//! The harness's error type: a message, with the guest console's last
//! lines (and anything else useful) attached.

use std::fmt;

#[derive(Clone)]
pub struct Error {
    msg: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(msg: impl Into<String>) -> Error {
        Error { msg: msg.into() }
    }

    /// Appends a titled block of context (a log tail, say).
    pub fn with_context(mut self, title: &str, text: &str) -> Error {
        if !text.trim().is_empty() {
            self.msg
                .push_str(&format!("\n----- {title} -----\n{}", text.trim_end()));
            self.msg.push_str(&format!("\n----- end of {title} -----"));
        }
        self
    }

    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

// Debug prints the message as is, so that `unwrap()` in a test shows the
// attached logs readably.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::new(e.to_string())
    }
}

/// Adds a description to any error convertible to a string.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(format!("{}: {e}", what())))
    }
}

/// The last `lines` lines of a text file ("" when it cannot be read).
pub fn file_tail(path: &std::path::Path, lines: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&data);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}
