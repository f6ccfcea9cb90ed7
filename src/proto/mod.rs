//! The public API as `proto/sessiond/v1/session_store.proto` defines it: the generated types
//! and service stubs, and the service's name as they spell it.
//!
//! It sits below every layer that speaks the API, so the transport and the metrics layer can
//! recognise the service's calls without importing the handlers in [`api`](crate::api).

use tonic::server::NamedService;

pub(crate) mod fields;
pub mod reply;

/// The generated protobuf types and client stub, as clients see them.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("sessiond.v1");
}

/// The server's side of the API: the service trait, and the messages that carry a
/// [`Session`], whose `Session` is [`reply::Session`] (encoded straight from the store's
/// session). Every other message is [`pb`]'s.
#[allow(missing_docs, clippy::all)]
pub mod serve {
    include!(concat!(env!("OUT_DIR"), "/serve/sessiond.v1.rs"));

    pub use super::reply::Session;
}

/// The service's name as the generated server registers it: the first segment of each of
/// its paths (`/sessiond.v1.SessionStore/Get`) and the name health checks and reflection
/// know it by. The name does not depend on the implementation, hence `()`.
pub const SERVICE_NAME: &str =
    <serve::session_store_server::SessionStoreServer<()> as NamedService>::NAME;

/// The method a request path calls, if the path is one of this service's
/// (`/{SERVICE_NAME}/{method}`). Compared in place, with no allocation: it runs for every
/// request.
pub(crate) fn method(path: &str) -> Option<&str> {
    path.strip_prefix('/')?
        .strip_prefix(SERVICE_NAME)?
        .strip_prefix('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_the_proto_package_and_service() {
        assert_eq!(SERVICE_NAME, "sessiond.v1.SessionStore");
    }

    #[test]
    fn only_this_services_paths_have_a_method() {
        assert_eq!(method("/sessiond.v1.SessionStore/Get"), Some("Get"));
        assert_eq!(method("/sessiond.v1.SessionStore/"), Some(""));
        for other in [
            "",
            "/",
            "sessiond.v1.SessionStore/Get",
            "/sessiond.v1.SessionStore",
            "/sessiond.v1.SessionStoreX/Get",
            "/grpc.health.v1.Health/Check",
        ] {
            assert_eq!(method(other), None, "{other:?}");
        }
    }
}
