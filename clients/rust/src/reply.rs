//! The `Session` message as the typed client decodes it: the generated [`pb::Session`] with
//! its attributes packed into one buffer ([`Attributes`]) instead of a hash map.
//!
//! prost decodes a `map<string, bytes>` into a `HashMap`: a table, a `String` per key and the
//! hashing of each, for every session read, most of the client's decoding. This message
//! decodes each attribute into a reused scratch entry and appends it to one buffer. The
//! typed client's internal messages (`wire`) use it wherever the API has a `Session`;
//! [`pb`] keeps the generated one for callers of the raw stub.

use std::fmt;

use bytes::{Buf, BufMut};
use prost::encoding::{self, encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::DecodeError;

use crate::attributes::{entries, Attributes, Packer};
use crate::pb;

// Field numbers, as `proto/sessiond/v1/session_store.proto` gives them.
const ID: u32 = 1;
const USER_ID: u32 = 2;
const ATTRIBUTES: u32 = 3;
const VERSION: u32 = 4;
const CREATED_AT: u32 = 5;
const LAST_ACCESS_AT: u32 = 6;
const EXPIRES_AT: u32 = 7;
const ABSOLUTE_EXPIRES_AT: u32 = 8;
const IDLE_TIMEOUT: u32 = 9;
const CLIENT: u32 = 10;
/// A map entry's key and value.
const KEY: u32 = 1;
const VALUE: u32 = 2;
/// The one-byte keys of [`KEY`] and [`VALUE`], length-delimited.
const KEY_TAG: u8 = (KEY << 3) as u8 | WireType::LengthDelimited as u8;
const VALUE_TAG: u8 = (VALUE << 3) as u8 | WireType::LengthDelimited as u8;

/// The most a reply's attributes buffer reserves at once, before it knows their size.
const MAX_RESERVE: usize = 64 * 1024;

/// A `Session` reply: [`pb::Session`]'s fields, its attributes packed.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) attributes: Packing,
    pub(crate) version: u64,
    pub(crate) created_at: Option<prost_types::Timestamp>,
    pub(crate) last_access_at: Option<prost_types::Timestamp>,
    pub(crate) expires_at: Option<prost_types::Timestamp>,
    pub(crate) absolute_expires_at: Option<prost_types::Timestamp>,
    pub(crate) idle_timeout: Option<prost_types::Duration>,
    pub(crate) client: Option<pb::ClientInfo>,
}

/// The generated message's fields, its attributes packed.
impl From<pb::Session> for Session {
    fn from(s: pb::Session) -> Self {
        Session {
            id: s.id,
            user_id: s.user_id,
            attributes: Packing {
                packer: Packer::from(&s.attributes),
                entry: Entry::default(),
            },
            version: s.version,
            created_at: s.created_at,
            last_access_at: s.last_access_at,
            expires_at: s.expires_at,
            absolute_expires_at: s.absolute_expires_at,
            idle_timeout: s.idle_timeout,
            client: s.client,
        }
    }
}

/// The attributes as they are decoded: the buffer so far, and the entry being read.
#[derive(Clone, Default)]
pub(crate) struct Packing {
    packer: Packer,
    entry: Entry,
}

impl Packing {
    pub(crate) fn finish(self) -> Attributes {
        self.packer.finish()
    }
}

/// Compares what was packed.
impl PartialEq for Packing {
    fn eq(&self, other: &Self) -> bool {
        self.packer.packed() == other.packer.packed()
    }
}

/// The keys, never the values.
impl fmt::Debug for Packing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(entries(self.packer.packed()).map(|(k, _)| String::from_utf8_lossy(k)))
            .finish()
    }
}

/// One map entry (`key = 1`, `value = 2`), read into buffers kept from the entry before.
#[derive(Clone, PartialEq, prost::Message)]
struct Entry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

impl Session {
    /// The timestamp fields and their field numbers, in field order.
    fn times(&self) -> [(u32, &Option<prost_types::Timestamp>); 4] {
        [
            (CREATED_AT, &self.created_at),
            (LAST_ACCESS_AT, &self.last_access_at),
            (EXPIRES_AT, &self.expires_at),
            (ABSOLUTE_EXPIRES_AT, &self.absolute_expires_at),
        ]
    }
}

