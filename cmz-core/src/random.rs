//! Key and secret material, always from the operating system's CSPRNG.
//!
//! The one place cmz asks for unpredictable bytes: token ids, refresh tokens, password
//! salts, cursor-signing keys and generated secrets all come from here. (Ids that only
//! need to be unique, such as message ids, use a fast generator instead; see
//! [`fast_uuid_v4`](crate::ids::fast_uuid_v4).)
//!
//! ```
//! let key: [u8; 32] = cmz_core::random::secret_bytes()?;
//! assert_ne!(key, [0u8; 32]);
//! assert_eq!(cmz_core::random::secret_hex(24)?.len(), 48);
//! # Ok::<(), cmz_core::Error>(())
//! ```

use crate::error::{Error, Result};

/// `N` bytes from the OS CSPRNG; `unavailable` if the OS cannot provide them.
pub fn secret_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    fill(&mut bytes)?;
    Ok(bytes)
}

/// Fills `buffer` from the OS CSPRNG; `unavailable` if the OS cannot.
pub fn fill(buffer: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buffer)
        .map_err(|e| Error::unavailable("system randomness", std::io::Error::other(e.to_string())))
}

/// `bytes` random bytes from the OS CSPRNG, hex-encoded (`2 * bytes` characters).
pub fn secret_hex(bytes: usize) -> Result<String> {
    let mut buffer = vec![0u8; bytes];
    fill(&mut buffer)?;
    Ok(hex::encode(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_differ() {
        let a: [u8; 16] = secret_bytes().unwrap();
        let b: [u8; 16] = secret_bytes().unwrap();
        assert_ne!(a, b);
        let hex = secret_hex(16).unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
