//! replica
pub mod cold;
pub mod hot;
pub mod layout;
pub mod lease;
pub mod retention;
pub mod storage;
