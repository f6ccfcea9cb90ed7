//! Session IDs and session data: pure values and their invariants, no I/O and no gRPC.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use rand::RngCore as _;

/// Bytes of randomness in a session ID: 256 bits, well past OWASP's 64-bit floor.
pub const ID_BYTES: usize = 32;

/// Length of the text form: unpadded base64 of 32 bytes.
pub const ID_CHARS: usize = 43;

/// A session ID in its binary form. Every client-supplied ID is parsed into one of these
/// before it gets near the map, so malformed input never costs a lookup.
///
/// `Debug` and `Display` print only a short fingerprint: a full ID is a bearer credential
/// and must never reach a log line or an error message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionKey([u8; ID_BYTES]);

/// Why a client-supplied session ID was rejected. The messages never echo the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The ID was the empty string.
    #[error("session id is empty")]
    Empty,
    /// The ID was not 43 characters long.
    #[error("session id must be {ID_CHARS} characters, got {0}")]
    Length(usize),
    /// The ID had characters outside the URL-safe base64 alphabet.
    #[error("session id is not URL-safe base64")]
    Alphabet,
}

impl SessionKey {
    /// A fresh key from the thread-local CSPRNG (ChaCha, seeded and periodically reseeded
    /// from the operating system).
    pub fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        SessionKey(bytes)
    }

    /// Parses the text form. Checks length first, so a huge input costs nothing to reject.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        match text.len() {
            0 => return Err(IdError::Empty),
            ID_CHARS => {}
            n => return Err(IdError::Length(n)),
        }
        let mut bytes = [0u8; ID_BYTES];
        // The decoder rejects non-canonical trailing bits, so every key has exactly one text form.
        match URL_SAFE_NO_PAD.decode_slice(text.as_bytes(), &mut bytes) {
            Ok(ID_BYTES) => Ok(SessionKey(bytes)),
            _ => Err(IdError::Alphabet),
        }
    }

    /// The text form handed to clients.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// A short, non-reversible name for logs: enough to correlate lines, useless to an attacker.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        // The key is uniformly random, so a slice of it hashed with a fixed mixer is as good as
        // a cryptographic hash for correlation, and 32 bits cannot be used to forge the other 224.
        let mut h = u32::from_le_bytes([self.0[28], self.0[29], self.0[30], self.0[31]]);
        h ^= h >> 16;
        h = h.wrapping_mul(0x7feb_352d);
        h ^= h >> 15;
        Fingerprint(h)
    }

    /// The raw bytes, for persistence.
    pub fn as_bytes(&self) -> &[u8; ID_BYTES] {
        &self.0
    }

    /// Rebuilds a key from raw bytes read back from persistence.
    pub fn from_bytes(bytes: [u8; ID_BYTES]) -> Self {
        SessionKey(bytes)
    }
}

impl Hash for SessionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The key is already uniformly random: its first 8 bytes are a perfect hash.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({})", self.fingerprint())
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fingerprint().fmt(f)
    }
}

/// What logs print instead of a session ID.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint(u32);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sid#{:08x}", self.0)
    }
}

/// A hasher for keys that are already random: it passes the 64 bits through.
///
/// Safe against hash flooding because clients cannot choose which keys get inserted: the
/// server generates every stored key. Unknown keys only probe, they never fill a bucket.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if a caller hashes something other than a `SessionKey`; fold it in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `BuildHasher` for maps keyed by `SessionKey`.
pub type KeyHasherBuilder = std::hash::BuildHasherDefault<KeyHasher>;

/// Where a session was started from. Shown on "active devices" pages; never trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's IP address as the app server saw it.
    pub ip: String,
    /// The browser's User-Agent.
    pub user_agent: String,
}

/// Milliseconds since the Unix epoch. Deadlines are wall-clock times so they survive restarts.
pub type Millis = u64;

/// Attribute map of a session. `Bytes` values are shared, not copied, on reads.
pub type Attributes = HashMap<String, Bytes>;

