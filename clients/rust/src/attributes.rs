//! A session's attributes as a reply carried them, packed into one buffer.
//!
//! Decoded into a `HashMap<String, Bytes>`, a session of twenty attributes costs a hash
//! table, twenty `String`s and the hashing of every key, on every read, and as much again
//! for each copy an app takes. Packed, the reply's attributes are copied once into one
//! buffer, and a copy of them is a reference count.
//!
//! Layout, repeated per attribute: key length (u32 LE), value length (u32 LE), key, value.
//! Each key appears once.

use std::collections::HashMap;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of length prefix per attribute.
const HEADER: usize = 8;

/// Above this many attributes, the check for a repeated key uses a hash set rather than
/// comparing every pair.
const PAIRWISE_MAX: usize = 32;

/// A session's attributes: UTF-8 keys to byte values, each key once. Immutable; cloning
/// shares the buffer. Reads walk it, which for the few dozen attributes of a session is
/// as fast as hashing the key.
///
/// It reads like a map (`get`, `contains_key`, `iter`, `keys`, `len`, `s.attributes["k"]`)
/// and compares as one. Its `Debug` shows the keys, never the values: they may be secrets.
///
/// ```
/// use sessiond_client::Attributes;
///
/// let a: Attributes = [("cart:apple", "2")].into_iter().collect();
/// assert_eq!(a.get("cart:apple").as_deref(), Some(&b"2"[..]));
/// assert_eq!(&a["cart:apple"], b"2");
/// assert_eq!(a.len(), 1);
/// ```
#[derive(Clone, Default)]
pub struct Attributes(Bytes);

impl Attributes {
    /// None.
    pub fn new() -> Self {
        Attributes::default()
    }

    /// The value of `key`: a slice of the buffer, no copy.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.find(key).map(|value| self.0.slice_ref(value))
    }

    /// The value of `key`, borrowed.
    pub fn get_ref(&self, key: &str) -> Option<&[u8]> {
        self.find(key)
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    /// The attributes, in the order the reply carried them; values are slices of the
    /// buffer.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            buf: &self.0,
            rest: &self.0,
        }
    }

    /// Each attribute's key and value, borrowed.
    pub fn slices(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.raw().map(|(key, value)| (text(key), value))
    }

    /// The keys.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.raw().map(|(key, _)| text(key))
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.raw().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As a map.
    pub fn to_map(&self) -> HashMap<String, Bytes> {
        self.iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// What [`Packer`] packed. A key packed twice keeps its last value (at its first
    /// place), as protobuf's maps and Rust's do.
    pub(crate) fn from_packed(buf: Bytes) -> Attributes {
        let packed = Attributes(buf);
        if !packed.has_repeated_key() {
            return packed;
        }
        let mut last: HashMap<&[u8], &[u8]> = packed.raw().collect();
        let mut packer = Packer::default();
        for (key, _) in packed.raw() {
            if let Some(value) = last.remove(key) {
                packer.push(text(key), value);
            }
        }
        Attributes(packer.0.freeze())
    }

    fn has_repeated_key(&self) -> bool {
        // Up to PAIRWISE_MAX keys: compare cheap signatures pair by pair, and bytes only
        // where two signatures match.
        let mut signatures = [0u64; PAIRWISE_MAX];
        let mut keys = [&[][..]; PAIRWISE_MAX];
        for (n, (key, _)) in self.raw().enumerate() {
            if n == PAIRWISE_MAX {
                let mut seen = std::collections::HashSet::new();
                return self.raw().any(|(key, _)| !seen.insert(key));
            }
            let signature = signature(key);
            if (0..n).any(|i| signatures[i] == signature && keys[i] == key) {
                return true;
            }
            signatures[n] = signature;
            keys[n] = key;
        }
        false
    }

    fn find(&self, key: &str) -> Option<&[u8]> {
        self.raw()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, value)| value)
    }

    fn raw(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        entries(&self.0)
    }
}

/// Each packed attribute's key (its UTF-8 bytes) and value, in one walk of `packed`.
pub(crate) fn entries(packed: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
    let mut rest = packed;
    std::iter::from_fn(move || next(&mut rest))
}

/// The attribute at the start of `rest`, which then starts after it.
fn next<'a>(rest: &mut &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
    let (header, after) = rest.split_first_chunk::<HEADER>()?;
    let (k, v) = header.split_first_chunk::<4>()?;
    let key_len = u32::from_le_bytes(*k) as usize;
    let value_len = u32::from_le_bytes(v.try_into().ok()?) as usize;
    let (key, after) = after.split_at_checked(key_len)?;
    let (value, after) = after.split_at_checked(value_len)?;
    *rest = after;
    Some((key, value))
}

/// The attributes of an [`Attributes`] (see [`Attributes::iter`]).
pub struct Iter<'a> {
    buf: &'a Bytes,
    rest: &'a [u8],
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, Bytes);

    fn next(&mut self) -> Option<Self::Item> {
        let (key, value) = next(&mut self.rest)?;
        Some((text(key), self.buf.slice_ref(value)))
    }
}

