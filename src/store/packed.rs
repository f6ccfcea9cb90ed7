//! A session's client info packed into one buffer. (Its attributes are packed as well: see
//! [`Attributes`](crate::session::Attributes).)

use bytes::BufMut;

use crate::session::ClientInfo;

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
