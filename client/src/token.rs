//! Session tokens: 128 random bits chosen by vsockd, written as 32
//! lowercase hexadecimal digits.

use std::fmt;
use std::str::FromStr;

use crate::error::ClientError;

/// Bytes in a session token.
pub const TOKEN_BYTES: usize = 16;
/// Hexadecimal digits in a token's text form.
pub const TOKEN_HEX_DIGITS: usize = TOKEN_BYTES * 2;

/// Names a resumable session. Whoever knows it can take the session over:
/// keep it as secret as the data.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; TOKEN_BYTES]);

impl Token {
    /// The token's bytes.
    pub fn as_bytes(&self) -> &[u8; TOKEN_BYTES] {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Shows only the first digits: a token in a log is a credential in a log.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl FromStr for Token {
    type Err = ClientError;

    /// Parses 32 hexadecimal digits. Uppercase digits are accepted; vsockd
    /// writes lowercase.
    fn from_str(text: &str) -> Result<Token, ClientError> {
        let invalid = |problem| ClientError::InvalidToken {
            text: text.to_owned(),
            problem,
        };
        let digits = text.as_bytes();
        if digits.len() != TOKEN_HEX_DIGITS {
            return Err(invalid("wrong length"));
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let high = hex_value(pair[0]).ok_or_else(|| invalid("not a hexadecimal digit"))?;
            let low = hex_value(pair[1]).ok_or_else(|| invalid("not a hexadecimal digit"))?;
            *byte = (high << 4) | low;
        }
        Ok(Token(bytes))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_lowercase_hex() {
        let token = Token([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ]);
        assert_eq!(token.to_string(), "0123456789abcdeffedcba9876543210");
    }

    #[test]
    fn parses_what_it_formats() {
        let token = Token([0xa5; TOKEN_BYTES]);
        let parsed: Token = token.to_string().parse().unwrap();
        assert_eq!(parsed, token);
        let upper: Token = "A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A5".parse().unwrap();
        assert_eq!(upper, token);
    }

    #[test]
    fn rejects_wrong_length_and_digits() {
        for text in ["", "abc", &"0".repeat(31), &"0".repeat(33)] {
            let err = text.parse::<Token>().unwrap_err();
            assert!(err.to_string().contains("wrong length"), "{err}");
        }
        let bad = format!("{}g", "0".repeat(31));
        let err = bad.parse::<Token>().unwrap_err();
        assert!(err.to_string().contains("not a hexadecimal digit"), "{err}");
        let sign = format!("+{}", "0".repeat(31));
        assert!(sign.parse::<Token>().is_err());
    }

    #[test]
    fn debug_does_not_show_the_whole_token() {
        let token = Token([0xcd; TOKEN_BYTES]);
        let shown = format!("{token:?}");
        assert!(!shown.contains(&token.to_string()), "{shown}");
    }
}
