//! Protobuf fields written by hand, for the messages encoded straight from the store's
//! sessions instead of through a generated message: a reply's `Session` ([`super::reply`])
//! and a snapshot's `StoredSession` (`persist::records`). proto3's rule throughout: a field
//! at its default (empty, zero) is left out.

use bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, uint64, WireType};

/// The fields of a two-field message of bytes: a map entry's key and value, or
/// `ClientInfo`'s `ip` and `user_agent`.
const FIRST: u32 = 1;
const SECOND: u32 = 2;

/// A string or bytes field.
pub(crate) fn put(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }
}

/// A `uint64` field.
pub(crate) fn put_u64(tag: u32, n: u64, buf: &mut impl BufMut) {
    if n != 0 {
        uint64::encode(tag, &n, buf);
    }
}

/// A two-field message of bytes (see [`FIRST`]) as field `tag`, written even when both are
/// empty, as prost writes a map entry or a set message field.
pub(crate) fn put_pair(tag: u32, first: &[u8], second: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(pair_len(first, second) as u64, buf);
    put(FIRST, first, buf);
    put(SECOND, second, buf);
}

/// What [`put`] writes for `len` bytes.
pub(crate) fn put_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        delimited_len(tag, len)
    }
}

/// A length-delimited field of `len` bytes, whatever `len`.
pub(crate) fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// The body of what [`put_pair`] writes.
pub(crate) fn pair_len(first: &[u8], second: &[u8]) -> usize {
    put_len(FIRST, first.len()) + put_len(SECOND, second.len())
}
