//! The session-ID parser: `SessionKey::parse` on arbitrary client strings.
//!
//! Properties: parsing never panics; the error says what is wrong (empty, wrong length,
//! bad alphabet); an ID that parses has exactly one text form, so encoding it gives the input
//! back and that parses to the same key; and neither `Debug` nor `Display` shows the ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiond::session::{IdError, SessionKey, ID_BYTES, ID_CHARS};

fuzz_target!(|data: &[u8]| {
    // Any bytes as a key, to check the encoder side on every key, not only parsed ones.
    if let Some(raw) = data.get(..ID_BYTES) {
        let key = SessionKey::from_bytes(raw.try_into().unwrap());
        check_key(key);
        assert_eq!(SessionKey::parse(&key.encode()), Ok(key));
    }

    // Clients send strings; non-UTF-8 bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match SessionKey::parse(text) {
        Ok(key) => {
            check_key(key);
            // The decoder rejects non-canonical trailing bits: one key, one text form.
            assert_eq!(key.encode(), text, "a parsed ID must encode back to itself");
        }
        Err(IdError::Empty) => assert!(text.is_empty()),
        Err(IdError::Length(n)) => {
            assert_eq!(n, text.len());
            assert!(n != 0 && n != ID_CHARS);
        }
        Err(IdError::Alphabet) => assert_eq!(text.len(), ID_CHARS),
    }
});

/// What holds for every key: a canonical 43-char URL-safe text form that parses back to it,
/// and a `Debug`/`Display` form that does not leak it.
fn check_key(key: SessionKey) {
    let text = key.encode();
    assert_eq!(text.len(), ID_CHARS);
    assert!(text
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    assert_eq!(SessionKey::parse(&text), Ok(key));
    assert_eq!(SessionKey::from_bytes(*key.as_bytes()), key);
    for shown in [format!("{key:?}"), format!("{key}")] {
        assert!(
            shown.contains("sid#") && !shown.contains(&text),
            "{shown} leaks the ID"
        );
    }
}
