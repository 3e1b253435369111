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
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::warn;

use crate::error::ProxyError;
use crate::resources::{Guardrail, GuardrailPattern, HookPoint};
use crate::snapshot::Snapshot;
use crate::sse::{Filtered, data_lines};

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

/// Checks a whole chat-completions answer (its `choices[].message.content`).
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

/// The text of the caller's `messages`: string contents and the `text` of content
/// parts, one per line.
pub fn request_text(messages: Option<&RawValue>) -> String {
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<Content>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
        Other(serde::de::IgnoredAny),
    }
    #[derive(Deserialize)]
    struct Part {
        #[serde(default)]
        text: Option<String>,
    }
    let Some(messages) = messages else {
        return String::new();
    };
    let Ok(messages) = serde_json::from_str::<Vec<Message>>(messages.get()) else {
        return String::new();
    };
    let mut text = String::new();
    for content in messages.into_iter().filter_map(|m| m.content) {
        match content {
            Content::Text(t) => push_line(&mut text, &t),
            Content::Parts(parts) => {
                for t in parts.into_iter().filter_map(|p| p.text) {
                    push_line(&mut text, &t);
                }
            }
            Content::Other(_) => {}
        }
    }
    text
}

/// The text of a whole chat-completions answer (`choices[].message.content`).
pub fn answer_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        #[serde(default, alias = "delta")]
        message: Option<Message>,
    }
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<String>,
    }
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return String::new();
    };
    let mut text = String::new();
    for content in answer
        .choices
        .into_iter()
        .filter_map(|c| c.message?.content)
    {
        text.push_str(&content);
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
/// an OpenAI error event, which ends the stream.
pub struct StreamGuard {
    guardrails: Vec<Arc<Guardrail>>,
    request_id: Arc<str>,
    text: String,
}

impl StreamGuard {
    pub fn new(guardrails: Vec<Arc<Guardrail>>, request_id: Arc<str>) -> Self {
        Self {
            guardrails,
            request_id,
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
                return Filtered::End(error_event(&e));
            }
        }
        Filtered::Send(events)
    }
}

fn error_event(e: &ProxyError) -> Bytes {
    let class = e.class();
    let event = serde_json::json!({"error": {"message": e.to_string(), "type": class.kind}});
    Bytes::from(format!("data: {event}\n\n"))
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
        let messages = RawValue::from_string(
            r#"[{"role":"system","content":"be nice"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}}]},{"role":"assistant","content":null}]"#.to_owned(),
        )
        .unwrap();
        assert_eq!(request_text(Some(&messages)), "be nice\nhello");
        assert_eq!(
            answer_text(br#"{"choices":[{"message":{"role":"assistant","content":"hi there"}}]}"#),
            "hi there"
        );
    }

    #[test]
    fn a_stream_is_blocked_on_text_split_across_events() {
        let g = guardrail(
            serde_json::json!({"name": "words", "patterns": [{"kind": "regex", "value": "mock\\s+provider"}]}),
        );
        let mut guard = StreamGuard::new(vec![g], "r".into());
        let event = |text: &str| {
            Bytes::from(format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
            ))
        };
        let Filtered::Send(first) = guard.check(event("Hello from the mock")) else {
            panic!("blocked too early")
        };
        assert!(!first.is_empty());
        let Filtered::End(error) = guard.check(event(" provider.")) else {
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
