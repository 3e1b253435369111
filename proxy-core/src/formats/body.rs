//! Request bodies as the proxy reads them: the few fields it needs, `model` rewritten
//! without re-serialising the rest.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::failure::ProxyError;

/// The deepest nesting of arrays and objects a JSON request body may have. Deeper
/// bodies are refused before anything reads them: every reader after admission (the
/// guardrail scan first) then sees the whole body, never a part cut off by a parser's
/// recursion limit.
pub const MAX_DEPTH: usize = 64;

/// Whether the JSON text `bytes` nests arrays and objects deeper than `limit`. One pass,
/// no recursion, whatever the depth; brackets inside strings do not count.
pub fn nests_deeper(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A JSON request body (chat completions, messages, embeddings...), top-level fields
/// kept raw and in order.
pub struct RequestBody<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    pub model: String,
    pub stream: bool,
    /// Bytes of the body as it arrived.
    pub size: usize,
    /// The buffer the fields borrow from, when it is shared: upstream bodies then
    /// refer to its large fields instead of copying them.
    source: Option<Bytes>,
}

impl<'a> RequestBody<'a> {
    /// Parses a body kept in a shared buffer: the upstream bodies made from it share
    /// that buffer's large fields (a 100 MB prompt is held once, not once per copy).
    pub fn shared(bytes: &'a Bytes) -> Result<Self, ProxyError> {
        let mut body = Self::parse(bytes)?;
        body.source = Some(bytes.clone());
        Ok(body)
    }

