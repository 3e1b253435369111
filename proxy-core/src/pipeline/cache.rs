//! Cache: the phase that serves a whole answer kept for the same request, and the
//! response cache behind it: in memory, bounded by entry count (least recently used
//! goes first) and entry size, with a TTL. Whole answers of chat completions and
//! messages are kept; streams, and requests that say `Cache-Control: no-cache` or
//! `no-store`, neither read nor fill it.
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

/// Where a call's whole answer is looked up and kept.
pub(super) struct Slot<'a> {
    cache: &'a ResponseCache,
    key: CacheKey,
}

impl Slot<'_> {
    pub fn get(&self) -> Option<Arc<Cached>> {
        self.cache.get(&self.key)
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

#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    pub ttl: Duration,
    pub max_entries: NonZeroUsize,
    /// Answers larger than this are not kept.
    pub max_entry_bytes: usize,
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
    options: CacheOptions,
    entries: Mutex<LruCache<CacheKey, Arc<Cached>>>,
}

impl ResponseCache {
    pub fn new(options: CacheOptions) -> Self {
        Self {
            options,
            entries: Mutex::new(LruCache::new(options.max_entries)),
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
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(key)?.clone();
        if entry.stored.elapsed() < self.options.ttl {
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
        if status != StatusCode::OK || body.len() > self.options.max_entry_bytes {
            return;
        }
        let entry = Arc::new(Cached {
            status,
            content_type,
            served_by: served_by.into(),
            body,
            stored: Instant::now(),
        });
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.put(key, entry);
    }
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
        assert!(c.get(&key("1")).is_some());
        assert!(c.get(&key("2")).is_none(), "failures are not kept");
        assert!(c.get(&key("3")).is_none(), "oversized answers are not kept");
        put("4", 200, "four");
        put("5", 200, "five");
        assert!(c.get(&key("1")).is_none(), "least recently used goes first");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(c.get(&key("5")).is_none(), "expired");
    }
}
