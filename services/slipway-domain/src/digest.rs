//! A content digest as events carry it: `sha256:<64 hex digits>` (an artifact, a log, the gate
//! reports an approval is about). A digest read from the log is kept as it was written, even one
//! a later release would not make: the log is forever, and a reader only compares it.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// `sha256:<hex>`.
// Inlined in the event schemas: a plain string there, as before the type existed.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
#[schemars(inline)]
pub struct Digest(String);

const SHA256: &str = "sha256:";

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha256(&Sha256::digest(bytes))
    }

    /// The digest of a SHA-256 computed elsewhere (a file read in pieces).
    pub fn from_sha256(hash: &[u8]) -> Self {
        let mut s = String::with_capacity(SHA256.len() + 2 * hash.len());
        s.push_str(SHA256);
        for b in hash {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex digits after `sha256:` (the whole text when it has no such prefix).
    pub fn hex(&self) -> &str {
        self.0.strip_prefix(SHA256).unwrap_or(&self.0)
    }

    /// The 32 bytes of the SHA-256, when this is a well-formed one.
    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        let hex = self.0.strip_prefix(SHA256)?;
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }

    /// The first `n` characters of the hex digits (by characters: a digest from an event is not
    /// trusted to be ASCII).
    pub fn short(&self, n: usize) -> String {
        self.hex().chars().take(n).collect()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Digest {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Digest {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_sha256_in_hex_and_keeps_whatever_the_log_wrote() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.as_str(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.hex().len(), 64);
        assert_eq!(d.short(12), "ba7816bf8f01");
        assert_eq!(Digest::from_sha256(&d.sha256_bytes().unwrap()), d);
        assert_eq!(serde_json::to_value(&d).unwrap(), d.as_str());
        // Kept as written; only a well-formed one has bytes.
        let odd: Digest = serde_json::from_str("\"sha256:xyz\"").unwrap();
        assert_eq!(odd, "sha256:xyz");
        assert_eq!(odd.sha256_bytes(), None);
        assert_eq!(Digest::from("md5:00").hex(), "md5:00");
    }
}