    pub fn parse(bytes: &'a [u8]) -> Result<Self, ProxyError> {
        if nests_deeper(bytes, MAX_DEPTH) {
            return Err(ProxyError::invalid_request(
                format!("request body nests arrays and objects deeper than {MAX_DEPTH} levels"),
                None,
            ));
        }
        let Fields(fields) = serde_json::from_slice(bytes).map_err(|e| {
            ProxyError::invalid_request(
                format!("request body is not a valid JSON object: {e}"),
                None,
            )
        })?;
        let find = |name: &str| {
            fields
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| *v)
        };
        let model = match find("model").map(|v| serde_json::from_str::<String>(v.get())) {
            Some(Ok(m)) if !m.is_empty() => m,
            Some(_) => {
                return Err(ProxyError::invalid_request(
                    "'model' must be a non-empty string",
                    Some("model"),
                ));
            }
            None => {
                return Err(ProxyError::invalid_request(
                    "missing required parameter 'model'",
                    Some("model"),
                ));
            }
        };
        let stream = match find("stream").map(|v| serde_json::from_str::<Option<bool>>(v.get())) {
            None => false,
            Some(Ok(s)) => s.unwrap_or(false),
            Some(Err(_)) => {
                return Err(ProxyError::invalid_request(
                    "'stream' must be a boolean",
                    Some("stream"),
                ));
            }
        };
        Ok(Self {
            fields,
            model,
            stream,
            size: bytes.len(),
            source: None,
        })
    }

    /// Refuses the body unless `name` is present and an array.
    pub fn require_array(&self, name: &'static str) -> Result<(), ProxyError> {
        match self
            .field(name)
            .map(|v| v.get().trim_start().starts_with('['))
        {
            Some(true) => Ok(()),
            Some(false) => Err(ProxyError::invalid_request(
                format!("'{name}' must be an array"),
                Some(name),
            )),
            None => Err(ProxyError::invalid_request(
                format!("missing required parameter '{name}'"),
                Some(name),
            )),
        }
    }

    /// Refuses the body unless `name` is a non-empty array (a conversation needs a
    /// message: no provider answers an empty one).
    pub fn require_nonempty_array(&self, name: &'static str) -> Result<(), ProxyError> {
        self.require_array(name)?;
        let empty = self.field(name).is_some_and(|v| {
            v.get()
                .trim_start()
                .strip_prefix('[')
                .is_some_and(|rest| rest.trim_start().starts_with(']'))
        });
        if empty {
            return Err(ProxyError::invalid_request(
                format!("'{name}' must contain at least one message"),
                Some(name),
            ));
        }
        Ok(())
    }

    /// The top-level fields as sent, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &'a RawValue)> {
        self.fields.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// A top-level field as sent (the last one when repeated).
    pub fn field(&self, name: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// Whether a stream's caller asked for the usage chunk
    /// (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.field("stream_options")
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
            .and_then(|v| v.get("include_usage")?.as_bool())
            .unwrap_or(false)
    }

    /// The upstream body: `model` replaced by the upstream id and, for a stream whose
    /// caller did not ask for usage, `stream_options.include_usage` set (the gateway
    /// needs the numbers; the caller does not get the extra chunk). Every other field
    /// is copied byte for byte.
    pub fn upstream_body(&self, upstream_model: &str) -> JsonBody {
        if !self.stream || self.include_usage() {
            return self.with_model(upstream_model);
        }
        let mut options = self
            .field("stream_options")
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        options["include_usage"] = serde_json::Value::Bool(true);
        self.assemble(upstream_model, Some(&options.to_string()))
    }

    /// The body with `model` replaced by the upstream id; every other field is copied
    /// byte for byte.
    pub fn with_model(&self, upstream_model: &str) -> JsonBody {
        self.assemble(upstream_model, None)
    }

    /// The body with the fields at the given positions (in [`Self::fields`]' order)
    /// replaced by new JSON; every other field byte for byte.
    pub fn with_fields_at(&self, replaced: &[(usize, String)]) -> Bytes {
        let mut out = Vec::with_capacity(self.size + 64);
        out.push(b'{');
        for (at, (key, value)) in self.fields.iter().enumerate() {
            if at > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, key);
            out.push(b':');
            match replaced.iter().find(|(i, _)| *i == at) {
                Some((_, json)) => out.extend_from_slice(json.as_bytes()),
                None => out.extend_from_slice(value.get().as_bytes()),
            }
        }
        out.push(b'}');
        Bytes::from(out)
    }

    /// The fields in order, `model` (once) as `upstream_model`, and with
    /// `stream_options` replaced by `stream_options` when given, as the last field.
    fn assemble(&self, upstream_model: &str, stream_options: Option<&str>) -> JsonBody {
        let mut out = Pieces::new(self.source.as_ref());
        out.copy(b"{");
        let mut first = true;
        let mut field = |out: &mut Pieces, key: &str, raw: &str| {
            if !first {
                out.copy(b",");
            }
            first = false;
            out.string(key);
            out.copy(b":");
            out.raw(raw);
        };
        let mut model_written = false;
        for (key, value) in &self.fields {
            match key.as_ref() {
                "model" if model_written => {}
                "model" => {
                    let mut quoted = Vec::new();
                    write_json_string(&mut quoted, upstream_model);
                    field(
                        &mut out,
                        "model",
                        std::str::from_utf8(&quoted).unwrap_or("\"\""),
                    );
                    model_written = true;
                }
                "stream_options" if stream_options.is_some() => {}
                _ => field(&mut out, key, value.get()),
            }
        }
        if let Some(options) = stream_options {
            field(&mut out, "stream_options", options);
        }
        out.copy(b"}");
        out.finish()
    }
}

/// A field at least this long is not copied into an upstream body built from a shared
/// buffer; the body refers to it where it is.
const SHARE_AT: usize = 4096;

/// An upstream body being written: small pieces copied, large fields of the caller's
/// shared buffer referred to.
struct Pieces<'s> {
    source: Option<&'s Bytes>,
    done: Vec<Bytes>,
    open: Vec<u8>,
}

impl<'s> Pieces<'s> {
    fn new(source: Option<&'s Bytes>) -> Self {
        Self {
            source,
            done: Vec::new(),
            open: Vec::new(),
        }
    }

    fn copy(&mut self, bytes: &[u8]) {
        self.open.extend_from_slice(bytes);
    }