impl prost::Message for Session {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put(ID, self.id.as_bytes(), buf);
        put(USER_ID, self.user_id.as_bytes(), buf);
        for (key, value) in entries(self.attributes.packer.packed()) {
            encode_key(ATTRIBUTES, WireType::LengthDelimited, buf);
            encode_varint(entry_len(key, value) as u64, buf);
            put(KEY, key, buf);
            put(VALUE, value, buf);
        }
        if self.version != 0 {
            encoding::uint64::encode(VERSION, &self.version, buf);
        }
        for (tag, time) in self.times() {
            if let Some(t) = time {
                encoding::message::encode(tag, t, buf);
            }
        }
        if let Some(d) = &self.idle_timeout {
            encoding::message::encode(IDLE_TIMEOUT, d, buf);
        }
        if let Some(c) = &self.client {
            encoding::message::encode(CLIENT, c, buf);
        }
    }

    fn encoded_len(&self) -> usize {
        let attributes: usize = entries(self.attributes.packer.packed())
            .map(|(key, value)| delimited_len(ATTRIBUTES, entry_len(key, value)))
            .sum();
        let version = if self.version != 0 {
            encoding::uint64::encoded_len(VERSION, &self.version)
        } else {
            0
        };
        let times: usize = self
            .times()
            .into_iter()
            .map(|(tag, t)| {
                t.as_ref()
                    .map_or(0, |t| encoding::message::encoded_len(tag, t))
            })
            .sum();
        put_len(ID, self.id.len())
            + put_len(USER_ID, self.user_id.len())
            + attributes
            + version
            + times
            + self
                .idle_timeout
                .as_ref()
                .map_or(0, |d| encoding::message::encoded_len(IDLE_TIMEOUT, d))
            + self
                .client
                .as_ref()
                .map_or(0, |c| encoding::message::encoded_len(CLIENT, c))
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: encoding::DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            ID => encoding::string::merge(wire_type, &mut self.id, buf, ctx),
            USER_ID => encoding::string::merge(wire_type, &mut self.user_id, buf, ctx),
            ATTRIBUTES => {
                let Packing { packer, entry } = &mut self.attributes;
                if packer.is_empty() {
                    // Most of what is left of the message is attributes.
                    packer.reserve(buf.remaining().min(MAX_RESERVE));
                }
                if wire_type == WireType::LengthDelimited {
                    if let Some((key, value, used)) = plain_entry(buf.chunk()) {
                        packer.push(key, value);
                        buf.advance(used);
                        return Ok(());
                    }
                }
                // Anything else (an entry split across chunks, fields repeated, out of
                // order or unknown, or malformed): prost's own decoding, which also names
                // what is wrong.
                prost::Message::clear(entry);
                encoding::message::merge(wire_type, entry, buf, ctx)?;
                packer.push(&entry.key, &entry.value);
                Ok(())
            }
            VERSION => encoding::uint64::merge(wire_type, &mut self.version, buf, ctx),
            CREATED_AT => merge_some(wire_type, &mut self.created_at, buf, ctx),
            LAST_ACCESS_AT => merge_some(wire_type, &mut self.last_access_at, buf, ctx),
            EXPIRES_AT => merge_some(wire_type, &mut self.expires_at, buf, ctx),
            ABSOLUTE_EXPIRES_AT => merge_some(wire_type, &mut self.absolute_expires_at, buf, ctx),
            IDLE_TIMEOUT => merge_some(wire_type, &mut self.idle_timeout, buf, ctx),
            CLIENT => merge_some(wire_type, &mut self.client, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn clear(&mut self) {
        *self = Session::default();
    }
}

/// A map entry as encoders write it, whole in `chunk`: its length, then a key (field 1,
/// UTF-8) and a value (field 2) in that order, either left out when empty. Its key, its
/// value, and how many bytes of `chunk` it takes.
fn plain_entry(chunk: &[u8]) -> Option<(&str, &[u8], usize)> {
    let mut rest = chunk;
    let len = usize::try_from(encoding::decode_varint(&mut rest).ok()?).ok()?;
    let used = chunk.len() - rest.len() + len;
    let mut body = rest.get(..len)?;
    let mut key: &[u8] = &[];
    let mut value: &[u8] = &[];
    if let Some(after) = body.strip_prefix(&[KEY_TAG]) {
        (key, body) = delimited(after)?;
    }
    if let Some(after) = body.strip_prefix(&[VALUE_TAG]) {
        (value, body) = delimited(after)?;
    }
    if !body.is_empty() {
        return None;
    }
    Some((std::str::from_utf8(key).ok()?, value, used))
}

/// A length-prefixed field's bytes, and what follows them.
fn delimited(mut body: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::try_from(encoding::decode_varint(&mut body).ok()?).ok()?;
    body.split_at_checked(len)
}

/// A singular message field, merged into what an earlier occurrence left, as prost does.
fn merge_some<M: prost::Message + Default>(
    wire_type: WireType,
    field: &mut Option<M>,
    buf: &mut impl Buf,
    ctx: encoding::DecodeContext,
) -> Result<(), DecodeError> {
    encoding::message::merge(wire_type, field.get_or_insert_with(M::default), buf, ctx)
}

/// A string or bytes field, left out when empty as proto3 leaves out defaults.
fn put(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

/// What [`put`] writes for `len` bytes.
fn put_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        delimited_len(tag, len)
    }
}

