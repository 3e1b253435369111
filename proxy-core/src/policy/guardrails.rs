//! Keyword guardrails: literal (case-insensitive) and regex patterns checked on the
//! caller's messages before dispatch (`input`), and on the answer (`output`): whole
//! answers before they are returned, streams on their accumulated text as events
//! arrive. `block` refuses with 422 `content_filter` naming the guardrail; `monitor`
//! only logs. The matched text is never echoed or logged.
//!
//! A guardrail applies to every model and key unless it lists `models` (aliases,
//! `*` globs) or `api_keys` (ids).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tracing::warn;

use crate::failure::{Envelope, ProxyError, stream_error_event};
use crate::formats::body::{self, RequestBody};
use crate::formats::sse::{Filtered, data_lines};
use crate::resources::{Guardrail, GuardrailPattern, HookPoint};
use crate::snapshot::Snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Input,
    Output,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }
}

/// The enabled guardrails of one request, by stage.
#[derive(Default)]
pub struct Applicable {
    pub input: Vec<Arc<Guardrail>>,
    pub output: Vec<Arc<Guardrail>>,
}

pub fn applicable(snapshot: &Snapshot, model: &str, api_key_id: &str) -> Applicable {
    let mut found = Applicable::default();
    for g in snapshot.guardrails() {
        let scoped_out = !g.enabled
            || (!g.models.is_empty() && !g.models.iter().any(|m| m.matches(model)))
            || (!g.api_keys.is_empty() && !g.api_keys.iter().any(|k| k == api_key_id));
        if scoped_out {
            continue;
        }
        if matches!(g.hook_point, HookPoint::Input | HookPoint::Both) {
            found.input.push(g.clone());
        }
        if matches!(g.hook_point, HookPoint::Output | HookPoint::Both) {
            found.output.push(g.clone());
        }
    }
    found
}

/// Checks `text`: the first blocking guardrail that matches refuses; monitoring ones
/// that match are logged.
pub fn scan(
    guardrails: &[Arc<Guardrail>],
    text: &str,
    stage: Stage,
    request_id: &str,
) -> Result<(), ProxyError> {
    if guardrails.is_empty() || text.is_empty() {
        return Ok(());
    }
    let lower = text.to_lowercase();
    for g in guardrails {
        if !g.patterns.iter().any(|p| matches(p, text, &lower)) {
            continue;
        }
        if g.block {
            warn!(request_id, guardrail = %g.name, stage = stage.as_str(), "blocked by guardrail");
            return Err(ProxyError::ContentFiltered {
                guardrail: g.name.clone(),
                stage: stage.as_str(),
            });
        }
        warn!(request_id, guardrail = %g.name, stage = stage.as_str(), "guardrail matched (monitor mode: allowed)");
    }
    Ok(())
}

/// Checks a whole answer (see [`answer_text`]).
pub fn check_answer(
    guardrails: &[Arc<Guardrail>],
    body: &[u8],
    request_id: &str,
) -> Result<(), ProxyError> {
    if guardrails.is_empty() {
        return Ok(());
    }
    scan(guardrails, &answer_text(body), Stage::Output, request_id)
}

fn matches(pattern: &GuardrailPattern, text: &str, lower: &str) -> bool {
    match pattern {
        GuardrailPattern::Literal(literal) => lower.contains(&literal.to_lowercase()),
        GuardrailPattern::Regex(re) => re.is_match(text),
    }
}

/// The text a request sends to the model: for chat completions and messages, the
/// `system` prompt and the text of every message (string contents, text parts, tool
/// results); for other routes, every string of the body but `model`.
pub fn request_text(body: &RequestBody<'_>, conversational: bool) -> String {
    let mut text = String::new();
    if !conversational {
        for (name, value) in body.fields() {
            if name != "model"
                && let Ok(value) = serde_json::from_str::<Value>(value.get())
            {
                strings_of(&value, &mut text);
            }
        }
        return text;
    }
    let parse = |name| {
        body.field(name)
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
    };
    if let Some(system) = parse("system") {
        content_text(&system, &mut text);
    }
    for message in parse("messages")
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(content) = message.get("content") {
            content_text(content, &mut text);
        }
    }
    text
}

