#![allow(dead_code)]
//! Shared test support: an in-process S3 server and a tree of databases.

pub mod fleet;
pub mod s3;
