//! Source: which databases exist and how each one is keyed.
pub mod config;
pub mod discover;
pub mod keys;
pub mod template;
pub mod tier;
pub mod track;