/// The text of a body the proxy does not interpret (passthrough): every string of a
/// JSON body, or the body itself as text. A JSON body nested past
/// [`body::MAX_DEPTH`] is refused rather than scanned in part.
pub fn raw_body_text(bytes: &[u8]) -> Result<String, ProxyError> {
    if body::nests_deeper(bytes, body::MAX_DEPTH) {
        return Err(ProxyError::invalid_request(
            format!(
                "request body nests arrays and objects deeper than {} levels",
                body::MAX_DEPTH
            ),
            None,
        ));
    }
    let mut text = String::new();
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => strings_of(&value, &mut text),
        Err(_) => text.push_str(&String::from_utf8_lossy(bytes)),
    }
    Ok(text)
}

/// A string, or the `text` of parts (and the content of tool results), one per line.
fn content_text(content: &Value, text: &mut String) {
    match content {
        Value::String(s) => push_line(text, s),
        Value::Array(parts) => {
            for part in parts {
                if let Some(s) = part.get("text").and_then(Value::as_str) {
                    push_line(text, s);
                }
                if part.get("type").and_then(Value::as_str) == Some("tool_result")
                    && let Some(inner) = part.get("content")
                {
                    content_text(inner, text);
                }
            }
        }
        _ => {}
    }
}

fn strings_of(value: &Value, text: &mut String) {
    match value {
        Value::String(s) => push_line(text, s),
        Value::Array(items) => items.iter().for_each(|v| strings_of(v, text)),
        Value::Object(map) => map.values().for_each(|v| strings_of(v, text)),
        _ => {}
    }
}

/// The generated text of an answer or of one stream event, whatever its shape: OpenAI
/// chat (`choices[].message.content`, `choices[].delta.content`), completions
/// (`choices[].text`), Anthropic (`content[].text`, a `text_delta`), responses
/// (`output[].content[].text`, `response.output_text.delta`).
pub fn answer_text(body: &[u8]) -> String {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let mut text = String::new();
    let mut add = |v: Option<&Value>| {
        if let Some(s) = v.and_then(Value::as_str) {
            text.push_str(s);
        }
    };
    for choice in answer
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add(choice.pointer("/message/content"));
        add(choice.pointer("/delta/content"));
        add(choice.get("text"));
    }
    for block in answer
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add(block.get("text"));
    }
    for item in answer
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for part in item
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            add(part.get("text"));
        }
    }
    match answer.get("type").and_then(Value::as_str) {
        Some("content_block_delta") => add(answer.pointer("/delta/text")),
        Some("response.output_text.delta") => add(answer.get("delta")),
        _ => {}
    }
    text
}

fn push_line(text: &mut String, line: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(line);
}

/// Output guardrails on a server-sent-event stream: each run of complete events is
/// checked on the text accumulated so far. A block replaces the offending events with
/// an error event in the caller's format, and the response is aborted after it.
pub struct StreamGuard {
    guardrails: Vec<Arc<Guardrail>>,
    request_id: Arc<str>,
    envelope: Envelope,
    text: String,
}

impl StreamGuard {
    pub fn new(guardrails: Vec<Arc<Guardrail>>, request_id: Arc<str>, envelope: Envelope) -> Self {
        Self {
            guardrails,
            request_id,
            envelope,
            text: String::new(),
        }
    }

