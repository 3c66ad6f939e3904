//! Session tokens: 128 random bits from the kernel (`getrandom(2)`),
//! written as 32 lowercase hexadecimal digits.

use std::fmt;
use std::io;

/// Bytes of a token.
pub const TOKEN_BYTES: usize = 16;

/// The name of a resumable session.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Token(pub [u8; TOKEN_BYTES]);

impl Token {
    /// A new random token.
    pub fn random() -> io::Result<Token> {
        let mut bytes = [0u8; TOKEN_BYTES];
        let mut got = 0;
        while got < TOKEN_BYTES {
            // SAFETY: getrandom(2) writes at most the given length into
            // the rest of `bytes`, which we own.
            let n =
                unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), TOKEN_BYTES - got, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            got += n as usize;
        }
        Ok(Token(bytes))
    }

    /// Parses 32 hexadecimal digits (either case).
    pub fn parse(text: &str) -> Option<Token> {
        let digits = text.as_bytes();
        if digits.len() != 2 * TOKEN_BYTES {
            return None;
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        for (b, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            *b = (hi << 4 | lo) as u8;
        }
        Some(Token(bytes))
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Tokens are secrets: logs show only their first digits.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}{:02x}…", self.0[0], self.0[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_back() {
        let t = Token::random().unwrap();
        let text = t.to_string();
        assert_eq!(text.len(), 32);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(Token::parse(&text), Some(t));
        assert_eq!(Token::parse(&text.to_uppercase()), Some(t));
        assert_ne!(Token::random().unwrap(), t, "two tokens alike");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert_eq!(Token::parse(""), None);
        assert_eq!(Token::parse(&"0".repeat(31)), None);
        assert_eq!(Token::parse(&"0".repeat(33)), None);
        assert_eq!(Token::parse(&format!("{}g", "0".repeat(31))), None);
        assert_eq!(Token::parse(&format!("{}+1", "0".repeat(30))), None);
        assert_eq!(
            Token::parse("000102030405060708090a0b0c0d0e0f"),
            Some(Token([
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
            ]))
        );
    }
}
