//! Azure OpenAI's shape in front of the OpenAI handlers: deployment URLs
//! (`/openai/deployments/{deployment}/{route}`, the deployment being the model the
//! scripts are chosen by), a required `api-version`, `api-key` or Entra ID bearer
//! authentication, and an Entra ID token endpoint (`/{tenant}/oauth2/v2.0/token`,
//! client credentials) whose tokens the deployments accept until they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{SharedState, lock, openai, receive};

/// The client secret the token endpoint refuses (for tests of a bad credential).
pub const REFUSED_CLIENT_SECRET: &str = "wrong-secret";

/// What the Entra mock has done, and how long its tokens live.
#[derive(Debug)]
pub(super) struct Entra {
    pub expires_in: u64,
    pub minted: usize,
    tokens: HashMap<String, Instant>,
}

impl Default for Entra {
    fn default() -> Self {
        Self {
            expires_in: 3600,
            minted: 0,
            tokens: HashMap::new(),
        }
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`: a bearer token for client credentials.
pub(super) async fn token(
    State(shared): State<SharedState>,
    Path(_tenant): Path<String>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    if field("grant_type") != "client_credentials"
        || field("client_id").is_empty()
        || field("scope") != "https://cognitiveservices.azure.com/.default"
    {
        let body = json!({"error": "invalid_request", "error_description": "client credentials and the Cognitive Services scope are required"});
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    if field("client_secret").is_empty() || field("client_secret") == REFUSED_CLIENT_SECRET {
        let body = json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."});
        return (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    let mut s = lock(&shared);
    s.entra.minted += 1;
    let token = format!("mock-entra-token-{}", s.entra.minted);
    let expires_in = s.entra.expires_in;
    s.entra.tokens.insert(
        token.clone(),
        Instant::now() + Duration::from_secs(expires_in),
    );
    axum::Json(json!({"token_type": "Bearer", "expires_in": expires_in, "access_token": token}))
        .into_response()
}

#[derive(serde::Deserialize)]
pub(super) struct Version {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

/// `POST /openai/deployments/{deployment}/{*route}`: the OpenAI handler of `route`,
/// answering as the deployment.
pub(super) async fn deployment(
    State(shared): State<SharedState>,
    Path((deployment, route)): Path<(String, String)>,
    Query(version): Query<Version>,
    request: Request,
) -> Response {
    if let Some(refused) = refusal(&shared, &version, request.headers()) {
        return refused;
    }
    let call = call(&shared, request, Some(deployment)).await;
    match route.as_str() {
        "chat/completions" => openai::chat(call).await,
        "completions" => openai::completions(call).await,
        "embeddings" => openai::embeddings(call).await,
        "images/generations" => openai::images(call).await,
        "audio/speech" => openai::speech(call).await,
        "audio/transcriptions" | "audio/translations" => openai::transcription(call).await,
        _ => not_found(),
    }
}

/// `POST /openai/responses`: the Responses API, the deployment named in the body.
pub(super) async fn responses(
    State(shared): State<SharedState>,
    Query(version): Query<Version>,
    request: Request,
) -> Response {
    if let Some(refused) = refusal(&shared, &version, request.headers()) {
        return refused;
    }
    openai::responses(call(&shared, request, None).await).await
}

async fn call(shared: &SharedState, request: Request, model: Option<String>) -> super::Call {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    receive(
        shared,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &body,
        model,
    )
    .await
}

/// Azure's refusals: no `api-version` (400), no valid `api-key` or bearer token (401).
fn refusal(shared: &SharedState, version: &Version, headers: &HeaderMap) -> Option<Response> {
    if version.api_version.as_deref().is_none_or(str::is_empty) {
        let body = json!({"error": {"code": "MissingApiVersionParameter",
            "message": "The api-version query parameter (?api-version=) is required for all requests."}});
        return Some((StatusCode::BAD_REQUEST, axum::Json(body)).into_response());
    }
    let key = headers.get("api-key").and_then(|v| v.to_str().ok());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = match (key, bearer) {
        (Some(key), None) => !key.is_empty(),
        (None, Some(token)) => lock(shared)
            .entra
            .tokens
            .get(token)
            .is_some_and(|until| Instant::now() < *until),
        _ => false,
    };
    if valid {
        return None;
    }
    let body = json!({"error": {"code": "401",
        "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}});
    Some((StatusCode::UNAUTHORIZED, axum::Json(body)).into_response())
}

fn not_found() -> Response {
    let body = json!({"error": {"code": "404", "message": "Resource not found"}});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}
