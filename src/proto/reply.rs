//! The `Session` message as the server sends it: encoded straight from the store's
//! [`Session`](session::Session), with no message built in between.
//!
//! prost's generated `Session` holds its attributes in a `HashMap<String, Bytes>`, so every
//! reply that carried a session used to allocate a hash table and a `String` per attribute
//! key (and the ID and the user as `String`s) only for the encoder to walk them once and
//! drop them: most of the allocations of a `Get`. This type encodes the same fields, in the
//! same wire format, from the session the store hands out, whose attributes are one shared,
//! packed buffer ([`Attributes`](crate::session::Attributes)).
//!
//! The server's generated messages (`proto::serve`) use it wherever the API has a
//! `Session`; clients, and this crate's tests, decode replies into the generated
//! [`pb::Session`](super::pb::Session) as before.

use bytes::{Buf, BufMut};
use prost::encoding::{self, WireType};
use prost::DecodeError;

use super::fields::{delimited_len, pair_len, put, put_len, put_pair, put_u64};
use crate::session::{self, ClientInfo, Millis, ID_CHARS};

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

/// A `Session` reply. Encodes like [`pb::Session`](super::pb::Session) built from the same
/// session.
///
/// It is only ever encoded: the server receives no `Session`. Decoding one skips every
/// field and leaves it empty, and an empty one encodes as an empty message; prost needs
/// both (and `Default`) of any message type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Session {
    session: Option<session::Session>,
    /// The encoded length of the attributes, worked out once: prost asks a nested message
    /// for its length at every level before it encodes it (twice, in a Pipeline response).
    attributes_len: usize,
}

impl From<session::Session> for Session {
    fn from(s: session::Session) -> Self {
        let attributes_len = s
            .attributes
            .raw()
            .map(|(key, value)| delimited_len(ATTRIBUTES, pair_len(key, value)))
            .sum();
        Session {
            session: Some(s),
            attributes_len,
        }
    }
}

/// Wall-clock milliseconds as a protobuf timestamp.
pub fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Milliseconds as a protobuf duration.
pub fn duration(ms: Millis) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

impl prost::Message for Session {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        let Some(s) = &self.session else { return };
        let mut id = [0; ID_CHARS];
        put(ID, s.key.encode_into(&mut id).as_bytes(), buf);
        put(USER_ID, user(s).as_bytes(), buf);
        for (key, value) in s.attributes.raw() {
            put_pair(ATTRIBUTES, key, value, buf);
        }
        put_u64(VERSION, s.version, buf);
        encoding::message::encode(CREATED_AT, &timestamp(s.created_at), buf);
        encoding::message::encode(LAST_ACCESS_AT, &timestamp(s.last_access_at), buf);
        encoding::message::encode(EXPIRES_AT, &timestamp(s.expires_at()), buf);
        encoding::message::encode(ABSOLUTE_EXPIRES_AT, &timestamp(s.absolute_expires_at), buf);
        encoding::message::encode(IDLE_TIMEOUT, &duration(s.idle_timeout), buf);
        let ClientInfo { ip, user_agent } = &s.client;
        put_pair(CLIENT, ip.as_bytes(), user_agent.as_bytes(), buf);
    }

    fn encoded_len(&self) -> usize {
        let Some(s) = &self.session else { return 0 };
        let version = if s.version != 0 {
            encoding::uint64::encoded_len(VERSION, &s.version)
        } else {
            0
        };
        let client = pair_len(s.client.ip.as_bytes(), s.client.user_agent.as_bytes());
        put_len(ID, ID_CHARS)
            + put_len(USER_ID, user(s).len())
            + self.attributes_len
            + version
            + encoding::message::encoded_len(CREATED_AT, &timestamp(s.created_at))
            + encoding::message::encoded_len(LAST_ACCESS_AT, &timestamp(s.last_access_at))
            + encoding::message::encoded_len(EXPIRES_AT, &timestamp(s.expires_at()))
            + encoding::message::encoded_len(ABSOLUTE_EXPIRES_AT, &timestamp(s.absolute_expires_at))
            + encoding::message::encoded_len(IDLE_TIMEOUT, &duration(s.idle_timeout))
            + delimited_len(CLIENT, client)
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: encoding::DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn clear(&mut self) {
        *self = Session::default();
    }
}