/// A key's length and its first and last bytes, mixed: keys that differ mostly differ here.
fn signature(key: &[u8]) -> u64 {
    let word = |bytes: &[u8]| {
        let mut w = [0u8; 8];
        w[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(w)
    };
    let n = key.len().min(8);
    let first = word(&key[..n]);
    let last = word(&key[key.len() - n..]);
    (key.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ first ^ last.rotate_left(29)
}

/// A key as packed: checked UTF-8 when it was packed.
fn text(key: &[u8]) -> &str {
    std::str::from_utf8(key).unwrap_or_default()
}

/// Builds the buffer of an [`Attributes`], one attribute at a time.
#[derive(Clone, Default)]
pub(crate) struct Packer(BytesMut);

impl Packer {
    /// Appends an attribute; keys and values are under 4 GiB (a reply is far smaller).
    pub(crate) fn push(&mut self, key: &str, value: &[u8]) {
        self.0.reserve(HEADER + key.len() + value.len());
        self.0.put_u32_le(key.len() as u32);
        self.0.put_u32_le(value.len() as u32);
        self.0.put_slice(key.as_bytes());
        self.0.put_slice(value);
    }

    /// What has been packed so far (see [`entries`]).
    pub(crate) fn packed(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Room for `additional` more bytes.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.0.reserve(additional);
    }

    /// The attributes packed, in a buffer of about their size: a buffer that reserved far
    /// more than it used is copied rather than kept.
    pub(crate) fn finish(self) -> Attributes {
        let packed = if self.0.capacity() > 2 * self.0.len() + 256 {
            Bytes::copy_from_slice(&self.0)
        } else {
            self.0.freeze()
        };
        Attributes::from_packed(packed)
    }
}

/// A map's entries, whose keys are distinct.
impl From<&HashMap<String, Bytes>> for Packer {
    fn from(map: &HashMap<String, Bytes>) -> Self {
        let mut packer = Packer::default();
        for (k, v) in map {
            packer.push(k, v);
        }
        packer
    }
}

/// A map's entries.
impl From<HashMap<String, Bytes>> for Attributes {
    fn from(map: HashMap<String, Bytes>) -> Self {
        Attributes(Packer::from(&map).0.freeze())
    }
}

/// A key given twice keeps its last value, as in a map.
impl<K: AsRef<str>, V: AsRef<[u8]>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(items: I) -> Self {
        let mut packer = Packer::default();
        for (k, v) in items {
            packer.push(k.as_ref(), v.as_ref());
        }
        packer.finish()
    }
}

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a str, Bytes);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The value of `key`; panics if it is not set, as a map's index does.
impl std::ops::Index<&str> for Attributes {
    type Output = [u8];

    fn index(&self, key: &str) -> &[u8] {
        match self.find(key) {
            Some(value) => value,
            None => panic!("no attribute {key:?}"),
        }
    }
}

/// Equal as maps: the same keys with the same values, in any order.
impl PartialEq for Attributes {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.raw().all(|(k, v)| other.find(text(k)) == Some(v))
    }
}

impl Eq for Attributes {}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&str> = self.keys().collect();
        keys.sort_unstable();
        f.debug_set().entries(keys).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(items: &[(&str, &[u8])]) -> Attributes {
        let mut p = Packer::default();
        for (k, v) in items {
            p.push(k, v);
        }
        p.finish()
    }

    #[test]
    fn reads_like_a_map() {
        let empty = Attributes::new();
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        assert_eq!(empty.get("x"), None);
        let a = packed(&[("cart", b"apple"), ("", b""), ("bin", &[0, 255])]);
        assert_eq!(a.len(), 3);
        assert_eq!(a.get("cart").as_deref(), Some(&b"apple"[..]));
        assert_eq!(&a["bin"], &[0u8, 255][..]);
        assert!(a.contains_key(""));
        assert!(!a.contains_key("car"));
        assert_eq!(a.keys().collect::<Vec<_>>(), ["cart", "", "bin"]);
        let map = a.to_map();
        assert_eq!(map.len(), 3);
        assert_eq!(map[""], Bytes::new());
        assert_eq!(Attributes::from(map), a);
    }

    #[test]
    fn equal_as_maps_whatever_the_order() {
        let a = packed(&[("a", b"1"), ("b", b"2")]);
        assert_eq!(a, packed(&[("b", b"2"), ("a", b"1")]));
        assert_ne!(a, packed(&[("a", b"1"), ("b", b"3")]));
        assert_ne!(a, packed(&[("a", b"1")]));
        assert_ne!(a, packed(&[("a", b"1"), ("c", b"2")]));
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let small = packed(&[("a", b"1"), ("b", b"2"), ("a", b"3")]);
        assert_eq!(small.len(), 2);
        assert_eq!(&small["a"], b"3");
        // Past the pairwise check's size, through the hash set.
        let mut p = Packer::default();
        for i in 0..PAIRWISE_MAX + 5 {
            p.push(&format!("k{i}"), b"old");
        }
        p.push("k3", b"new");
        let big = p.finish();
        assert_eq!(big.len(), PAIRWISE_MAX + 5);
        assert_eq!(&big["k3"], b"new");
        let collected: Attributes = [("x", "1"), ("y", "2"), ("x", "9")].into_iter().collect();
        assert_eq!(collected.len(), 2);
        assert_eq!(&collected["x"], b"9");
    }

    #[test]
    fn debug_shows_keys_not_values() {
        let a = packed(&[("token", b"s3cret"), ("cart", b"1")]);
        let shown = format!("{a:?}");
        assert_eq!(shown, r#"{"cart", "token"}"#);
    }

    #[test]
    fn values_share_the_buffer() {
        let a = packed(&[("k", b"value")]);
        let v = a.get("k").unwrap();
        let start = a.0.as_ptr() as usize;
        let at = v.as_ptr() as usize;
        assert!(at >= start && at < start + a.0.len());
    }
}
