//! sha256 digests: parsing `sha256:<hex>` and hashing a stream as it is read.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::error::{ImageError, Result};

/// The hex part of a `sha256:<64 lowercase hex digits>` digest; anything else (another
/// algorithm, a malformed value) is refused naming `what`.
pub fn sha256_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str> {
    let hex = match digest.split_once(':') {
        Some(("sha256", hex)) => hex,
        Some((alg, _)) => {
            return Err(ImageError::Invalid(format!(
                "{what} has digest {digest:?}: only sha256 digests are supported, not {alg}"
            )))
        }
        None => {
            return Err(ImageError::Invalid(format!(
                "{what} has a malformed digest {digest:?}"
            )))
        }
    };
    if is_hex64(hex) {
        Ok(hex)
    } else {
        Err(ImageError::Invalid(format!(
            "{what} has a malformed digest {digest:?}"
        )))
    }
}

/// Whether `s` is 64 lowercase hex digits (a sha256 in the store's naming).
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A reader that hashes (sha256) and counts what passes through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Hashing<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads (and hashes) whatever is left: a tar ends before its stream does (padding).
    pub fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The hex sha256 of everything read, and its length.
    pub fn finish(self) -> (String, u64) {
        (hex(&self.hasher.finalize()), self.count)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The hex sha256 of `bytes`.
pub fn sha256_of(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_hash() {
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(sha256_of(b""), empty);
        assert_eq!(sha256_hex(&format!("sha256:{empty}"), "x").unwrap(), empty);
        let err = sha256_hex("sha512:abcd", "layer 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sha512") && err.contains("layer 1"), "{err}");
        assert!(sha256_hex("sha256:ABCD", "x").is_err());
        assert!(sha256_hex(empty, "x").is_err());
        let mut h = Hashing::new(&b"abc"[..]);
        h.drain().unwrap();
        let (hex, n) = h.finish();
        assert_eq!(n, 3);
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