fn user(s: &session::Session) -> &str {
    s.user.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use prost::Message as _;

    use super::*;
    use crate::proto::pb;
    use crate::session::{Attributes, SessionKey};

    fn session(attributes: Attributes, user: Option<&str>, client: ClientInfo) -> session::Session {
        session::Session {
            key: SessionKey::generate(),
            user: user.map(Arc::from),
            attributes,
            version: 3,
            created_at: 1_700_000_000_123,
            last_access_at: 1_700_000_100_456,
            idle_timeout: 1_800_000,
            absolute_expires_at: 1_700_086_400_789,
            client,
        }
    }

    /// What the generated message built field by field from `s` holds.
    fn expected(s: &session::Session) -> pb::Session {
        pb::Session {
            id: s.key.encode(),
            user_id: user(s).to_owned(),
            attributes: s.attributes.to_map(),
            version: s.version,
            created_at: Some(timestamp(s.created_at)),
            last_access_at: Some(timestamp(s.last_access_at)),
            expires_at: Some(timestamp(s.expires_at())),
            absolute_expires_at: Some(timestamp(s.absolute_expires_at)),
            idle_timeout: Some(duration(s.idle_timeout)),
            client: Some(pb::ClientInfo {
                ip: s.client.ip.clone(),
                user_agent: s.client.user_agent.clone(),
            }),
        }
    }

    #[test]
    fn decodes_as_the_generated_message_built_from_the_same_session() {
        let big = Bytes::from(vec![7u8; 70_000]);
        let attributes = [
            Attributes::new(),
            Attributes::pack([("cart", &b"apple"[..])]),
            Attributes::pack([("", &b"empty key"[..]), ("empty value", &b""[..])]),
            Attributes::pack([("big", &big[..]), ("k\u{e9}y", &[0u8, 255][..])]),
        ];
        let clients = [
            ClientInfo::default(),
            ClientInfo {
                ip: "10.0.0.7".into(),
                user_agent: "".into(),
            },
            ClientInfo {
                ip: "::1".into(),
                user_agent: "Mozilla/5.0 (X11) \u{e9}".into(),
            },
        ];
        for attributes in attributes {
            for client in &clients {
                for user in [None, Some("ann")] {
                    let s = session(attributes.clone(), user, client.clone());
                    let reply = Session::from(s.clone());
                    let bytes = reply.encode_to_vec();
                    assert_eq!(bytes.len(), reply.encoded_len(), "{s:?}");
                    assert_eq!(
                        pb::Session::decode(&bytes[..]).unwrap(),
                        expected(&s),
                        "{s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn holds_its_own_inside_the_messages_that_carry_sessions() {
        let s = session(
            Attributes::pack([("cart", &b"pear"[..])]),
            Some("bo"),
            ClientInfo::default(),
        );
        let reply = crate::proto::serve::ListUserSessionsResponse {
            sessions: vec![s.clone().into(), s.clone().into()],
        };
        let back = pb::ListUserSessionsResponse::decode(&reply.encode_to_vec()[..]).unwrap();
        assert_eq!(back.sessions, vec![expected(&s), expected(&s)]);
    }

    #[test]
    fn an_empty_one_is_an_empty_message_and_decoding_skips_every_field() {
        assert!(Session::default().encode_to_vec().is_empty());
        let s = session(
            Attributes::pack([("a", &b"1"[..])]),
            None,
            ClientInfo::default(),
        );
        let bytes = Session::from(s).encode_to_vec();
        assert_eq!(Session::decode(&bytes[..]).unwrap(), Session::default());
    }
}