    fn string(&mut self, s: &str) {
        write_json_string(&mut self.open, s);
    }

    /// A field's raw JSON: referred to when it is large and lies in the shared buffer.
    fn raw(&mut self, raw: &str) {
        match self.source.filter(|_| raw.len() >= SHARE_AT) {
            Some(source) => match within(source, raw.as_bytes()) {
                Some(slice) => {
                    if !self.open.is_empty() {
                        self.done.push(Bytes::from(std::mem::take(&mut self.open)));
                    }
                    self.done.push(slice);
                }
                None => self.copy(raw.as_bytes()),
            },
            None => self.copy(raw.as_bytes()),
        }
    }

    fn finish(mut self) -> JsonBody {
        if !self.open.is_empty() || self.done.is_empty() {
            self.done.push(Bytes::from(self.open));
        }
        JsonBody(self.done)
    }
}

/// `part` as a slice of `source` (sharing its buffer), if it lies inside it.
fn within(source: &Bytes, part: &[u8]) -> Option<Bytes> {
    let start = (part.as_ptr() as usize).checked_sub(source.as_ptr() as usize)?;
    (start + part.len() <= source.len()).then(|| source.slice(start..start + part.len()))
}

/// A JSON body for an upstream, in pieces: the parts the gateway wrote and, between
/// them, large fields of the caller's body where they already are in memory.
#[derive(Clone, Debug)]
pub struct JsonBody(Vec<Bytes>);

impl JsonBody {
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body in one buffer (copied only when it is in pieces).
    pub fn contiguous(&self) -> Bytes {
        match self.0.as_slice() {
            [one] => one.clone(),
            pieces => Bytes::from(pieces.concat()),
        }
    }

    /// The body as reqwest sends it: one buffer, or the pieces in turn with their
    /// total length declared (`Content-Length`, not chunked).
    pub fn into_reqwest(self) -> reqwest::Body {
        match <[Bytes; 1]>::try_from(self.0) {
            Ok([one]) => reqwest::Body::from(one),
            Err(pieces) => reqwest::Body::wrap(InPieces(pieces.into())),
        }
    }
}

impl From<Vec<u8>> for JsonBody {
    fn from(bytes: Vec<u8>) -> Self {
        Self(vec![Bytes::from(bytes)])
    }
}

impl From<Bytes> for JsonBody {
    fn from(bytes: Bytes) -> Self {
        Self(vec![bytes])
    }
}

/// An HTTP body of pieces sent one after the other, its exact length known.
struct InPieces(std::collections::VecDeque<Bytes>);

