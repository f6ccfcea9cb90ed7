//! Session IDs and session data: pure values and their invariants, no I/O and no gRPC.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;

mod attributes;

pub use attributes::{Attributes, MAX_KEY_BYTES};

/// Bytes in a session ID: 256 bits, of which 14 name the [`Slot`] and 242 are CSPRNG output,
/// far past OWASP ASVS's 128-bit floor.
pub const ID_BYTES: usize = 32;

/// Length of the text form: unpadded base64 of 32 bytes.
pub const ID_CHARS: usize = 43;

/// Bits of a session ID that name its slot: the first 14, big-endian.
pub const SLOT_BITS: u32 = 14;

/// How many slots there are: 16384, numbered `0..SLOTS`.
pub const SLOTS: u16 = 1 << SLOT_BITS;

/// Bits of a session ID drawn from the CSPRNG and nothing else: 256 - 14 = 242.
pub const RANDOM_BITS: u32 = ID_BYTES as u32 * 8 - SLOT_BITS;

/// Where the slot sits in the ID's first two bytes read as a big-endian `u16`: above the 2
/// random bits that share byte 1 with it.
const SLOT_SHIFT: u32 = 16 - SLOT_BITS;

/// The whole bytes after the slot: bytes `2..32`. Everything the server derives from a key
/// (the map's hash, the wheel's part, the log fingerprint) reads these, never the slot, so
/// that keys sharing a slot still spread evenly.
const RANDOM_TAIL: usize = ID_BYTES - 2;

/// A session ID in its binary form. Every client-supplied ID is parsed into one of these
/// before it gets near the map, so malformed input never costs a lookup.
///
/// # Layout
///
/// The first [`SLOT_BITS`] (14) bits, read big-endian, are the ID's [`Slot`]: all of byte 0
/// and the high 6 bits of byte 1. In the text form they are the first two characters and the
/// high 2 bits of the third, so a router can read the slot from a 3-character prefix. The
/// other [`RANDOM_BITS`] (242) bits, the low 2 bits of byte 1 and bytes 2..32, are CSPRNG
/// output. The slot is not secret; the 242 bits are the credential.
///
/// `Debug` and `Display` print only a short fingerprint: a full ID is a bearer credential
/// and must never reach a log line or an error message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionKey([u8; ID_BYTES]);

/// The part of the keyspace a session ID belongs to, carried in the ID's first 14 bits (see
/// [`SessionKey`]'s layout). It exists so that the slots can later be sharded across several
/// replication groups without changing IDs or clients: a node can then route an ID by its
/// slot.
/// For now a single group owns every slot, so the slot decides nothing yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(u16);

impl Slot {
    /// `Some` if `n` names a slot, that is `n < SLOTS`.
    pub const fn new(n: u16) -> Option<Self> {
        if n < SLOTS {
            Some(Slot(n))
        } else {
            None
        }
    }

    /// The slot `key` carries. Every key has one, including keys issued before IDs carried
    /// slots: those read as whatever slot their first 14 random bits spell.
    pub fn of(key: &SessionKey) -> Self {
        Slot(u16::from_be_bytes([key.0[0], key.0[1]]) >> SLOT_SHIFT)
    }

