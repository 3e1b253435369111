//! What the format codecs share: refusals, reading loose JSON, writing events.

use bytes::{BufMut, BytesMut};
use serde_json::{Map, Number, Value};

use super::canonical::{ImageSource, Request};
use crate::failure::ProxyError;

pub(super) type Result<T> = std::result::Result<T, ProxyError>;

/// A request the target's format cannot express: 400 naming the parameter.
pub(super) fn refuse(message: impl Into<String>, param: &'static str) -> ProxyError {
    ProxyError::invalid_request(message, Some(param))
}

/// Refuses (400 naming `n`) a request for several answers: the formats without
/// choices would drop all but one silently.
pub(super) fn one_choice(request: &Request) -> Result<()> {
    if request.choices > 1 {
        return Err(refuse(
            "'n' greater than 1 is not supported by this model's provider",
            "n",
        ));
    }
    Ok(())
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

/// The sampling parameters in the camel-case spelling Google's and AWS's APIs share
/// (`temperature`, `topP`, `stopSequences`), the token limit under `max_key`.
pub(super) fn sampling(request: &Request, max_key: &str) -> Map<String, Value> {
    let mut config = Map::new();
    if let Some(max) = request.max_tokens {
        config.insert(max_key.into(), max.into());
    }
    if let Some(t) = &request.temperature {
        config.insert("temperature".into(), t.clone().into());
    }
    if let Some(p) = &request.top_p {
        config.insert("topP".into(), p.clone().into());
    }
    if !request.stop.is_empty() {
        config.insert("stopSequences".into(), request.stop.clone().into());
    }
    config
}

/// Appends a turn's items (`content` blocks or `parts`, as `field` names them) to the
/// conversation as a message of `role`, into the last message when it has the same
/// role (the formats that want turns alternating).
pub(super) fn push_turn(out: &mut Vec<Value>, role: &str, field: &str, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if last["role"] == role => {
            if let Some(existing) = last[field].as_array_mut() {
                existing.extend(items);
            }
        }
        _ => {
            let mut message = Map::new();
            message.insert("role".into(), role.into());
            message.insert(field.into(), Value::Array(items));
            out.push(Value::Object(message));
        }
    }
}

/// An image part's URL: a `data:<type>;base64,` URL as inline data, anything else as
/// a URL.
pub(super) fn image_source(url: &str) -> ImageSource {
    match url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
    {
        Some((media_type, data)) => ImageSource::Base64 {
            media_type: media_type.to_owned(),
            data: data.to_owned(),
        },
        None => ImageSource::Url(url.to_owned()),
    }
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
