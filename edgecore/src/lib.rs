//! The edge agent.
pub mod machine;
pub mod store;