/// A snapshot of one session, as the Store hands it out. Its `Debug` shows attribute keys
/// but never their values.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// The session's key.
    pub key: SessionKey,
    /// The bound user, `None` for anonymous sessions.
    pub user: Option<Arc<str>>,
    /// The attributes (empty when a listing left them out).
    pub attributes: Attributes,
    /// 1 at creation, +1 per mutation.
    pub version: u64,
    /// Creation time (or the login time, for a regenerate that bound a new user).
    pub created_at: Millis,
    /// Last access that slid the idle deadline.
    pub last_access_at: Millis,
    /// The idle window.
    pub idle_timeout: Millis,
    /// The hard cap.
    pub absolute_expires_at: Millis,
    /// Where it was created from.
    pub client: ClientInfo,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&str> = self.attributes.keys().map(String::as_str).collect();
        keys.sort_unstable();
        f.debug_struct("Session")
            .field("key", &self.key)
            .field("user", &self.user)
            .field("attribute_keys", &keys)
            .field("version", &self.version)
            .field("created_at", &self.created_at)
            .field("last_access_at", &self.last_access_at)
            .field("idle_timeout", &self.idle_timeout)
            .field("absolute_expires_at", &self.absolute_expires_at)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// `min(last_access + idle_timeout, absolute_expires_at)`.
    pub fn expires_at(&self) -> Millis {
        deadline(
            self.last_access_at,
            self.idle_timeout,
            self.absolute_expires_at,
        )
    }
}

/// The one formula for when a session dies.
pub fn deadline(last_access: Millis, idle_timeout: Millis, absolute: Millis) -> Millis {
    last_access.saturating_add(idle_timeout).min(absolute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_round_trip_and_differ() {
        let a = SessionKey::generate();
        let b = SessionKey::generate();
        assert_ne!(a, b);
        let text = a.encode();
        assert_eq!(text.len(), ID_CHARS);
        assert!(text
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(SessionKey::parse(&text), Ok(a));
    }

    #[test]
    fn malformed_ids_are_rejected() {
        let good = SessionKey::generate().encode();
        assert_eq!(SessionKey::parse(""), Err(IdError::Empty));
        assert_eq!(SessionKey::parse(&good[1..]), Err(IdError::Length(42)));
        assert_eq!(
            SessionKey::parse(&"A".repeat(1 << 20)),
            Err(IdError::Length(1 << 20))
        );
        let mut bad = good.clone();
        bad.replace_range(0..1, "+");
        assert_eq!(SessionKey::parse(&bad), Err(IdError::Alphabet));
        // 43 bytes, but not ASCII: 41 ASCII plus one 2-byte char.
        let non_ascii = format!("{}é", &good[..41]);
        assert_eq!(non_ascii.len(), ID_CHARS);
        assert_eq!(SessionKey::parse(&non_ascii), Err(IdError::Alphabet));
        // Standard-alphabet padding characters are not accepted either.
        let padded = format!("{}=", &good[..42]);
        assert_eq!(SessionKey::parse(&padded), Err(IdError::Alphabet));
    }

    #[test]
    fn non_canonical_trailing_bits_are_rejected() {
        // 43 chars carry 258 bits; the last char's low 2 bits must be zero.
        let good = SessionKey::generate().encode();
        let last = good.as_bytes()[42];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.iter().position(|&c| c == last).unwrap();
        let tweaked = alphabet[idx | 1] as char;
        let bad = format!("{}{}", &good[..42], tweaked);
        assert_eq!(SessionKey::parse(&bad), Err(IdError::Alphabet));
    }

    #[test]
    fn debug_and_display_never_show_the_id() {
        let key = SessionKey::generate();
        let text = key.encode();
        for shown in [format!("{key:?}"), format!("{key}")] {
            assert!(!shown.contains(&text));
            assert!(!shown.contains(&text[..8]));
            assert!(shown.contains("sid#"));
        }
    }
}
