//! RFC 3339 (de)serialization of `DateTime<Utc>` for `#[serde(with = ...)]`,
//! since `chrono` is built without its `serde` feature. Millisecond
//! precision, `Z` suffix: the form written into replica objects
//! (`metadata.json`, the lease), so a record reads back equal.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let s = String::deserialize(d)?;
    DateTime::parse_from_rfc3339(&s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(serde::de::Error::custom)
}
