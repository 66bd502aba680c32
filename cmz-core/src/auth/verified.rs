//! Access tokens verified recently, so a token sent on every request of a session has its
//! signature checked and its claims decoded once.
//!
//! Only tokens that passed full verification are remembered, keyed by their exact text
//! (compared in constant time); expiry and not-before are checked again on every use, and
//! revocation is not cached at all (the caller checks it on every request). The cache is
//! bounded: when full it starts over.

use std::hash::{Hash, Hasher};
use std::sync::Mutex;

// foldhash, seeded per process: the keys are tokens that passed verification, so
// nobody can choose them to collide, and a token is hashed on every request.
use foldhash::HashMap;

use crate::access::Principal;

/// How many distinct tokens are remembered before the cache starts over.
const CAPACITY: usize = 4096;

/// What a verified token carries that a request needs.
#[derive(Debug, Clone)]
pub(super) struct Verified {
    pub(super) principal: Principal,
    pub(super) exp: i64,
    pub(super) nbf: Option<i64>,
    pub(super) jti: Option<String>,
    pub(super) sid: Option<String>,
}

/// A token's text as a map key, compared in constant time so a lookup does not reveal how
/// much of a forged token matches a real one.
#[derive(Debug)]
struct TokenText(Box<str>);

impl PartialEq for TokenText {
    fn eq(&self, other: &Self) -> bool {
        same_text(self.0.as_bytes(), other.0.as_bytes())
    }
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only: every
/// byte is read, the differences are gathered eight bytes at a time (a byte at a time,
/// as `subtle` does it, cost about 3,000 instructions a request), and one value opaque
/// to the optimizer decides.
fn same_text(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (words_a, words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = words_a.remainder().iter().zip(words_b.remainder());
    let mut differ = tail.fold(0u64, |acc, (x, y)| acc | u64::from(x ^ y));
    for (x, y) in words_a.zip(words_b) {
        let word = |bytes: &[u8]| u64::from_ne_bytes(bytes.try_into().unwrap_or([0; 8]));
        differ |= word(x) ^ word(y);
    }
    std::hint::black_box(differ) == 0
}

impl Eq for TokenText {}

impl Hash for TokenText {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// The cache (see the module docs).
#[derive(Debug, Default)]
pub(super) struct VerifiedTokens {
    tokens: Mutex<HashMap<TokenText, Verified>>,
}

impl VerifiedTokens {
    /// The remembered verification of `token`, if any (expiry not checked here).
    pub(super) fn get(&self, token: &str) -> Option<Verified> {
        let key = TokenText(token.into());
        self.lock().get(&key).cloned()
    }

    /// Remembers a token that passed verification.
    pub(super) fn insert(&self, token: &str, verified: Verified) {
        let mut tokens = self.lock();
        if tokens.len() >= CAPACITY {
            tokens.clear();
        }
        tokens.insert(TokenText(token.into()), verified);
    }

    /// Forgets `token` (expired, or no longer wanted).
    pub(super) fn remove(&self, token: &str) {
        self.lock().remove(&TokenText(token.into()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenText, Verified>> {
        // The map holds no invariant a panicking holder could break.
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::UserRole;
    use crate::ids::UserId;

    fn verified(exp: i64) -> Verified {
        Verified {
            principal: Principal::new(UserId::new("user_a").unwrap(), UserRole::Student),
            exp,
            nbf: None,
            jti: Some("j".into()),
            sid: None,
        }
    }

    #[test]
    fn remembers_exact_tokens_only_and_stays_bounded() {
        let cache = VerifiedTokens::default();
        cache.insert("a.b.c", verified(1));
        assert_eq!(cache.get("a.b.c").unwrap().exp, 1);
        assert!(cache.get("a.b.C").is_none());
        assert!(cache.get("a.b.c ").is_none());
        cache.remove("a.b.c");
        assert!(cache.get("a.b.c").is_none());
        for i in 0..CAPACITY + 10 {
            cache.insert(&format!("t{i}"), verified(i as i64));
        }
        assert!(cache.lock().len() <= CAPACITY);
        assert!(cache.get(&format!("t{}", CAPACITY + 9)).is_some());
    }

    #[test]
    fn texts_are_equal_only_when_every_byte_is() {
        for len in 0..40 {
            let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(same_text(&text, &text.clone()), "{len}");
            for at in 0..len {
                let mut other = text.clone();
                other[at] ^= 0x20;
                assert!(!same_text(&text, &other), "{len} at {at}");
            }
            let mut longer = text.clone();
            longer.push(b'a');
            assert!(!same_text(&text, &longer), "{len}");
        }
    }
}
