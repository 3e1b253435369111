//! The subset of etcd's v3 JSON API (the gRPC gateway's JSON) that the configuration
//! watcher uses: `POST /v3/kv/range` and `POST /v3/watch`. Real etcd speaks it, and the
//! control plane serves it over mutual TLS, confined to the gateway's environment.
//!
//! Keys and values travel base64-encoded; 64-bit integers are written as strings (as
//! etcd's gateway writes them) and read as strings or numbers.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// `POST /v3/kv/range`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RangeRequest {
    /// Base64.
    pub key: String,
    /// Base64; empty for a single key.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub range_end: String,
    /// Read at this revision; 0: the newest.
    #[serde(with = "int", skip_serializing_if = "is_zero")]
    pub revision: i64,
    /// At most this many keys; 0: all.
    #[serde(with = "int", skip_serializing_if = "is_zero")]
    pub limit: i64,
    /// Answer with the `count` of keys only, no keys (the count ignores
    /// `min_mod_revision`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub count_only: bool,
    /// Answer with keys only, no values.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keys_only: bool,
    /// Only keys last modified at this revision or later; 0: any.
    #[serde(with = "int", skip_serializing_if = "is_zero")]
    pub min_mod_revision: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RangeResponse {
    pub header: Header,
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one (the request had a `limit`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    #[serde(with = "int", skip_serializing_if = "is_zero")]
    pub count: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Header {
    /// Unsigned 64-bit ids, kept as the text they arrive as (real etcd's exceed `i64`).
    #[serde(
        deserialize_with = "unsigned",
        skip_serializing_if = "String::is_empty"
    )]
    pub cluster_id: String,
    #[serde(
        deserialize_with = "unsigned",
        skip_serializing_if = "String::is_empty"
    )]
    pub member_id: String,
    /// The store's revision when the answer was made.
    #[serde(with = "int")]
    pub revision: i64,
    #[serde(
        deserialize_with = "unsigned",
        skip_serializing_if = "String::is_empty"
    )]
    pub raft_term: String,
}

impl Header {
    pub fn at(revision: i64) -> Self {
        Self {
            cluster_id: "1".to_owned(),
            member_id: "1".to_owned(),
            revision,
            raft_term: "1".to_owned(),
        }
    }
}

/// One key as stored. A deleted key's event carries only `key` and `mod_revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyValue {
    /// Base64.
    pub key: String,
    /// Base64.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
    #[serde(with = "int", skip_serializing_if = "is_zero")]
    pub create_revision: i64,
    #[serde(with = "int")]
    pub mod_revision: i64,
    #[serde(with = "int", skip_serializing_if = "is_zero")]
    pub version: i64,
}

/// `POST /v3/watch`: the body opens one watch; the answer is a stream of
/// newline-separated [`WatchResponse`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub create_request: WatchCreate,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchCreate {
    /// Base64.
    pub key: String,
    /// Base64.
    pub range_end: String,
    #[serde(with = "int")]
    pub start_revision: i64,
    /// Ask for progress responses (no events) on a quiet watch.
    pub progress_notify: bool,
}

/// One message of a watch stream: a result, or an error of the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<WatchResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<GatewayError>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchResult {
    pub header: Header,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub canceled: bool,
    /// Set when the start revision was compacted: the watch must start again from a
    /// fresh listing.
    #[serde(with = "int", skip_serializing_if = "is_zero")]
    pub compact_revision: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cancel_reason: String,
    /// Empty in a progress response.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `DELETE`, or absent for a put.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub kv: KeyValue,
}

impl Event {
    pub const DELETE: &'static str = "DELETE";

    pub fn put(kv: KeyValue) -> Self {
        Self { kind: None, kv }
    }

    pub fn delete(key: &[u8], revision: i64) -> Self {
        Self {
            kind: Some(Self::DELETE.to_owned()),
            kv: KeyValue {
                key: encode(key),
                mod_revision: revision,
                ..KeyValue::default()
            },
        }
    }
}

/// The gateway's error shape (`{"error", "message", "code"}`; etcd also sends
/// `http_code` on watch streams).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayError {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub message: String,
    /// The gRPC status code.
    pub code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_code: Option<u16>,
}

impl GatewayError {
    pub fn new(grpc_code: u16, message: &str) -> Self {
        Self {
            error: message.to_owned(),
            message: message.to_owned(),
            code: grpc_code,
            http_code: None,
        }
    }
}

pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    B64.encode(bytes)
}

/// Decodes a base64 field; the error names it.
pub fn decode(field: &str, b64: &str) -> Result<Vec<u8>, String> {
    B64.decode(b64)
        .map_err(|e| format!("{field} is not base64: {e}"))
}

/// The end of the key range that holds exactly the keys starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An unsigned integer written as a string or a number, kept as text.
fn unsigned<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Unsigned {
        N(u64),
        S(String),
    }
    Ok(match Option::<Unsigned>::deserialize(d)? {
        None => String::new(),
        Some(Unsigned::N(n)) => n.to_string(),
        Some(Unsigned::S(s)) => s,
    })
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// 64-bit integers as etcd's gateway writes them (strings), read from strings,
/// numbers or `null`.
mod int {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Int {
            N(i64),
            S(String),
        }
        match Option::<Int>::deserialize(d)? {
            None => Ok(0),
            Some(Int::N(n)) => Ok(n),
            Some(Int::S(s)) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn integers_are_strings_on_the_wire_and_either_when_read() {
        let kv = KeyValue {
            key: encode("/k"),
            value: encode("v"),
            create_revision: 2,
            mod_revision: 3,
            version: 1,
        };
        let json = serde_json::to_string(&kv).unwrap();
        assert_eq!(
            json,
            r#"{"key":"L2s=","value":"dg==","create_revision":"2","mod_revision":"3","version":"1"}"#
        );
        let read: KeyValue = serde_json::from_str(
            r#"{"key":"L2s=","value":"dg==","create_revision":2,"mod_revision":"3","version":null}"#,
        )
        .unwrap();
        assert_eq!(
            (read.create_revision, read.mod_revision, read.version),
            (2, 3, 0)
        );
        assert!(serde_json::from_str::<KeyValue>(r#"{"mod_revision":"x"}"#).is_err());
    }

    #[test]
    fn watch_messages_round_trip() {
        let message = WatchResponse {
            result: Some(WatchResult {
                header: Header::at(9),
                events: vec![Event::delete(b"/aisix/e/models/m", 9)],
                ..WatchResult::default()
            }),
            error: None,
        };
        let json = serde_json::to_string(&message).unwrap();
        assert_eq!(
            json,
            r#"{"result":{"header":{"cluster_id":"1","member_id":"1","revision":"9","raft_term":"1"},"events":[{"type":"DELETE","kv":{"key":"L2Fpc2l4L2UvbW9kZWxzL20=","mod_revision":"9"}}]}}"#
        );
        assert_eq!(
            serde_json::from_str::<WatchResponse>(&json).unwrap(),
            message
        );
    }

    #[test]
    fn real_etcd_headers_read() {
        let header: Header = serde_json::from_str(
            r#"{"cluster_id":"14841639068965178418","member_id":10276657743932975437,"revision":"12","raft_term":"2"}"#,
        )
        .unwrap();
        assert_eq!(header.revision, 12);
        assert_eq!(header.cluster_id, "14841639068965178418");
        assert_eq!(header.member_id, "10276657743932975437");
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/aisix/"), b"/aisix0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
