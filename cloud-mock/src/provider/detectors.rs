//! Guardrail detector services, imitated closely enough to test the agent's clients
//! against: the request shapes the services document, answers in theirs, verdicts
//! scripted by markers in the text.
//!
//! | service | route | flags text that contains |
//! |---|---|---|
//! | Presidio analyzer | `POST /analyze` | e-mail addresses (`EMAIL_ADDRESS`, score 0.95), `John Smith` (`PERSON`, 0.85) |
//! | Presidio anonymizer | `POST /anonymize` | applies `analyzer_results` with the `DEFAULT` operator (`replace`: `<TYPE>`, `mask`: `*`s, `redact`, `hash`) |
//! | OpenAI moderation | `POST /v1/moderations` (Bearer) | `[violence]` (0.91), `[hate]` (0.72), `[self-harm]` (0.66); `flagged` at 0.5 |
//! | Lakera Guard | `POST /v2/guard` (Bearer) | `[injection]`, `ignore previous instructions` |
//! | Azure Prompt Shield | `POST /contentsafety/text:shieldPrompt` (`Ocp-Apim-Subscription-Key`) | the same, in `userPrompt` or `documents` |
//! | Azure text moderation | `POST /contentsafety/text:analyze` (the key) | `[violence]` (Violence 4), `[hate]` (Hate 2); `[blocked]` matches the first of `blocklistNames` |
//! | Bedrock ApplyGuardrail | `POST /guardrail/{id}/version/{version}/apply` (Signature V4, as the Bedrock mock checks) | `[block]`: blocked; e-mail addresses: anonymized to `{EMAIL}` |
//!
//! `PUT /_mock/detectors` `{"status": 503, "delay_ms": 2000}` makes every detector
//! answer that status after that delay (an outage, a slow detector); `GET` counts the
//! calls per route.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{SharedState, lock};

/// How every detector answers (faults), and the calls each route had.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorScript {
    /// 0 or 200: answer normally.
    pub status: u16,
    pub delay_ms: u64,
}

#[derive(Debug, Default)]
pub struct Detectors {
    pub(super) script: DetectorScript,
    calls: BTreeMap<String, u64>,
}

pub(super) async fn set_script(
    State(shared): State<SharedState>,
    axum::Json(script): axum::Json<DetectorScript>,
) -> StatusCode {
    lock(&shared).detectors.script = script;
    StatusCode::NO_CONTENT
}

pub(super) async fn calls(State(shared): State<SharedState>) -> axum::Json<BTreeMap<String, u64>> {
    axum::Json(lock(&shared).detectors.calls.clone())
}

/// Counts the call, waits the scripted delay; `Err` is the scripted failure.
async fn arrive(shared: &SharedState, route: &str) -> Result<(), Response> {
    let script = {
        let mut s = lock(shared);
        *s.detectors.calls.entry(route.to_owned()).or_default() += 1;
        s.detectors.script.clone()
    };
    if script.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(script.delay_ms)).await;
    }
    if matches!(script.status, 0 | 200) {
        return Ok(());
    }
    let status = StatusCode::from_u16(script.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Err((
        status,
        axum::Json(json!({"error": {"message": "scripted failure"}})),
    )
        .into_response())
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": {"message": "missing or invalid credentials"}})),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7)
}

fn subscription_key(headers: &HeaderMap) -> bool {
    headers
        .get("ocp-apim-subscription-key")
        .is_some_and(|v| !v.is_empty())
}

fn injected(text: &str) -> bool {
    let lower = text.to_lowercase();
    lower.contains("[injection]") || lower.contains("ignore previous instructions")
}

/// E-mail addresses in `text`: (start, end) in characters, as Presidio counts.
fn emails(text: &str) -> Vec<(usize, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let word = |c: char| c.is_alphanumeric() || "._%+-@".contains(c);
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !word(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && word(chars[i]) {
            i += 1;
        }
        let mut end = i;
        while end > start && chars[end - 1] == '.' {
            end -= 1;
        }
        let token: String = chars[start..end].iter().collect();
        if let Some((user, domain)) = token.split_once('@')
            && !user.is_empty()
            && domain.contains('.')
            && !domain.ends_with('.')
        {
            found.push((start, end));
        }
    }
    found
}

