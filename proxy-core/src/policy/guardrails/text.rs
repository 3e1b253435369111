//! Where the text of requests and answers lies, as strings guardrails can read and
//! rewrite in place. A body is parsed into JSON values, its text strings are lent out
//! (`&mut String`), and only the fields a mask changed are written back.
//!
//! Text is every string value except those under structural keys (roles, types, ids,
//! media: [`STRUCTURAL`]), at any depth. That covers message contents, text parts,
//! tool-call arguments, tool results, `system`, `input`, `prompt`, `instructions`.

use bytes::Bytes;
use serde_json::Value;

use crate::failure::ProxyError;
use crate::formats::body::{self, RequestBody};

/// Keys whose values are structure, not text: never scanned, never rewritten.
const STRUCTURAL: [&str; 21] = [
    "role",
    "type",
    "id",
    "object",
    "model",
    "tool_call_id",
    "tool_use_id",
    "call_id",
    "status",
    "finish_reason",
    "stop_reason",
    "media_type",
    "mime_type",
    "cache_control",
    "signature",
    "image_url",
    "input_audio",
    "source",
    "file",
    "detail",
    "format",
];

/// Lends out the text strings of `value`, at any depth.
pub fn strings<'v>(value: &'v mut Value, out: &mut Vec<&'v mut String>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter_mut().for_each(|v| strings(v, out)),
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if !STRUCTURAL.contains(&key.as_str()) {
                    strings(v, out);
                }
            }
        }
        _ => {}
    }
}

/// A request's text fields, parsed: every top-level field but `model` and `stream`.
pub struct RequestText {
    /// (position in the body, value).
    fields: Vec<(usize, Value)>,
}

impl RequestText {
    pub fn of(request: &RequestBody<'_>) -> Self {
        let fields = request
            .fields()
            .enumerate()
            .filter(|(_, (name, raw))| {
                !matches!(*name, "model" | "stream" | "stream_options")
                    && raw.get().trim_start().starts_with(['"', '[', '{'])
            })
            .filter_map(|(at, (_, raw))| Some((at, serde_json::from_str(raw.get()).ok()?)))
            .collect();
        Self { fields }
    }

    /// The text strings, and for each the index of its field.
    pub fn strings(&mut self) -> (Vec<&mut String>, Vec<usize>) {
        let mut all = Vec::new();
        let mut owners = Vec::new();
        for (i, (_, value)) in self.fields.iter_mut().enumerate() {
            strings(value, &mut all);
            owners.resize(all.len(), i);
        }
        (all, owners)
    }

    /// The body with the fields at `changed` written anew; the rest byte for byte.
    pub fn rewrite(&self, request: &RequestBody<'_>, changed: &[usize]) -> Bytes {
        let replaced: Vec<(usize, String)> = changed
            .iter()
            .filter_map(|&i| self.fields.get(i))
            .map(|(at, value)| (*at, value.to_string()))
            .collect();
        request.with_fields_at(&replaced)
    }
}

/// A body the proxy does not interpret (passthrough): a JSON document, or text.
pub enum RawText {
    Json(Value),
    Text(String),
}

impl RawText {
    /// A JSON body nested past [`body::MAX_DEPTH`] is refused rather than read in part.
    pub fn of(bytes: &[u8]) -> Result<Self, ProxyError> {
        if body::nests_deeper(bytes, body::MAX_DEPTH) {
            return Err(ProxyError::invalid_request(
                format!(
                    "request body nests arrays and objects deeper than {} levels",
                    body::MAX_DEPTH
                ),
                None,
            ));
        }
        Ok(match serde_json::from_slice::<Value>(bytes) {
            Ok(value) => RawText::Json(value),
            Err(_) => RawText::Text(String::from_utf8_lossy(bytes).into_owned()),
        })
    }

    pub fn strings(&mut self) -> Vec<&mut String> {
        match self {
            RawText::Json(value) => {
                let mut out = Vec::new();
                strings(value, &mut out);
                out
            }
            RawText::Text(text) => vec![text],
        }
    }

    pub fn into_bytes(self) -> Bytes {
        match self {
            RawText::Json(value) => Bytes::from(value.to_string()),
            RawText::Text(text) => Bytes::from(text),
        }
    }
}

/// The fields of an answer (or of a stream event) that carry generated text: OpenAI
/// `choices` (messages, deltas, completions' `text`, tool calls), Anthropic `content`
/// and `delta`, responses `output`, `delta`, `text`, `part`, `item` and `response`.
const ANSWER_FIELDS: [&str; 9] = [
    "choices", "content", "output", "delta", "text", "part", "item", "response", "message",
];

/// Lends out the generated text of an answer document or stream event.
pub fn answer_strings<'v>(answer: &'v mut Value, out: &mut Vec<&'v mut String>) {
    if let Value::Object(map) = answer {
        for (key, v) in map.iter_mut() {
            if ANSWER_FIELDS.contains(&key.as_str()) {
                strings(v, out);
            }
        }
    }
}

/// The delta text of one stream event, where each format puts it: OpenAI chat
/// (`choices[0].delta.content`) and completions (`choices[0].text`), Anthropic
/// (`delta.text` of a `content_block_delta`), responses (`delta` of
/// `response.output_text.delta`).
pub fn delta_text(event: &mut Value) -> Option<&mut String> {
    let kind = event.get("type").and_then(Value::as_str);
    match kind {
        Some("content_block_delta") => match event.pointer_mut("/delta/text") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        },
        Some("response.output_text.delta") => match event.get_mut("delta") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        },
        _ => {
            let choice = event.pointer_mut("/choices/0")?;
            if choice
                .pointer("/delta/content")
                .is_some_and(Value::is_string)
            {
                match choice.pointer_mut("/delta/content") {
                    Some(Value::String(s)) => Some(s),
                    _ => None,
                }
            } else {
                match choice.get_mut("text") {
                    Some(Value::String(s)) => Some(s),
                    _ => None,
                }
            }
        }
    }
}
