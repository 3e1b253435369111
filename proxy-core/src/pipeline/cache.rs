//! Cache: the phase that serves a whole answer kept for the same request, and the
//! response cache behind it: in memory, bounded by entry count (least recently used
//! goes first) and entry size, with a TTL; or in Redis (`cache.backend: redis`), where
//! every replica reads what any of them kept, with the TTL kept by Redis and the same
//! size bound. Whole answers of chat completions and messages are kept; streams, and
//! requests that say `Cache-Control: no-cache` or `no-store`, neither read nor fill it.
//! When Redis cannot answer in time the cache is passed by (a miss, nothing kept).
//!
//! The key is SHA-256 over the caller key id, the model alias and the request body
//! normalised (parsed and written back with sorted keys and no insignificant
//! whitespace), so two callers never share an entry and formatting does not matter.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::formats::body::RequestBody;
use crate::formats::endpoint::Endpoint;
use crate::shared::redis::{Op, Redis};

/// Where a call's whole answer is looked up and kept.
pub(super) struct Slot<'a> {
    cache: &'a ResponseCache,
    key: CacheKey,
}

impl Slot<'_> {
    pub async fn get(&self) -> Option<Arc<Cached>> {
        self.cache.get(&self.key).await
    }

    /// Keeps a successful whole answer.
    pub fn put(
        self,
        status: StatusCode,
        content_type: Option<HeaderValue>,
        served_by: &str,
        body: Bytes,
    ) {
        self.cache
            .put(self.key, status, content_type, served_by, body);
    }
}

/// The cache slot of a call, when the cache is on and the call may use it.
pub(super) fn slot<'a>(
    cache: Option<&'a ResponseCache>,
    endpoint: Endpoint,
    api_key_id: &str,
    model: &str,
    request: &RequestBody<'_>,
    body: &[u8],
    headers: &HeaderMap,
) -> Option<Slot<'a>> {
    let cache = cache?;
    if !endpoint.cacheable() || request.stream || refuses_cache(headers) {
        return None;
    }
    let key = ResponseCache::key(endpoint.path(), api_key_id, model, body)?;
    Some(Slot { cache, key })
}

/// `Cache-Control: no-cache` or `no-store` on the request: neither read nor fill the
/// cache.
fn refuses_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            matches!(
                d.trim().to_ascii_lowercase().as_str(),
                "no-cache" | "no-store"
            )
        })
}

#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub ttl: Duration,
    pub max_entries: NonZeroUsize,
    /// Answers larger than this are not kept.
    pub max_entry_bytes: usize,
    /// Keep answers in Redis, shared by replicas, instead of in this process.
    pub redis: Option<Redis>,
}

pub type CacheKey = [u8; 32];

/// A kept answer.
#[derive(Debug)]
pub struct Cached {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub served_by: Arc<str>,
    pub body: Bytes,
    stored: Instant,
}

pub struct ResponseCache {
    ttl: Duration,
    max_entry_bytes: usize,
    store: Store,
}

enum Store {
    Memory(Mutex<LruCache<CacheKey, Arc<Cached>>>),
    Redis(Redis),
}

impl ResponseCache {
    pub fn new(options: CacheOptions) -> Self {
        Self {
            ttl: options.ttl,
            max_entry_bytes: options.max_entry_bytes,
            store: match options.redis {
                Some(redis) => Store::Redis(redis),
                None => Store::Memory(Mutex::new(LruCache::new(options.max_entries))),
            },
        }
    }

    /// The key of a request to `route` (the same body means different answers on
    /// `/v1/chat/completions` and `/v1/messages`); `None` when the body is not JSON
    /// (it is not cached).
    pub fn key(route: &str, api_key_id: &str, model: &str, body: &[u8]) -> Option<CacheKey> {
        let normalised =
            serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(body).ok()?).ok()?;
        let mut hash = Sha256::new();
        for part in [
            route.as_bytes(),
            api_key_id.as_bytes(),
            model.as_bytes(),
            &normalised,
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        Some(hash.finalize().into())
    }

