//! Admit: who is calling, what they sent, and whether policy lets it through. The
//! caller key, the body (type, size, form or JSON), the model alias, access (the key's
//! allow list, the model's client addresses), input guardrails, rate limits and the
//! budget gate, in that order; the first refusal is the answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::state::{Call, Inner, ProxyOptions, client_ip};
use crate::failure::{Envelope, ProxyError};
use crate::formats::body::RequestBody;
use crate::formats::endpoint::Endpoint;
use crate::formats::multipart::{self, Form};
use crate::hooks::Verdict;
use crate::observe::record::Record;
use crate::policy::guardrails::{self, Applicable, Stage, Subject};
use crate::policy::ratelimit::{self, Denied, Lease, Scope};
use crate::resources::{ApiKey, KeyHash, Model, RateLimit};
use crate::snapshot::Snapshot;

/// A call that policy let through.
pub(super) struct Admitted<'s> {
    pub caller: &'s ApiKey,
    pub model: &'s Arc<Model>,
    /// The output guardrails to apply to the answer (input ones have passed).
    pub guards: Applicable,
    /// The body as the input guardrails masked it, when they did.
    pub masked: Option<Bytes>,
    /// Held until the answer ends: concurrency slots, and the token charge.
    pub lease: Option<Lease>,
    /// `x-ratelimit-*` of the caller key's limits, sent with the answer.
    pub quota_headers: HeaderMap,
}

/// The body as read: the bytes sent, and for a form its parsed parts and text fields.
pub(super) struct Read {
    pub bytes: Bytes,
    pub form: Option<Form>,
    /// What routing reads: the JSON body, or a form's text fields as JSON.
    fields: Bytes,
}

impl Read {
    /// A JSON body the input guardrails rewrote.
    pub fn masked(bytes: Bytes) -> Self {
        Self {
            fields: bytes.clone(),
            bytes,
            form: None,
        }
    }

    /// The request's routing fields; a conversation must carry `messages`.
    pub fn parse(&self, endpoint: Endpoint) -> Result<RequestBody<'_>, ProxyError> {
        let request = RequestBody::shared(&self.fields)?;
        if endpoint.has_messages() {
            request.require_nonempty_array("messages")?;
        }
        Ok(request)
    }
}

/// Reads the body of a model-routed call. A form (audio, images) is routed by its text
/// fields and sent on as a form; a body of a type the endpoint does not read is
/// refused before it is read.
pub(super) async fn read(
    state: &Inner,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
) -> Result<Read, ProxyError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let forms = !endpoint.has_messages();
    check_content_type(content_type, forms)?;
    let bytes = read_body(body, headers, &state.options).await?;
    if forms && multipart::is_form(content_type) {
        let form = Form::parse(bytes.clone(), content_type.unwrap_or_default()).await?;
        let fields = Bytes::from(form.text_fields_json());
        return Ok(Read {
            bytes,
            form: Some(form),
            fields,
        });
    }
    Ok(Read {
        fields: bytes.clone(),
        bytes,
        form: None,
    })
}

/// The alias, access, input guardrails, rate limits and budget of an authenticated
/// call.
pub(super) async fn admit<'s>(
    state: &Inner,
    snapshot: &'s Snapshot,
    call: &Call,
    caller: &'s ApiKey,
    peer: SocketAddr,
    headers: &HeaderMap,
    request: &RequestBody<'_>,
) -> Result<Admitted<'s>, ProxyError> {
    let model = snapshot
        .model(&request.model)
        .ok_or_else(|| ProxyError::ModelNotFound(request.model.clone()))?;
    call.record.model(&model.name);
    if !caller.allows(&model.name) {
        return Err(ProxyError::PermissionDenied(format!(
            "this API key may not use model '{}'",
            model.name
        )));
    }
    let client = client_ip(peer.ip(), headers, &state.options);
    call.record.client(client);
    if !model.admits(client) {
        return Err(ProxyError::PermissionDenied(format!(
            "client address {client} may not use model '{}'",
            model.name
        )));
    }
    let guards = guardrails::applicable(snapshot, &subject(model, caller, None));
    let mut masked = None;
    if !guards.input.is_empty() {
        let started = call.record.clock();
        let chain = call.guardrails(&guards.input, Stage::Input, state);
        let checked = chain.request(request).await;
        let outcome = match &checked {
            Ok(None) => "passed",
            Ok(Some(_)) => "masked",
            Err(_) => "blocked",
        };
        call.record.step("aisix.guardrails.input", started, outcome);
        masked = checked?;
    }
    // Only a token window holds the estimate: no scan of the body otherwise.
    let counts_tokens = |l: &RateLimit| l.tpm.is_some() || l.tpd.is_some();
    let reserve = if counts_tokens(&caller.rate_limit) || counts_tokens(&model.rate_limit) {
        token_estimate(request)
    } else {
        0
    };
    let lease = limits_and_budget(state, &call.record, caller, Some(model), reserve).await?;
    let quota_headers = lease.as_ref().map(quota_headers).unwrap_or_default();
    Ok(Admitted {
        caller,
        model,
        guards,
        masked,
        lease,
        quota_headers,
    })
}