/// A length-delimited field of `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A map entry of two [`put`]s.
fn entry_len(key: &[u8], value: &[u8]) -> usize {
    put_len(KEY, key.len()) + put_len(VALUE, value.len())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::{Buf as _, Bytes};
    use prost::Message as _;

    use super::*;

    fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    fn generated(attributes: HashMap<String, Bytes>, user: &str) -> pb::Session {
        pb::Session {
            id: "AAAAbbbbCCCCddddEEEEffffGGGGhhhhIIIIjjjjKKK".into(),
            user_id: user.into(),
            attributes,
            version: 7,
            created_at: at(1_700_000_000, 123_000_000),
            last_access_at: at(1_700_000_100, 0),
            expires_at: None,
            absolute_expires_at: at(1_700_086_400, 5),
            idle_timeout: Some(prost_types::Duration {
                seconds: 1800,
                nanos: 0,
            }),
            client: Some(pb::ClientInfo {
                ip: "::1".into(),
                user_agent: "Mozilla/5.0 \u{e9}".into(),
            }),
        }
    }

    fn cases() -> Vec<pb::Session> {
        let big = Bytes::from(vec![7u8; 70_000]);
        let many: HashMap<String, Bytes> = (0..100)
            .map(|i| (format!("cart:{i}"), Bytes::from(i.to_string())))
            .collect();
        vec![
            pb::Session::default(),
            generated(HashMap::new(), ""),
            generated(HashMap::from([("cart".into(), "apple".into())]), "ann"),
            generated(
                HashMap::from([
                    ("".into(), "empty key".into()),
                    ("empty value".into(), Bytes::new()),
                    ("big".into(), big),
                    ("k\u{e9}y".into(), Bytes::from_static(&[0, 255])),
                ]),
                "bo",
            ),
            generated(many, "cy"),
        ]
    }

    #[test]
    fn decodes_what_the_generated_message_encodes() {
        for expected in cases() {
            let bytes = expected.encode_to_vec();
            let decoded = Session::decode(&bytes[..]).unwrap();
            assert_eq!(
                decoded.attributes.clone().finish(),
                expected.attributes.clone().into()
            );
            // And back: the same message, field for field.
            let again = decoded.encode_to_vec();
            assert_eq!(again.len(), decoded.encoded_len());
            assert_eq!(pb::Session::decode(&again[..]).unwrap(), expected);
        }
    }

    #[test]
    fn decodes_inside_the_messages_that_carry_sessions() {
        let s = generated(HashMap::from([("cart".into(), "pear".into())]), "bo");
        let bytes = pb::ListUserSessionsResponse {
            sessions: vec![s.clone(), s.clone()],
        }
        .encode_to_vec();
        let back = crate::wire::ListUserSessionsResponse::decode(&bytes[..]).unwrap();
        assert_eq!(back.sessions.len(), 2);
        for got in back.sessions {
            assert_eq!(crate::Session::from(got), crate::Session::from(s.clone()));
        }
    }

    #[test]
    fn an_attribute_sent_twice_keeps_its_last_value() {
        // Two entries for one key, as a map's wire format allows.
        let mut bytes = Vec::new();
        for value in ["1", "2"] {
            let entry = Entry {
                key: "cart".into(),
                value: value.into(),
            };
            encoding::message::encode(ATTRIBUTES, &entry, &mut bytes);
        }
        let s = crate::Session::from(Session::decode(&bytes[..]).unwrap());
        assert_eq!(s.attributes.len(), 1);
        assert_eq!(&s.attributes["cart"], b"2");
    }

    /// A Session of one attribute entry, its body as given.
    fn one_entry(body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode_key(ATTRIBUTES, WireType::LengthDelimited, &mut bytes);
        encode_varint(body.len() as u64, &mut bytes);
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn unusual_entries_decode_as_the_generated_message_decodes_them() {
        let mut reversed = Vec::new();
        put(VALUE, b"v", &mut reversed);
        put(KEY, b"k", &mut reversed);
        let mut unknown = Vec::new();
        put(KEY, b"k", &mut unknown);
        encoding::uint64::encode(9, &5, &mut unknown);
        put(VALUE, b"v", &mut unknown);
        let mut repeated = Vec::new();
        put(KEY, b"old", &mut repeated);
        put(VALUE, b"v", &mut repeated);
        put(KEY, b"k", &mut repeated);
        for body in [reversed, unknown, repeated, Vec::new()] {
            let bytes = one_entry(&body);
            let expected = pb::Session::decode(&bytes[..]).unwrap();
            let got = Session::decode(&bytes[..]).unwrap();
            assert_eq!(
                got.attributes.finish(),
                expected.attributes.into(),
                "{body:?}"
            );
        }
    }

    #[test]
    fn an_entry_split_across_chunks_decodes_whole() {
        let expected = generated(HashMap::from([("cart".into(), "apple".into())]), "ann");
        let bytes = expected.encode_to_vec();
        let at = bytes.windows(4).position(|w| w == b"cart").unwrap() + 2;
        let split = (&bytes[..at]).chain(&bytes[at..]);
        let got = Session::decode(split).unwrap();
        assert_eq!(got.attributes.finish(), expected.attributes.into());
    }

    #[test]
    fn a_key_that_is_not_utf8_is_a_decode_error() {
        let mut entry = Vec::new();
        put(KEY, &[0xff, 0xfe], &mut entry);
        let bytes = one_entry(&entry);
        assert!(Session::decode(&bytes[..]).is_err());
        // As the generated message refuses it.
        assert!(pb::Session::decode(&bytes[..]).is_err());
    }
}
