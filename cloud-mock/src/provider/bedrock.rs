//! AWS Bedrock's Converse shape: `POST /model/{model_id}/converse` and
//! `/model/{model_id}/converse-stream` (answered in the AWS event-stream binary
//! framing), `/model/{model_id}/invoke` on Titan and Cohere embedding models, every
//! request's Signature V4 checked for the mock's credentials
//! ([`ACCESS_KEY_ID`], [`SECRET_ACCESS_KEY`], service `bedrock`, any region, any
//! session token), Bedrock's error envelope (`{"message"}` with `x-amzn-ErrorType`),
//! tool calls as `toolUse` blocks, usage with cache reads and writes.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{SharedState, Usage, receive};

/// The access key the mock knows.
pub const ACCESS_KEY_ID: &str = "AKIAMOCKBEDROCK00001";
/// Its secret, which requests must be signed with.
pub const SECRET_ACCESS_KEY: &str = "mock/bedrock/secret+access/key000000000";
/// How far a request's signing time may be from the mock's clock, as AWS allows.
const MAX_SKEW: Duration = Duration::from_secs(300);

/// Bedrock's exception name for an error status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "ValidationException",
        403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        408 => "ModelTimeoutException",
        424 => "ModelErrorException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        _ => "InternalServerException",
    }
}

pub(super) fn refusal(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [
            ("x-amzn-errortype", kind),
            ("content-type", "application/json"),
        ],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

/// `POST /model/{model_id}/{action}`: Converse, whole or streamed.
pub(super) async fn converse(
    State(shared): State<SharedState>,
    Path((model, action)): Path<(String, String)>,
    request: Request,
) -> Response {
    let stream = match action.as_str() {
        "converse" => false,
        "converse-stream" => true,
        "invoke" => return invoke(shared, model, request).await,
        _ => {
            return refusal(
                StatusCode::NOT_FOUND,
                "UnknownOperationException",
                "unknown operation",
            );
        }
    };
    let call = match signed_call(&shared, model, request).await {
        Ok(call) => call,
        Err(refused) => return refused,
    };
    let status = call.status();
    if !status.is_success() {
        let mut refused = match &call.script.error_body {
            Some(body) => (status, body.clone()).into_response(),
            None => refusal(
                status,
                error_type(status),
                &format!("mock error {}", status.as_u16()),
            ),
        };
        refused.headers_mut().insert(
            "x-amzn-errortype",
            axum::http::HeaderValue::from_static(error_type(status)),
        );
        return refused;
    }
    let usage = call.script.usage.map(usage_of);
    let stop = call.script.finish_reason.clone().unwrap_or_else(|| {
        if call.script.tool_call.is_some() {
            "tool_use".to_owned()
        } else {
            "end_turn".to_owned()
        }
    });
    if !stream {
        let content = match &call.script.tool_call {
            Some(t) => {
                let input: Value = serde_json::from_str(&t.arguments).unwrap_or_else(|_| json!({}));
                json!([{"toolUse": {"toolUseId": t.id, "name": t.name, "input": input}}])
            }
            None => json!([{"text": call.content()}]),
        };
        let mut answer = json!({"output": {"message": {"role": "assistant", "content": content}},
                                "stopReason": stop, "metrics": {"latencyMs": 1}});
        if let Some(usage) = usage {
            answer["usage"] = usage;
        }
        return axum::Json(answer).into_response();
    }
    let mut events = vec![event_message("messageStart", &json!({"role": "assistant"}))];
    match &call.script.tool_call {
        Some(t) => {
            events.push(event_message(
                "contentBlockStart",
                &json!({"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": t.id, "name": t.name}}}),
            ));
            for piece in call.pieces() {
                events.push(event_message(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}}),
                ));
            }
        }
        None => {
            for piece in call.pieces() {
                events.push(event_message(
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"text": piece}}),
                ));
            }
        }
    }
    events.push(event_message(
        "contentBlockStop",
        &json!({"contentBlockIndex": 0}),
    ));
    events.push(event_message("messageStop", &json!({ "stopReason": stop })));
    let mut metadata = json!({"metrics": {"latencyMs": 1}});
    if let Some(usage) = usage {
        metadata["usage"] = usage;
    }
    events.push(event_message("metadata", &metadata));
    let error = exception_message("modelStreamErrorException", "mock stream error");
    super::framed_stream(
        events,
        &call.script,
        error,
        "application/vnd.amazon.eventstream",
    )
}

/// `POST /model/{model_id}/invoke` on an embedding model: Amazon Titan's
/// `{"inputText"}` -> `{"embedding", "inputTextTokenCount"}`, Cohere's `{"texts"}` ->
/// `{"embeddings": [[...]]}`.
async fn invoke(shared: SharedState, model: String, request: Request) -> Response {
    let call = match signed_call(&shared, model, request).await {
        Ok(call) => call,
        Err(refused) => return refused,
    };
    let status = call.status();
    if !status.is_success() {
        return refusal(
            status,
            error_type(status),
            &format!("mock error {}", status.as_u16()),
        );
    }
    if let Some(text) = call.request["inputText"].as_str() {
        let tokens = call.script.usage.map_or(0, |u| u.prompt_tokens);
        return axum::Json(json!({"embedding": super::openai::embed(text),
                                 "inputTextTokenCount": tokens}))
        .into_response();
    }
    if let Some(texts) = call.request["texts"].as_array() {
        let embeddings: Vec<Value> = texts
            .iter()
            .map(|t| json!(super::openai::embed(t.as_str().unwrap_or(""))))
            .collect();
        return axum::Json(
            json!({"id": "mock-embed", "embeddings": embeddings, "texts": texts,
                                 "response_type": "embeddings_floats"}),
        )
        .into_response();
    }
    refusal(
        StatusCode::BAD_REQUEST,
        "ValidationException",
        "Malformed input request: expected inputText or texts",
    )
}