/// What guardrail attachments and scopes match a call on.
pub(super) fn subject<'a>(
    model: &'a Model,
    caller: &'a ApiKey,
    passthrough: Option<&'a str>,
) -> Subject<'a> {
    Subject {
        model_id: &model.id,
        model: &model.name,
        api_key_id: &caller.id,
        team_id: caller.team_id.as_deref(),
        passthrough,
    }
}

/// Counts the request against the caller key's (and the model's) rate limits, then
/// asks the budget gate. The lease is held until the answer ends.
pub(super) async fn limits_and_budget(
    state: &Inner,
    record: &Record,
    caller: &ApiKey,
    model: Option<&Model>,
    reserve: u64,
) -> Result<Option<Lease>, ProxyError> {
    let started = record.clock();
    let lease = rate_limits(state, caller, model, reserve).await;
    match &lease {
        Ok(None) => {}
        Ok(Some(_)) => record.step("aisix.rate_limit", started, "admitted"),
        Err(ProxyError::RateLimiterUnavailable) => {
            record.step("aisix.rate_limit", started, "unavailable");
        }
        Err(_) => record.step("aisix.rate_limit", started, "limited"),
    }
    let lease = lease?;
    if let Some(gate) = &state.hooks.budget {
        let started = record.clock();
        let verdict = gate.check(&caller.id).await;
        let denied = matches!(verdict, Verdict::Deny(_));
        record.step(
            "aisix.budget",
            started,
            if denied { "denied" } else { "allowed" },
        );
        if let Verdict::Deny(denial) = verdict {
            return Err(ProxyError::BudgetDenied(denial));
        }
    }
    Ok(lease)
}

/// What a request may cost in tokens before its answer says: about a token per four
/// bytes of body, plus the most output it asks for. Shared token windows hold it while
/// the request is in flight, so replicas see each other's requests at once.
pub(super) fn token_estimate(request: &RequestBody<'_>) -> u64 {
    let output = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|name| {
            request
                .field(name)
                .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
        })
        .unwrap_or(0);
    (request.size as u64).div_ceil(4).saturating_add(output)
}

