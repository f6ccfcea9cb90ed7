//! In-process cluster tests.