    pub fn check(&mut self, events: Bytes) -> Filtered {
        for data in data_lines(&events) {
            let delta = answer_text(data);
            if delta.is_empty() {
                continue;
            }
            self.text.push_str(&delta);
            if let Err(e) = scan(
                &self.guardrails,
                &self.text,
                Stage::Output,
                &self.request_id,
            ) {
                return Filtered::Abort(stream_error_event(&e, self.envelope));
            }
        }
        Filtered::Send(events)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::resources::spec::GuardrailSpec;

    fn guardrail(json: serde_json::Value) -> Arc<Guardrail> {
        let spec: GuardrailSpec = serde_json::from_value(json).unwrap();
        Arc::new(Guardrail::from_spec("g", spec).unwrap())
    }

    #[test]
    fn literals_ignore_case_regexes_do_not_and_monitor_only_logs() {
        let block = guardrail(serde_json::json!({"name": "secrets", "patterns": [
            {"kind": "literal", "value": "Project X"}, {"kind": "regex", "value": "\\bsk-[a-z0-9]{8}\\b"}]}));
        let err = scan(
            std::slice::from_ref(&block),
            "tell me about PROJECT x",
            Stage::Input,
            "r",
        )
        .unwrap_err();
        assert_eq!(err.class().status, 422);
        assert_eq!(err.class().kind, "content_filter");
        assert_eq!(
            err.to_string(),
            "the input was blocked by guardrail 'secrets'"
        );
        assert!(
            scan(
                std::slice::from_ref(&block),
                "key sk-abcdef12 here",
                Stage::Output,
                "r"
            )
            .is_err()
        );
        assert!(
            scan(
                std::slice::from_ref(&block),
                "key SK-ABCDEF12 here",
                Stage::Output,
                "r"
            )
            .is_ok()
        );
        assert!(scan(&[block], "nothing to see", Stage::Input, "r").is_ok());
        let monitor = guardrail(
            serde_json::json!({"name": "watch", "enforcement_mode": "monitor",
            "patterns": [{"value": "project x"}]}),
        );
        assert!(scan(&[monitor], "project x", Stage::Input, "r").is_ok());
    }

    #[test]
    fn request_and_answer_text() {
        let chat = br#"{"model":"m","messages":[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}}]},{"role":"assistant","content":null}]}"#;
        let body = RequestBody::parse(chat).unwrap();
        assert_eq!(request_text(&body, true), "be nice\nhello");
        let messages = br#"{"model":"m","system":[{"type":"text","text":"sys"}],"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"result"}]},{"type":"text","text":"more"}]}]}"#;
        let body = RequestBody::parse(messages).unwrap();
        assert_eq!(request_text(&body, true), "sys\nresult\nmore");
        let embeddings =
            br#"{"model":"secret-model","input":["one",{"nested":"two"}],"dimensions":3}"#;
        let body = RequestBody::parse(embeddings).unwrap();
        assert_eq!(request_text(&body, false), "one\ntwo");
        let answers: [&[u8]; 6] = [
            br#"{"choices":[{"message":{"role":"assistant","content":"hi there"}}]}"#,
            br#"{"choices":[{"delta":{"content":"hi there"}}]}"#,
            br#"{"choices":[{"text":"hi there"}]}"#,
            br#"{"content":[{"type":"text","text":"hi there"}]}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi there"}}"#,
            br#"{"output":[{"type":"message","content":[{"type":"output_text","text":"hi there"}]}]}"#,
        ];
        for answer in answers {
            assert_eq!(answer_text(answer), "hi there");
        }
    }

    #[test]
    fn a_stream_is_blocked_on_text_split_across_events() {
        let g = guardrail(
            serde_json::json!({"name": "words", "patterns": [{"kind": "regex", "value": "mock\\s+provider"}]}),
        );
        let mut guard = StreamGuard::new(vec![g], "r".into(), Envelope::OpenAi);
        let event = |text: &str| {
            Bytes::from(format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
            ))
        };
        let Filtered::Send(first) = guard.check(event("Hello from the mock")) else {
            panic!("blocked too early")
        };
        assert!(!first.is_empty());
        let Filtered::Abort(error) = guard.check(event(" provider.")) else {
            panic!("not blocked")
        };
        let error = String::from_utf8(error.to_vec()).unwrap();
        assert!(error.starts_with("data: {\"error\""), "{error}");
        assert!(error.contains("content_filter") && error.contains("words"));
        assert!(
            !error.contains("provider"),
            "the matched text is not echoed"
        );
    }
}