    /// A fresh entry for `key`; an expired one is removed.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let entries = match &self.store {
            Store::Memory(entries) => entries,
            Store::Redis(redis) => {
                let mut get = redis::cmd("GET");
                get.arg(redis_key(key));
                let value: Option<Vec<u8>> = redis.run(Op::Cmd(get)).await.ok()?;
                return decode(&value?).map(Arc::new);
            }
        };
        let mut entries = entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(key)?.clone();
        if entry.stored.elapsed() < self.ttl {
            return Some(entry);
        }
        entries.pop(key);
        None
    }

    /// Keeps a successful answer (others, and oversized ones, are not kept).
    pub fn put(
        &self,
        key: CacheKey,
        status: StatusCode,
        content_type: Option<HeaderValue>,
        served_by: &str,
        body: Bytes,
    ) {
        if status != StatusCode::OK || body.len() > self.max_entry_bytes {
            return;
        }
        let entry = Cached {
            status,
            content_type,
            served_by: served_by.into(),
            body,
            stored: Instant::now(),
        };
        match &self.store {
            Store::Memory(entries) => {
                let mut entries = entries.lock().unwrap_or_else(PoisonError::into_inner);
                entries.put(key, Arc::new(entry));
            }
            Store::Redis(redis) => {
                let Some(value) = encode(&entry) else { return };
                let mut set = redis::cmd("SET");
                set.arg(redis_key(&key)).arg(value).arg("PX").arg(
                    u64::try_from(self.ttl.as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
                // Kept in the background: the caller has its answer already.
                let redis = redis.clone();
                tokio::spawn(async move {
                    let _: Result<(), _> = redis.run(Op::Cmd(set)).await;
                });
            }
        }
    }
}

fn redis_key(key: &CacheKey) -> String {
    format!("aisix:cache:{}", hex::encode(key))
}

/// The stored form: a version byte, the status (2 bytes), the content type and the
/// served-by name (each a length byte and the bytes), then the body.
const FORMAT: u8 = 1;

fn encode(entry: &Cached) -> Option<Vec<u8>> {
    let content_type = entry
        .content_type
        .as_ref()
        .map_or(&b""[..], |v| v.as_bytes());
    let served_by = entry.served_by.as_bytes();
    let mut out = Vec::with_capacity(5 + content_type.len() + served_by.len() + entry.body.len());
    out.push(FORMAT);
    out.extend_from_slice(&entry.status.as_u16().to_be_bytes());
    for part in [content_type, served_by] {
        out.push(u8::try_from(part.len()).ok()?);
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&entry.body);
    Some(out)
}

/// `None` for anything [`encode`] did not write (another version, a corrupt value):
/// a miss.
fn decode(value: &[u8]) -> Option<Cached> {
    let (&format, rest) = value.split_first()?;
    if format != FORMAT || rest.len() < 2 {
        return None;
    }
    let status = StatusCode::from_u16(u16::from_be_bytes([rest[0], rest[1]])).ok()?;
    let mut rest = &rest[2..];
    let mut part = || {
        let (&len, tail) = rest.split_first()?;
        let len = usize::from(len);
        let (part, tail) = (tail.get(..len)?, tail.get(len..)?);
        rest = tail;
        Some(part)
    };
    let content_type = part()?;
    let served_by = std::str::from_utf8(part()?).ok()?;
    let content_type = match content_type {
        b"" => None,
        bytes => Some(HeaderValue::from_bytes(bytes).ok()?),
    };
    let served_by = served_by.into();
    Some(Cached {
        status,
        content_type,
        served_by,
        body: Bytes::copy_from_slice(rest),
        stored: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn cache(max_entries: usize) -> ResponseCache {
        ResponseCache::new(CacheOptions {
            ttl: Duration::from_secs(60),
            max_entries: NonZeroUsize::new(max_entries).unwrap(),
            max_entry_bytes: 16,
            redis: None,
        })
    }

    fn key(body: &str) -> CacheKey {
        ResponseCache::key("/r", "k", "m", body.as_bytes()).unwrap()
    }

    #[test]
    fn keys_ignore_formatting_but_not_callers_models_or_content() {
        assert_eq!(
            key(r#"{"a":1,"b":[1,2]}"#),
            key("{ \"b\": [1, 2],\n \"a\": 1 }")
        );
        assert_ne!(key(r#"{"a":1}"#), key(r#"{"a":2}"#));
        let body = br#"{"a":1}"#;
        assert_ne!(
            ResponseCache::key("/r", "k1", "m", body),
            ResponseCache::key("/r", "k2", "m", body)
        );
        assert_ne!(
            ResponseCache::key("/r", "k", "m1", body),
            ResponseCache::key("/r", "k", "m2", body)
        );
        assert_ne!(
            ResponseCache::key("/v1/chat/completions", "k", "m", body),
            ResponseCache::key("/v1/messages", "k", "m", body)
        );
        assert_eq!(ResponseCache::key("/r", "k", "m", b"not json"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_are_bounded_and_only_successes_fit() {
        let c = cache(2);
        let put = |k: &str, status: u16, body: &'static str| {
            c.put(
                key(k),
                StatusCode::from_u16(status).unwrap(),
                None,
                "m",
                Bytes::from_static(body.as_bytes()),
            );
        };
        put("1", 200, "one");
        put("2", 500, "two");
        put("3", 200, "this body is far too large");
        assert!(c.get(&key("1")).await.is_some());
        assert!(c.get(&key("2")).await.is_none(), "failures are not kept");
        assert!(
            c.get(&key("3")).await.is_none(),
            "oversized answers are not kept"
        );
        put("4", 200, "four");
        put("5", 200, "five");
        assert!(
            c.get(&key("1")).await.is_none(),
            "least recently used goes first"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(c.get(&key("5")).await.is_none(), "expired");
    }

    #[test]
    fn the_stored_form_reads_back_and_anything_else_is_a_miss() {
        let entry = Cached {
            status: StatusCode::OK,
            content_type: Some(HeaderValue::from_static("application/json")),
            served_by: "gpt-4o".into(),
            body: Bytes::from_static(b"{\"id\":1}"),
            stored: Instant::now(),
        };
        let stored = encode(&entry).unwrap();
        let back = decode(&stored).unwrap();
        assert_eq!(
            (back.status, back.content_type, &*back.served_by, back.body),
            (
                entry.status,
                entry.content_type.clone(),
                "gpt-4o",
                entry.body.clone()
            )
        );
        let bare = Cached {
            content_type: None,
            ..entry
        };
        assert_eq!(decode(&encode(&bare).unwrap()).unwrap().content_type, None);
        for corrupt in [
            &b""[..],
            b"\x02\x00\xc8",
            b"\x01\x00",
            b"\x01\x00\xc8\x09ab",
        ] {
            assert!(decode(corrupt).is_none(), "{corrupt:?}");
        }
    }
}
