//! A session's attributes packed into one buffer.
//!
//! A map of small strings and byte buffers costs a hash table and two heap allocations per
//! attribute; packed, a session's attributes are one allocation of about their own size,
//! which is what brings memory per session to Redis's level. Reads hand out values as
//! slices of the buffer (no copy); an update writes a new buffer, which for a session-sized
//! payload costs less than the hash-table bookkeeping it replaces.
//!
//! Layout, repeated per attribute: key length (u16 LE), value length (u32 LE), key, value.

use bytes::{BufMut, Bytes, BytesMut};

use crate::session::{Attributes, ClientInfo};

/// Bytes of length prefix per attribute.
const HEADER: usize = 6;

/// The longest key the layout can hold; `max_key_bytes` may not exceed it.
pub(crate) const MAX_KEY_BYTES: usize = u16::MAX as usize;

/// Packed attributes. Cloning shares the buffer.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Packed(Bytes);

impl Packed {
    /// Packs `items`. Keys must be at most [`MAX_KEY_BYTES`] long and values under 4 GiB,
    /// which the Store's limits guarantee.
    pub(crate) fn pack<'a>(items: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone) -> Packed {
        let size = items
            .clone()
            .into_iter()
            .map(|(k, v)| HEADER + k.len() + v.len())
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        for (k, v) in items {
            buf.put_u16_le(k.len() as u16);
            buf.put_u32_le(v.len() as u32);
            buf.put_slice(k.as_bytes());
            buf.put_slice(v);
        }
        Packed(buf.freeze())
    }

    /// The attributes, values as slices of the buffer.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, Bytes)> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let b = &self.0;
            if at + HEADER > b.len() {
                return None;
            }
            let k = usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
            let v = u32::from_le_bytes([b[at + 2], b[at + 3], b[at + 4], b[at + 5]]) as usize;
            let key_at = at + HEADER;
            let value_at = key_at + k;
            at = value_at + v;
            // Written from `&str` keys only, so always UTF-8.
            let key = std::str::from_utf8(&b[key_at..value_at]).unwrap_or_default();
            Some((key, b.slice(value_at..value_at + v)))
        })
    }

    /// The value of `key`.
    #[cfg(test)]
    fn get(&self, key: &str) -> Option<Bytes> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether there are none.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many attributes.
    pub(crate) fn len(&self) -> usize {
        self.iter().count()
    }

    /// As a map.
    pub(crate) fn unpack(&self) -> Attributes {
        self.iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

/// A session's client info in one buffer: the IP's length (u32 LE), the IP, the User-Agent.
/// Two `String`s would take 48 bytes in every entry and two allocations; this takes 16 and
/// one, and none when both are empty.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct PackedClient(Option<Box<[u8]>>);

impl PackedClient {
    /// Packs `c`. Its lengths are bounded by `max_client_info_bytes`, far under 4 GiB.
    pub(crate) fn pack(c: &ClientInfo) -> PackedClient {
        if c.ip.is_empty() && c.user_agent.is_empty() {
            return PackedClient(None);
        }
        let mut buf = Vec::with_capacity(4 + c.ip.len() + c.user_agent.len());
        buf.put_u32_le(c.ip.len() as u32);
        buf.put_slice(c.ip.as_bytes());
        buf.put_slice(c.user_agent.as_bytes());
        PackedClient(Some(buf.into_boxed_slice()))
    }

    /// The client info back.
    pub(crate) fn unpack(&self) -> ClientInfo {
        let Some(b) = &self.0 else {
            return ClientInfo::default();
        };
        let ip_end = 4 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        // Written from `String`s only, so always UTF-8.
        let text = |bytes: &[u8]| std::str::from_utf8(bytes).unwrap_or_default().to_owned();
        ClientInfo {
            ip: text(&b[4..ip_end]),
            user_agent: text(&b[ip_end..]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_unpacks() {
        let empty = Packed::pack(std::iter::empty());
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        let items = [
            ("cart", &b"apple"[..]),
            ("", &b""[..]),
            ("bin", &[0u8, 255][..]),
        ];
        let p = Packed::pack(items.iter().copied());
        assert_eq!(p.len(), 3);
        assert_eq!(p.get("cart").as_deref(), Some(&b"apple"[..]));
        assert_eq!(p.get("bin").as_deref(), Some(&[0u8, 255][..]));
        assert_eq!(p.get("none"), None);
        let map = p.unpack();
        assert_eq!(map.len(), 3);
        assert_eq!(map[""], Bytes::new());
    }

    #[test]
    fn client_info_round_trips() {
        for (ip, user_agent) in [
            ("", ""),
            ("10.0.0.7", ""),
            ("", "curl/8"),
            ("::1", "Mozilla/5.0 (X11) é"),
        ] {
            let c = ClientInfo {
                ip: ip.into(),
                user_agent: user_agent.into(),
            };
            assert_eq!(PackedClient::pack(&c).unpack(), c);
        }
        assert!(PackedClient::pack(&ClientInfo::default()).0.is_none());
    }
}