async fn rate_limits(
    state: &Inner,
    caller: &ApiKey,
    model: Option<&Model>,
    reserve: u64,
) -> Result<Option<Lease>, ProxyError> {
    let unlimited = RateLimit::default();
    let mut scopes = Vec::new();
    if caller.rate_limit != unlimited {
        scopes.push((Scope::ApiKey(caller.id.clone()), caller.rate_limit.clone()));
    }
    if let Some(model) = model.filter(|m| m.rate_limit != unlimited) {
        scopes.push((Scope::Model(model.name.clone()), model.rate_limit.clone()));
    }
    if scopes.is_empty() {
        return Ok(None);
    }
    match state.limiter.admit(scopes, reserve).await {
        Ok(lease) => Ok(Some(lease)),
        Err(Denied::Limited(refusal)) => {
            state
                .hooks
                .metrics
                .record_ratelimit_rejection(refusal.scope);
            Err(ProxyError::RateLimited {
                message: refusal.message,
                retry_after: refusal.retry_after_secs,
            })
        }
        Err(Denied::Unavailable) => Err(ProxyError::RateLimiterUnavailable),
    }
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the caller key's limits.
fn quota_headers(lease: &Lease) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (family, quota) in [("requests", lease.requests), ("tokens", lease.tokens)] {
        let Some(quota) = quota else { continue };
        for (name, value) in [
            ("limit", quota.limit.to_string()),
            ("remaining", quota.remaining.to_string()),
            ("reset", ratelimit::format_reset(quota.reset_ms)),
        ] {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(format!("x-ratelimit-{name}-{family}").as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
    }
    headers
}

/// Finds the caller's key and checks it is usable. OpenAI-style routes read
/// `Authorization: Bearer <key>`; Anthropic-style routes (and passthrough) also accept
/// `x-api-key: <key>`, which wins when both are sent.
pub fn authenticate<'s>(
    snapshot: &'s Snapshot,
    headers: &HeaderMap,
    envelope: Envelope,
) -> Result<&'s ApiKey, ProxyError> {
    // Before the first snapshot every key would look unknown: say what is true instead.
    if snapshot.revision == 0 {
        return Err(ProxyError::NotReady);
    }
    let header_value = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty())
    };
    let bearer = header_value(header::AUTHORIZATION.as_str()).and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim)
    });
    let presented = match envelope {
        Envelope::Anthropic => header_value("x-api-key").or(bearer),
        Envelope::OpenAi => bearer,
    };
    let Some(plaintext) = presented.filter(|k| !k.is_empty()) else {
        return Err(ProxyError::InvalidApiKey(match envelope {
            Envelope::OpenAi if headers.contains_key("x-api-key") => {
                "this route reads the API key from 'Authorization: Bearer <key>', not x-api-key"
            }
            Envelope::OpenAi => "missing API key: send 'Authorization: Bearer <key>'",
            Envelope::Anthropic => {
                "missing API key: send 'x-api-key: <key>' or 'Authorization: Bearer <key>'"
            }
        }));
    };
    let key = snapshot
        .api_key(&KeyHash::of_plaintext(plaintext))
        .ok_or(ProxyError::InvalidApiKey("invalid API key"))?;
    if key.disabled {
        return Err(ProxyError::InactiveApiKey {
            message: "this API key is disabled",
            code: "api_key_disabled",
        });
    }
    if key.is_expired(SystemTime::now()) {
        return Err(ProxyError::InactiveApiKey {
            message: "this API key has expired",
            code: "api_key_expired",
        });
    }
    Ok(key)
}

/// JSON bodies (`application/json`, `*/*+json`, or no type at all) everywhere, forms
/// where `forms`. `application/x-www-form-urlencoded` is read as JSON too: it is what
/// `curl -d` declares when the caller does not say.
fn check_content_type(content_type: Option<&str>, forms: bool) -> Result<(), ProxyError> {
    let Some(declared) = content_type else {
        return Ok(());
    };
    let essence = declared
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || essence == "application/x-www-form-urlencoded"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json || (forms && essence == "multipart/form-data") {
        return Ok(());
    }
    let expected = if forms {
        "application/json or multipart/form-data"
    } else {
        "application/json"
    };
    Err(ProxyError::UnsupportedMediaType(format!(
        "Content-Type '{}' is not supported here: send {expected}",
        declared.chars().take(100).collect::<String>()
    )))
}

/// Reads the whole body, refusing more than `limit` bytes (by Content-Length up front,
/// and while reading for chunked bodies).
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    options: &ProxyOptions,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limit = options.body_limit;
    if let Some(limit) = limit
        && declared.is_some_and(|n| n > limit as u64)
    {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let allowed = options.body_read_timeout
        + Duration::from_secs(declared.unwrap_or(0) / options.min_body_rate.max(1));
    // Into one buffer of the declared size: the body is held once, never as frames
    // and their concatenation side by side.
    let mut body = Limited::new(body, limit.unwrap_or(usize::MAX));
    let read = async move {
        let expected = declared.unwrap_or(0).min(PRESIZE_AT_MOST as u64) as usize;
        let mut bytes = BytesMut::with_capacity(expected);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| match (e.downcast_ref::<LengthLimitError>(), limit) {
                (Some(_), Some(limit)) => ProxyError::BodyTooLarge { limit },
                _ => unreadable_body(),
            })?;
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        Ok(bytes.freeze())
    };
    tokio::time::timeout(allowed, read)
        .await
        .map_err(|_| ProxyError::BodyReadTimeout {
            millis: allowed.as_millis(),
        })?
}

/// The most room reserved up front for a body from its `Content-Length` (a larger one
/// grows the buffer as it arrives, so a false length reserves no more than this).
const PRESIZE_AT_MOST: usize = 64 * 1024 * 1024;

fn unreadable_body() -> ProxyError {
    ProxyError::invalid_request("failed to read the request body", None)
}
