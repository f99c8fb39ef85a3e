//! The cloud hub.
pub mod pki;
pub mod router;
pub mod session;
pub mod tokens;
