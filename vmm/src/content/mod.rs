//! Content provisioning: a guest fetches host content by its ID over vsock.
//!
//! The host keeps content in a [`store`] directory, each item under its
//! SHA-256 digest, its [`ContentId`]. A VM started with `--content-store`
//! runs a [`service`] on a vsock host port; it hands the guest a copy of an
//! item only when the ID is well formed, [`grants`] allow it to this VM,
//! the store holds it and its bytes still hash to the ID (checked while
//! they stream). The protocol, the store's layout and the grant rules are
//! in `docs/content.md`.

pub mod grants;
pub mod service;
pub mod store;

use std::fmt;
use std::str::FromStr;

/// The prefix of every ID.
pub const ID_PREFIX: &str = "sha256:";

/// Hex digits of a SHA-256 digest.
const HEX_DIGITS: usize = 64;

/// A content ID: the SHA-256 digest of the content, written
/// `sha256:<64 lowercase hex digits>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId([u8; 32]);

/// Why a string is not a content ID; the text is what the guest and the
/// user are told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a content ID: an ID is \"sha256:\" followed by 64 lowercase hex digits")]
pub struct BadId(pub String);

impl ContentId {
    /// The ID of content with this digest.
    pub fn from_digest(digest: [u8; 32]) -> Self {
        ContentId(digest)
    }

    /// The digest.
    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits, which name the item in the store.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ID_PREFIX}{}", self.hex())
    }
}

impl FromStr for ContentId {
    type Err = BadId;

    fn from_str(s: &str) -> Result<Self, BadId> {
        // Quote at most a line's worth of bad input back.
        let bad = || BadId(s.chars().take(100).collect());
        let hex = s.strip_prefix(ID_PREFIX).ok_or_else(bad)?.as_bytes();
        if hex.len() != HEX_DIGITS {
            return Err(bad());
        }
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (hex_value(pair[0]).ok_or_else(bad)? << 4) | hex_value(pair[1]).ok_or_else(bad)?;
        }
        Ok(ContentId(digest))
    }
}

/// A lowercase hex digit's value.
fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn id_round_trips() {
        let id: ContentId = ABC.parse().expect("valid");
        assert_eq!(id.to_string(), ABC);
        assert_eq!(id.digest()[0], 0xba);
        assert_eq!(id.hex().len(), 64);
    }

    #[test]
    fn malformed_ids_are_refused() {
        let upper = ABC.to_uppercase().replace("SHA256:", "sha256:");
        let short = &ABC[..ABC.len() - 1];
        let long = format!("{ABC}0");
        let traversal = format!("sha256:../../{}", &ABC[13..]);
        for bad in ["", "sha256:", "sha1:abc", &upper, short, &long, &traversal, &ABC.replace("sha256:", "")] {
            assert!(bad.parse::<ContentId>().is_err(), "{bad:?} accepted");
        }
        let err = "x".repeat(5000).parse::<ContentId>().expect_err("refused");
        assert!(err.to_string().len() < 300, "the message quotes at most 100 characters");
    }
}
