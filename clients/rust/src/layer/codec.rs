//! How typed session values become the bytes sessiond stores: the [`Codec`] trait and its
//! default, [`Json`].
//!
//! Each value is one attribute, encoded on its own, so two requests writing different keys
//! never overwrite each other (sessiond's `Update` is partial).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An encoding or decoding failure, as the codec reports it.
pub type CodecError = Box<dyn std::error::Error + Send + Sync>;

/// Turns session values into attribute bytes and back, for [`Session::get`] and
/// [`Session::insert`]. Pick one with [`Builder::codec`]; the handler's extractor is then
/// `Session<YourCodec>`.
///
/// Every app server sharing the sessions must use the same codec for a key.
///
/// ```
/// use bytes::Bytes;
/// use serde::{de::DeserializeOwned, Serialize};
/// use sessiond_client::layer::{Codec, CodecError};
///
/// /// JSON with the keys sorted... or any format serde speaks.
/// #[derive(Clone, Default)]
/// struct MyJson;
///
/// impl Codec for MyJson {
///     fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
///         Ok(serde_json::to_vec(value)?.into())
///     }
///     fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
///         Ok(serde_json::from_slice(bytes)?)
///     }
/// }
/// assert_eq!(MyJson.encode(&[1, 2]).unwrap(), Bytes::from("[1,2]"));
/// ```
///
/// [`Session::get`]: super::Session::get
/// [`Session::insert`]: super::Session::insert
/// [`Builder::codec`]: super::Builder::codec
pub trait Codec: Clone + Send + Sync + 'static {
    /// The bytes to store for `value`.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError>;

    /// The value stored as `bytes`.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// The default codec: JSON (serde_json), readable by a client in any language.
///
/// ```
/// use sessiond_client::layer::{Codec, Json};
///
/// let bytes = Json.encode(&vec!["apple", "pear"]).unwrap();
/// assert_eq!(&bytes[..], br#"["apple","pear"]"#);
/// let back: Vec<String> = Json.decode(&bytes).unwrap();
/// assert_eq!(back, ["apple", "pear"]);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        Ok(serde_json::to_vec(value)?.into())
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}