impl http_body::Body for InPieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
    }
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn bodies_nested_past_the_limit_are_refused_whole() {
        // The review's bypass: a field 126 arrays deep beside the content the guardrail
        // must see. Every depth up to the limit is read; past it, refused.
        for depth in [0, 1, 61, 126, 127, 5_000, 100_000] {
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x","deep":{}}}]}}"#,
                nested(depth)
            );
            let accepted = RequestBody::parse(body.as_bytes()).is_ok();
            // The message's object and the messages array add two levels.
            assert_eq!(accepted, depth + 3 <= MAX_DEPTH, "depth {depth}");
        }
        // Brackets inside strings, escaped quotes included, are text, not nesting.
        let text = format!(r#"{{"model":"m","s":"\"{}"}}"#, "[".repeat(500));
        assert!(RequestBody::parse(text.as_bytes()).is_ok());
        match RequestBody::parse(format!(r#"{{"model":"m","d":{}}}"#, nested(65)).as_bytes()) {
            Err(ProxyError::InvalidRequest { message, param }) => {
                assert_eq!(param, None);
                assert!(message.contains("deeper than 64 levels"), "{message}");
            }
            _ => panic!("expected a refusal"),
        }
    }

    #[test]
    fn rewrites_only_the_model() {
        let body = br#"{"model":"alias","messages":[{"role":"user","content":"h\u00e9 \"x\""}],"stream":true,"n":1}"#;
        let parsed = RequestBody::parse(body).unwrap();
        assert_eq!(parsed.model, "alias");
        assert!(parsed.stream);
        let out = parsed.with_model("gpt-\"4o\"").contiguous();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"gpt-\"4o\"","messages":[{"role":"user","content":"h\u00e9 \"x\""}],"stream":true,"n":1}"#
        );
    }

    #[test]
    fn streams_ask_for_usage_on_the_callers_behalf() {
        let body = br#"{"model":"a","messages":[],"stream":true,"stream_options":{"x":1}}"#;
        let out = RequestBody::parse(body)
            .unwrap()
            .upstream_body("up")
            .contiguous();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"up","messages":[],"stream":true,"stream_options":{"include_usage":true,"x":1}}"#
        );
        let asked =
            br#"{"model":"a","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
        let out = RequestBody::parse(asked)
            .unwrap()
            .upstream_body("up")
            .contiguous();
        assert!(out.ends_with(br#""stream_options":{"include_usage":true}}"#));
        let whole = br#"{"model":"a","messages":[]}"#;
        let out = RequestBody::parse(whole)
            .unwrap()
            .upstream_body("up")
            .contiguous();
        assert_eq!(out, &br#"{"model":"up","messages":[]}"#[..]);
    }

    #[test]
    fn a_large_field_of_a_shared_body_is_referred_to_not_copied() {
        let prompt = "p".repeat(100_000);
        let sent = Bytes::from(format!(
            r#"{{ "model": "alias", "messages": [{{"role":"user","content":"{prompt}"}}], "stream": true }}"#
        ));
        let shared = RequestBody::shared(&sent).unwrap();
        let copied = RequestBody::parse(&sent).unwrap();
        for (from_shared, from_copy) in [
            (shared.with_model("up"), copied.with_model("up")),
            (shared.upstream_body("up"), copied.upstream_body("up")),
        ] {
            // The same bytes either way, whitespace between fields dropped.
            assert_eq!(from_shared.contiguous(), from_copy.contiguous());
            assert_eq!(from_shared.len(), from_copy.len());
            // The copy is one buffer; the shared body's messages point into `sent`.
            assert_eq!(from_copy.0.len(), 1);
            let inside = |b: &Bytes| {
                let at = b.as_ptr() as usize;
                at >= sent.as_ptr() as usize && at + b.len() <= sent.as_ptr() as usize + sent.len()
            };
            let big: Vec<&Bytes> = from_shared.0.iter().filter(|b| b.len() > 100_000).collect();
            assert_eq!(big.len(), 1);
            assert!(inside(big[0]));
            assert!(
                from_shared
                    .0
                    .iter()
                    .filter(|b| !inside(b))
                    .all(|b| b.len() < 200)
            );
        }
        assert!(
            std::str::from_utf8(&shared.upstream_body("up").contiguous())
                .unwrap()
                .ends_with(r#""stream":true,"stream_options":{"include_usage":true}}"#)
        );
    }

    #[test]
    fn reports_the_missing_or_wrong_field() {
        let param = |body: &[u8]| match RequestBody::parse(body).and_then(|b| {
            b.require_array("messages")?;
            Ok(b)
        }) {
            Err(ProxyError::InvalidRequest { param, .. }) => param,
            _ => panic!("expected invalid request"),
        };
        assert_eq!(param(br#"{"messages":[]}"#), Some("model"));
        assert_eq!(param(br#"{"model":3,"messages":[]}"#), Some("model"));
        assert_eq!(param(br#"{"model":"m"}"#), Some("messages"));
        assert_eq!(param(br#"{"model":"m","messages":{}}"#), Some("messages"));
        assert_eq!(
            param(br#"{"model":"m","messages":[],"stream":"yes"}"#),
            Some("stream")
        );
        assert_eq!(param(b"[1]"), None);
        assert_eq!(param(b"{\"model\":\"\xff\"}"), None);
        assert_eq!(param(b"{"), None);
    }
}