/// A request whose signature holds, recorded with its script; or the refusal.
async fn signed_call(
    shared: &SharedState,
    model: String,
    request: Request,
) -> Result<super::Call, Response> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    verify(&parts.method, &parts.uri, &parts.headers, &body)
        .map_err(|(status, kind, message)| refusal(status, kind, message))?;
    Ok(receive(
        shared,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &body,
        Some(model),
    )
    .await)
}

/// Bedrock's usage: `inputTokens` without the cached parts reported beside it.
fn usage_of(u: Usage) -> Value {
    let input = u
        .prompt_tokens
        .saturating_sub(u.cache_read_tokens + u.cache_write_tokens);
    let mut usage = json!({"inputTokens": input, "outputTokens": u.completion_tokens,
                           "totalTokens": u.prompt_tokens + u.completion_tokens});
    if u.cache_read_tokens > 0 {
        usage["cacheReadInputTokens"] = u.cache_read_tokens.into();
    }
    if u.cache_write_tokens > 0 {
        usage["cacheWriteInputTokens"] = u.cache_write_tokens.into();
    }
    usage
}

/// Why a request's signature is refused: status, exception name, message.
type Refused = (StatusCode, &'static str, &'static str);

/// Checks the request's Signature V4 as AWS does: the mock's access key, service
/// `bedrock`, a signing time within five minutes, and the signature recomputed over
/// the headers it says it signed.
pub(super) fn verify(
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), Refused> {
    let missing = || {
        (
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        )
    };
    let mismatch = || {
        (
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
        )
    };
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let authorization = text("authorization").ok_or_else(missing)?;
    let fields = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(missing)?;
    let field = |name: &str| {
        fields
            .split(',')
            .map(str::trim)
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    };
    let (credential, signed, signature) = match (
        field("Credential"),
        field("SignedHeaders"),
        field("Signature"),
    ) {
        (Some(c), Some(h), Some(s)) => (c, h, s),
        _ => return Err(missing()),
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [key_id, _date, region, service, "aws4_request"] = scope[..] else {
        return Err(missing());
    };
    if key_id != ACCESS_KEY_ID {
        return Err((
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ));
    }
    if service != "bedrock" {
        return Err(mismatch());
    }
    let at = text("x-amz-date")
        .and_then(parse_amz_date)
        .ok_or_else(missing)?;
    let now = SystemTime::now();
    let skew = now
        .duration_since(at)
        .or_else(|e| Ok::<_, ()>(e.duration()));
    if skew.is_ok_and(|s| s > MAX_SKEW) {
        return Err((
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            "Signature expired: the request's signing time is too far from the server's clock.",
        ));
    }
    let session_token = text("x-amz-security-token").map(str::to_owned);
    let identity = Credentials::new(
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        session_token,
        None,
        "mock",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|_| mismatch())?
        .into();
    // The headers the client signed, but those the signer adds itself.
    let names: Vec<&str> = signed.split(';').collect();
    let signed_headers = names
        .iter()
        .filter(|n| !matches!(**n, "x-amz-date" | "x-amz-security-token"))
        .map(|n| Ok((*n, text(n).ok_or(())?)))
        .collect::<Result<Vec<_>, ()>>()
        .map_err(|()| mismatch())?;
    let host = text("host").ok_or_else(missing)?;
    let url = format!(
        "http://{host}{}",
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let signable = SignableRequest::new(
        method.as_str(),
        url,
        signed_headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|_| mismatch())?;
    let (instructions, expected) = sign(signable, &params)
        .map_err(|_| mismatch())?
        .into_parts();
    let recomputed_headers = instructions
        .headers()
        .find(|(n, _)| *n == "authorization")
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let same_headers = recomputed_headers.contains(&format!("SignedHeaders={signed},"));
    if expected != signature || !same_headers {
        return Err(mismatch());
    }
    Ok(())
}

/// `x-amz-date`: `YYYYMMDD'T'HHMMSS'Z'`.
fn parse_amz_date(text: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let at = time::PrimitiveDateTime::parse(text, format)
        .ok()?
        .assume_utc();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at.unix_timestamp()).ok()?))
}

/// One event-stream message as Bedrock frames it: `:message-type` `event`, its
/// `:event-type` and content type, and a JSON payload.
pub fn event_message(event_type: &str, payload: &Value) -> Bytes {
    framed(
        Message::new(payload.to_string().into_bytes())
            .add_header(string_header(":message-type", "event"))
            .add_header(string_header(":event-type", event_type))
            .add_header(string_header(":content-type", "application/json")),
    )
}

/// An `exception` message (`throttlingException`, `modelStreamErrorException`...).
pub fn exception_message(exception_type: &str, message: &str) -> Bytes {
    framed(
        Message::new(json!({ "message": message }).to_string().into_bytes())
            .add_header(string_header(":message-type", "exception"))
            .add_header(string_header(":exception-type", exception_type))
            .add_header(string_header(":content-type", "application/json")),
    )
}

fn string_header(name: &'static str, value: &str) -> Header {
    Header::new(name, HeaderValue::String(value.to_owned().into()))
}

fn framed(message: Message) -> Bytes {
    let mut out = Vec::new();
    // Writing to a Vec fails only for headers or payloads past the format's limits,
    // which these small messages never reach.
    let _ = aws_smithy_eventstream::frame::write_message_to(&message, &mut out);
    Bytes::from(out)
}