pub(super) async fn analyze(
    State(shared): State<SharedState>,
    axum::Json(request): axum::Json<Value>,
) -> Response {
    if let Err(failed) = arrive(&shared, "presidio_analyze").await {
        return failed;
    }
    let text = request.get("text").and_then(Value::as_str).unwrap_or("");
    let wanted: Option<Vec<&str>> = request
        .get("entities")
        .and_then(Value::as_array)
        .map(|e| e.iter().filter_map(Value::as_str).collect());
    let threshold = request
        .get("score_threshold")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let mut hits: Vec<Value> = emails(text)
        .into_iter()
        .map(|(start, end)| json!({"entity_type": "EMAIL_ADDRESS", "start": start, "end": end, "score": 0.95}))
        .collect();
    if let Some(at) = text.find("John Smith") {
        let start = text[..at].chars().count();
        hits.push(
            json!({"entity_type": "PERSON", "start": start, "end": start + 10, "score": 0.85}),
        );
    }
    hits.retain(|h| {
        let entity = h["entity_type"].as_str().unwrap_or("");
        wanted.as_ref().is_none_or(|w| w.contains(&entity))
            && h["score"].as_f64().unwrap_or(0.0) >= threshold
    });
    axum::Json(Value::Array(hits)).into_response()
}

pub(super) async fn anonymize(
    State(shared): State<SharedState>,
    axum::Json(request): axum::Json<Value>,
) -> Response {
    if let Err(failed) = arrive(&shared, "presidio_anonymize").await {
        return failed;
    }
    let text: Vec<char> = request
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or("")
        .chars()
        .collect();
    let operator = request
        .pointer("/anonymizers/DEFAULT/type")
        .and_then(Value::as_str)
        .unwrap_or("replace");
    let mut results: Vec<(usize, usize, String)> = request
        .get("analyzer_results")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r.get("start")?.as_u64()? as usize,
                r.get("end")?.as_u64()? as usize,
                r.get("entity_type")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    results.sort();
    let mut out = String::new();
    let mut at = 0;
    for (start, end, entity) in results {
        if start < at || end > text.len() {
            continue;
        }
        out.extend(&text[at..start]);
        match operator {
            "mask" => out.extend(std::iter::repeat_n('*', end - start)),
            "redact" => {}
            "hash" => out.push_str(&format!("{:016x}", fnv(&text[start..end]))),
            _ => out.push_str(&format!("<{entity}>")),
        }
        at = end;
    }
    out.extend(&text[at..]);
    axum::Json(json!({"text": out, "items": []})).into_response()
}

fn fnv(chars: &[char]) -> u64 {
    chars.iter().fold(0xcbf2_9ce4_8422_2325, |h, c| {
        (h ^ u64::from(*c)).wrapping_mul(0x100_0000_01b3)
    })
}

const CATEGORIES: [(&str, &str, f64); 3] = [
    ("[violence]", "violence", 0.91),
    ("[hate]", "hate", 0.72),
    ("[self-harm]", "self-harm", 0.66),
];

pub(super) async fn moderations(
    State(shared): State<SharedState>,
    headers: HeaderMap,
    axum::Json(request): axum::Json<Value>,
) -> Response {
    if let Err(failed) = arrive(&shared, "openai_moderation").await {
        return failed;
    }
    if !bearer(&headers) {
        return unauthorized();
    }
    let text = match request.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let mut categories = serde_json::Map::new();
    let mut scores = serde_json::Map::new();
    for (marker, name, score) in CATEGORIES {
        let score = if text.contains(marker) { score } else { 0.001 };
        categories.insert(name.into(), json!(score >= 0.5));
        scores.insert(name.into(), json!(score));
    }
    let flagged = categories.values().any(|v| v == &json!(true));
    let model = request
        .get("model")
        .cloned()
        .unwrap_or(json!("omni-moderation-latest"));
    axum::Json(json!({"id": "modr-mock", "model": model,
        "results": [{"flagged": flagged, "categories": categories, "category_scores": scores}]}))
    .into_response()
}

pub(super) async fn lakera(
    State(shared): State<SharedState>,
    headers: HeaderMap,
    axum::Json(request): axum::Json<Value>,
) -> Response {
    if let Err(failed) = arrive(&shared, "lakera").await {
        return failed;
    }
    if !bearer(&headers) {
        return unauthorized();
    }
    let flagged = request
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .any(injected);
    axum::Json(json!({"flagged": flagged, "metadata": {"request_uuid": "mock"}})).into_response()
}

