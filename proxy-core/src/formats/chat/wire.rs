//! What the format codecs share: refusals, reading loose JSON, writing events.

use bytes::{BufMut, BytesMut};
use serde_json::{Map, Number, Value};

use crate::failure::ProxyError;

pub(super) type Result<T> = std::result::Result<T, ProxyError>;

/// A request the target's format cannot express: 400 naming the parameter.
pub(super) fn refuse(message: impl Into<String>, param: &'static str) -> ProxyError {
    ProxyError::invalid_request(message, Some(param))
}

/// An upstream answer that is not what its format promises.
pub(super) fn unreadable(format: &str) -> ProxyError {
    ProxyError::UpstreamFailed {
        detail: format!("the upstream {format} answer could not be read"),
        retry_after: None,
    }
}

pub(super) fn parse_object(body: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ProxyError::invalid_request(
            "request body is not a valid JSON object",
            None,
        )),
    }
}

/// A present, non-null field.
pub(super) fn take(object: &mut Map<String, Value>, name: &str) -> Option<Value> {
    object.remove(name).filter(|v| !v.is_null())
}

/// A numeric sampling parameter, kept exactly as written.
pub(super) fn number(value: Option<Value>, param: &'static str) -> Result<Option<Number>> {
    match value {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(Some(n)),
        Some(_) => Err(refuse(format!("'{param}' must be a number"), param)),
    }
}

/// A token count parameter.
pub(super) fn count(value: Option<Value>, param: &'static str) -> Result<Option<u64>> {
    match value {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| refuse(format!("'{param}' must be a non-negative integer"), param)),
    }
}

/// The strings of a list (anything else in it is skipped).
pub(super) fn strings(list: &[Value]) -> Vec<String> {
    list.iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

pub(super) fn str_of<'a>(value: &'a Value, name: &str) -> &'a str {
    value.get(name).and_then(Value::as_str).unwrap_or("")
}

/// The string at a JSON pointer, or "".
pub(super) fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn u64_of(value: &Value, name: &str) -> Option<u64> {
    value.get(name).and_then(Value::as_u64)
}

/// The text of a string or of an array of `{type: "text", text}` parts, joined by
/// newlines (other parts are skipped).
pub(super) fn plain_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// `data: <json>` and the blank line that ends the event.
pub(super) fn data_event(out: &mut BytesMut, data: &Value) {
    out.put_slice(b"data: ");
    out.put_slice(data.to_string().as_bytes());
    out.put_slice(b"\n\n");
}

/// A named event: `event: <name>` before the data.
pub(super) fn named_event(out: &mut BytesMut, name: &str, data: &Value) {
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\n");
    data_event(out, data);
}
