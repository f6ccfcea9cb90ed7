//! A session's attributes, packed into one buffer.
//!
//! A map of small strings and byte buffers costs a hash table and two heap allocations per
//! attribute; packed, a session's attributes are one allocation of about their own size,
//! which is what brings memory per session to Redis's level. The store keeps them this way,
//! and a read hands the same buffer out (a reference count, no copy), which a reply then
//! encodes straight onto the wire (see `proto::reply`): a `Get` builds no map at all.
//!
//! Layout, repeated per attribute: key length (u16 LE), value length (u32 LE), key, value.
//! Each key appears once.

use std::collections::HashMap;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of length prefix per attribute.
const HEADER: usize = 6;

/// The longest key the layout can hold; `max_key_bytes` may not exceed it.
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;

/// A session's attributes: keys (UTF-8, at most [`MAX_KEY_BYTES`]) to byte values, each key
/// once. Immutable; a change builds a new one. Cloning shares the buffer.
///
/// Its `Debug` shows the keys, never the values: they may be secrets.
#[derive(Clone, Default)]
pub struct Attributes(Bytes);

impl Attributes {
    /// None.
    pub fn new() -> Self {
        Attributes::default()
    }

    /// Packs `items`, whose keys are distinct, at most [`MAX_KEY_BYTES`] long and whose
    /// values are under 4 GiB, which the store's limits guarantee.
    pub(crate) fn pack<'a>(
        items: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone,
    ) -> Attributes {
        let size = items
            .clone()
            .into_iter()
            .map(|(k, v)| HEADER + k.len() + v.len())
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        for (k, v) in items {
            debug_assert!(k.len() <= MAX_KEY_BYTES, "key of {} bytes", k.len());
            buf.put_u16_le(k.len() as u16);
            buf.put_u32_le(v.len() as u32);
            buf.put_slice(k.as_bytes());
            buf.put_slice(v);
        }
        Attributes(buf.freeze())
    }

    /// The attributes, in the order they were packed; values are slices of the buffer.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Bytes)> + '_ {
        self.raw()
            .map(|(key, value)| (text(key), self.0.slice_ref(value)))
    }

    /// The keys.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.raw().map(|(key, _)| text(key))
    }

    /// Each attribute's key and value as borrowed slices, without touching the buffer's
    /// reference count.
    pub(crate) fn slices(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        self.raw().map(|(key, value)| (text(key), value))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.find(key).map(|value| self.0.slice_ref(value))
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.raw().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each attribute's key and value as slices of the buffer (no copy).
    pub(crate) fn shared(&self) -> impl Iterator<Item = (Bytes, Bytes)> + '_ {
        self.raw()
            .map(|(key, value)| (self.0.slice_ref(key), self.0.slice_ref(value)))
    }

    /// As a map.
    pub fn to_map(&self) -> HashMap<String, Bytes> {
        self.iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn find(&self, key: &str) -> Option<&[u8]> {
        self.raw()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, value)| value)
    }

    /// Each attribute's key (its UTF-8 bytes) and value, in one walk of the buffer: for
    /// encoding, and under every other reader.
    pub(crate) fn raw(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            let ([k0, k1, v0, v1, v2, v3], after) = rest.split_first_chunk::<HEADER>()?;
            let key_len = usize::from(u16::from_le_bytes([*k0, *k1]));
            let value_len = u32::from_le_bytes([*v0, *v1, *v2, *v3]) as usize;
            let (key, after) = after.split_at_checked(key_len)?;
            let (value, after) = after.split_at_checked(value_len)?;
            rest = after;
            Some((key, value))
        })
    }
}

/// A key as packed: from a `&str`, so always UTF-8.
fn text(key: &[u8]) -> &str {
    std::str::from_utf8(key).unwrap_or_default()
}

/// A map's entries, whose keys are distinct by construction.
impl From<HashMap<String, Bytes>> for Attributes {
    fn from(map: HashMap<String, Bytes>) -> Self {
        Attributes::pack(map.iter().map(|(k, v)| (k.as_str(), v.as_ref())))
    }
}

/// A key given twice keeps its last value, as in a map.
impl FromIterator<(String, Bytes)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (String, Bytes)>>(items: I) -> Self {
        items.into_iter().collect::<HashMap<_, _>>().into()
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
        self.len() == other.len()
            && self
                .slices()
                .all(|(k, v)| other.get(k).as_deref() == Some(v))
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

    #[test]
    fn packs_and_reads_back() {
        let empty = Attributes::new();
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        let items = [
            ("cart", &b"apple"[..]),
            ("", &b""[..]),
            ("bin", &[0u8, 255][..]),
        ];
        let a = Attributes::pack(items.iter().copied());
        assert_eq!(a.len(), 3);
        assert_eq!(a.get("cart").as_deref(), Some(&b"apple"[..]));
        assert_eq!(&a["bin"], &[0u8, 255][..]);
        assert!(a.contains_key(""));
        assert_eq!(a.get("none"), None);
        assert_eq!(a.keys().collect::<Vec<_>>(), ["cart", "", "bin"]);
        let map = a.to_map();
        assert_eq!(map.len(), 3);
        assert_eq!(map[""], Bytes::new());
        assert_eq!(Attributes::from(map), a);
    }

    #[test]
    fn equal_as_maps_whatever_the_order() {
        let ab = Attributes::pack([("a", &b"1"[..]), ("b", &b"2"[..])]);
        let ba = Attributes::pack([("b", &b"2"[..]), ("a", &b"1"[..])]);
        assert_eq!(ab, ba);
        assert_ne!(ab, Attributes::pack([("a", &b"1"[..])]));
        assert_ne!(ab, Attributes::pack([("a", &b"1"[..]), ("b", &b"3"[..])]));
    }

    #[test]
    fn a_key_given_twice_keeps_its_last_value() {
        let a: Attributes = [
            ("k".to_string(), Bytes::from("1")),
            ("k".into(), "2".into()),
        ]
        .into_iter()
        .collect();
        assert_eq!(a.len(), 1);
        assert_eq!(&a["k"], b"2");
    }

    #[test]
    fn debug_shows_keys_not_values() {
        let a = Attributes::pack([("token", &b"secret"[..]), ("cart", &b"x"[..])]);
        assert_eq!(format!("{a:?}"), r#"{"cart", "token"}"#);
    }
}