    /// The slot's number, below [`SLOTS`].
    pub const fn get(self) -> u16 {
        self.0
    }
}

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
    /// A fresh key in a uniformly random slot: all 256 bits come from the thread-local
    /// CSPRNG (ChaCha, seeded and periodically reseeded from the operating system), so the
    /// slot bits are as random as the rest. Sessions spread evenly over the slots, which is
    /// what a later split of the slots across groups wants.
    pub fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        SessionKey(bytes)
    }

    /// A fresh key in `slot`: 242 bits from the CSPRNG, as [`SessionKey::generate`] draws
    /// them, and the slot written over the first 14.
    pub fn generate_in(slot: Slot) -> Self {
        Self::generate().with_slot(slot)
    }

    /// This key with its slot bits replaced by `slot` and its 242 random bits untouched.
    /// Tests use it to make keys that differ only in their slot.
    pub(crate) fn with_slot(mut self, slot: Slot) -> Self {
        // The first two bytes, big-endian: the slot on top, 2 random bits kept below it.
        let random_low = u16::from(self.0[1]) & ((1 << SLOT_SHIFT) - 1);
        let top = slot.0 << SLOT_SHIFT | random_low;
        self.0[..2].copy_from_slice(&top.to_be_bytes());
        self
    }

    /// Parses the text form. Checks length first, so a huge input costs nothing to reject.
    ///
    /// Any 32-byte value is accepted: the slot bits are not checked, because IDs issued
    /// before IDs carried slots hold arbitrary bits there. Such an ID simply reads as some
    /// slot, which is harmless while a single group owns every slot.
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

    /// The text form written into `out`, without allocating: for encoding replies.
    pub fn encode_into<'a>(&self, out: &'a mut [u8; ID_CHARS]) -> &'a str {
        // 43 characters always hold 32 bytes of unpadded base64, whose alphabet is ASCII.
        let n = URL_SAFE_NO_PAD.encode_slice(self.0, out).unwrap_or(0);
        std::str::from_utf8(&out[..n]).unwrap_or_default()
    }

    /// A short, non-reversible name for logs: enough to correlate lines, useless to an attacker.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        // The random tail is uniform, so a slice of it hashed with a fixed mixer is as good as
        // a cryptographic hash for correlation, and these 32 bits cannot be used to forge the
        // other 210 random ones. The last 4 bytes: far from the slot and from the map's hash.
        let [.., a, b, c, d] = *self.random_tail();
        let mut h = u32::from_le_bytes([a, b, c, d]);
        h ^= h >> 16;
        h = h.wrapping_mul(0x7feb_352d);
        h ^= h >> 15;
        Fingerprint(h)
    }

    /// The raw bytes, for persistence.
    pub fn as_bytes(&self) -> &[u8; ID_BYTES] {
        &self.0
    }

    /// Bytes 2..32, which hold no slot bits: what hashes, part choices and fingerprints read,
    /// so that they stay uniform however the slots are chosen.
    pub(crate) fn random_tail(&self) -> &[u8; RANDOM_TAIL] {
        let (_, tail) = self
            .0
            .split_last_chunk::<RANDOM_TAIL>()
            .expect("an ID is longer than its tail");
        tail
    }

    /// Rebuilds a key from raw bytes read back from persistence.
    pub fn from_bytes(bytes: [u8; ID_BYTES]) -> Self {
        SessionKey(bytes)
    }
}