pub(super) async fn shield_prompt(
    State(shared): State<SharedState>,
    headers: HeaderMap,
    axum::Json(request): axum::Json<Value>,
) -> Response {
    if let Err(failed) = arrive(&shared, "azure_prompt_shield").await {
        return failed;
    }
    if !subscription_key(&headers) {
        return unauthorized();
    }
    let prompt = request
        .get("userPrompt")
        .and_then(Value::as_str)
        .unwrap_or("");
    let documents: Vec<Value> = request
        .get("documents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|d| json!({"attackDetected": d.as_str().is_some_and(injected)}))
        .collect();
    axum::Json(
        json!({"userPromptAnalysis": {"attackDetected": injected(prompt)},
        "documentsAnalysis": documents}),
    )
    .into_response()
}

pub(super) async fn analyze_text(
    State(shared): State<SharedState>,
    headers: HeaderMap,
    axum::Json(request): axum::Json<Value>,
) -> Response {
    if let Err(failed) = arrive(&shared, "azure_text_moderation").await {
        return failed;
    }
    if !subscription_key(&headers) {
        return unauthorized();
    }
    let text = request.get("text").and_then(Value::as_str).unwrap_or("");
    let wanted: Vec<&str> = request
        .get("categories")
        .and_then(Value::as_array)
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_else(|| vec!["Hate", "SelfHarm", "Sexual", "Violence"]);
    let severity = |category: &str| match category {
        "Violence" if text.contains("[violence]") => 4,
        "Hate" if text.contains("[hate]") => 2,
        _ => 0,
    };
    let analysis: Vec<Value> = wanted
        .iter()
        .map(|c| json!({"category": c, "severity": severity(c)}))
        .collect();
    let blocklist = request
        .get("blocklistNames")
        .and_then(Value::as_array)
        .and_then(|b| b.first())
        .and_then(Value::as_str);
    let matches: Vec<Value> = match blocklist {
        Some(name) if text.contains("[blocked]") => {
            vec![
                json!({"blocklistName": name, "blocklistItemId": "1", "blocklistItemText": "[blocked]"}),
            ]
        }
        _ => Vec::new(),
    };
    axum::Json(json!({"blocklistsMatch": matches, "categoriesAnalysis": analysis})).into_response()
}

pub(super) async fn apply_guardrail(
    State(shared): State<SharedState>,
    Path((_id, _version)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if let Err((status, kind, message)) =
        super::bedrock::verify(&parts.method, &parts.uri, &parts.headers, &body)
    {
        return super::bedrock::refusal(status, kind, message);
    }
    if let Err(failed) = arrive(&shared, "bedrock_apply_guardrail").await {
        return failed;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let texts: Vec<String> = request
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            c.pointer("/text/text")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    if texts.iter().any(|t| t.contains("[block]")) {
        return axum::Json(json!({"action": "GUARDRAIL_INTERVENED",
            "outputs": [{"text": "Sorry, the model cannot answer this."}],
            "assessments": [{"contentPolicy": {"filters": [
                {"type": "VIOLENCE", "confidence": "HIGH", "action": "BLOCKED"}]}}],
            "usage": {"contentPolicyUnits": 1}}))
        .into_response();
    }
    let masked: Vec<String> = texts
        .iter()
        .map(|t| {
            let chars: Vec<char> = t.chars().collect();
            let mut out = String::new();
            let mut at = 0;
            for (start, end) in emails(t) {
                out.extend(&chars[at..start]);
                out.push_str("{EMAIL}");
                at = end;
            }
            out.extend(&chars[at..]);
            out
        })
        .collect();
    if masked == texts {
        return axum::Json(json!({"action": "NONE", "outputs": [], "assessments": [{}]}))
            .into_response();
    }
    let outputs: Vec<Value> = masked.iter().map(|t| json!({"text": t})).collect();
    axum::Json(json!({"action": "GUARDRAIL_INTERVENED", "outputs": outputs,
        "assessments": [{"sensitiveInformationPolicy": {"piiEntities": [
            {"type": "EMAIL", "action": "ANONYMIZED"}]}}]}))
    .into_response()
}