impl Hash for SessionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The random tail is uniform: its first 8 bytes (the key's bytes 2..10) are a perfect
        // hash. The slot stays out, or keys generated in one slot would share hash bits.
        let [a, b, c, d, e, f, g, h, ..] = *self.random_tail();
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
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

/// A hasher for keys that are already random: it passes through the 64 bits that
/// `SessionKey`'s `Hash` writes, which are CSPRNG output and never slot bits.
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
        f.debug_struct("Session")
            .field("key", &self.key)
            .field("user", &self.user)
            .field("attribute_keys", &self.attributes)
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
        assert_eq!(a.encode_into(&mut [0; ID_CHARS]), text);
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

    /// `key` with one random bit flipped: bit `bit` of byte `byte`, at or after byte 2.
    fn flip(key: SessionKey, byte: usize, bit: u8) -> SessionKey {
        assert!(byte >= 2, "bytes 0 and 1 hold the slot");
        let mut bytes = *key.as_bytes();
        bytes[byte] ^= 1 << bit;
        SessionKey::from_bytes(bytes)
    }

    fn hash(key: &SessionKey) -> u64 {
        use std::hash::BuildHasher as _;
        KeyHasherBuilder::default().hash_one(key)
    }

    /// The same key in another slot: `step` slots further on, so never its own.
    fn elsewhere(key: SessionKey, step: u16) -> SessionKey {
        let slot = Slot::new((Slot::of(&key).get() + step) % SLOTS).unwrap();
        let other = key.with_slot(slot);
        assert_ne!(other, key, "a step of {step} is no move");
        other
    }

    #[test]
    fn slots_are_checked_and_sit_in_the_first_14_bits() {
        assert_eq!(SLOTS, 16384);
        assert_eq!(RANDOM_BITS, 242);
        assert_eq!(Slot::new(16383).map(Slot::get), Some(16383));
        assert_eq!(Slot::new(16384), None);
        assert_eq!(Slot::new(u16::MAX), None);

        // Byte 0 and the high 6 bits of byte 1, big-endian; byte 1's low 2 bits are random.
        let mut bytes = [0u8; ID_BYTES];
        bytes[1] = 0b11;
        assert_eq!(Slot::of(&SessionKey::from_bytes(bytes)).get(), 0);
        bytes[1] = 0b100;
        assert_eq!(Slot::of(&SessionKey::from_bytes(bytes)).get(), 1);
        bytes[0] = 0x80;
        bytes[1] = 0;
        assert_eq!(Slot::of(&SessionKey::from_bytes(bytes)).get(), 8192);
        assert_eq!(
            Slot::of(&SessionKey::from_bytes([0xff; ID_BYTES])).get(),
            16383
        );
    }

    #[test]
    fn generate_in_sets_the_slot_and_keeps_the_rest_random() {
        for n in [0, 1, 2, 77, 8191, 8192, 16382, 16383] {
            let slot = Slot::new(n).unwrap();
            let a = SessionKey::generate_in(slot);
            let b = SessionKey::generate_in(slot);
            assert_eq!((Slot::of(&a), Slot::of(&b)), (slot, slot));
            assert_ne!(a.random_tail(), b.random_tail());
            // The text form is unchanged in shape, and one slot is one 2-character prefix.
            let (ta, tb) = (a.encode(), b.encode());
            assert_eq!(ta.len(), ID_CHARS);
            assert_eq!(ta[..2], tb[..2]);
            assert_eq!(SessionKey::parse(&ta), Ok(a));
        }
        // Re-slotting touches the slot bits only: byte 1's low 2 bits and bytes 2.. stay.
        let key = SessionKey::from_bytes([0xff; ID_BYTES]);
        let moved = key.with_slot(Slot::new(0).unwrap());
        assert_eq!(moved.as_bytes()[..2], [0x00, 0x03]);
        assert_eq!(moved.random_tail(), key.random_tail());
    }

    #[test]
    fn generate_spreads_keys_over_the_slots() {
        // 4096 draws over 16384 slots: a fixed slot would give 1, a uniform one ~3600.
        let slots: std::collections::HashSet<_> = (0..4096)
            .map(|_| Slot::of(&SessionKey::generate()))
            .collect();
        assert!(slots.len() > 3000, "{} distinct slots", slots.len());
    }

    #[test]
    fn any_32_bytes_parse_whatever_slot_they_spell() {
        // IDs issued before slots existed hold arbitrary bits where the slot now sits.
        for fill in [0x00, 0x5a, 0xff] {
            let key = SessionKey::from_bytes([fill; ID_BYTES]);
            assert_eq!(SessionKey::parse(&key.encode()), Ok(key));
        }
    }

    #[test]
    fn hash_and_fingerprint_ignore_the_slot() {
        let key = SessionKey::generate();
        for step in [1, 2, 4096, 8192, 16383] {
            let other = elsewhere(key, step);
            assert_eq!(hash(&other), hash(&key));
            assert_eq!(other.fingerprint().0, key.fingerprint().0);
        }
    }

    #[test]
    fn hash_and_fingerprint_follow_the_random_bits() {
        let key = SessionKey::generate_in(Slot::new(5).unwrap());
        // The map's hash reads bytes 2..10, the fingerprint bytes 28..32.
        for byte in 2..10 {
            assert_ne!(hash(&flip(key, byte, 0)), hash(&key), "byte {byte}");
        }
        for byte in 28..32 {
            assert_ne!(
                flip(key, byte, 7).fingerprint().0,
                key.fingerprint().0,
                "byte {byte}"
            );
        }
        // Keys in one slot hash apart: 64 random bits each, so 1000 never collide.
        let keys: Vec<_> = (0..1000)
            .map(|_| SessionKey::generate_in(Slot::new(5).unwrap()))
            .collect();
        let hashes: std::collections::HashSet<_> = keys.iter().map(hash).collect();
        assert_eq!(hashes.len(), keys.len());
        // 32-bit fingerprints: one collision among 1000 has odds of about 1 in 8600, and the
        // three that fail this far less.
        let prints: std::collections::HashSet<_> = keys.iter().map(|k| k.fingerprint().0).collect();
        assert!(prints.len() >= keys.len() - 2);
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
