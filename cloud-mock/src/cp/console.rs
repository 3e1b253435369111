//! The console API: plain HTTP on its own port, `Authorization: Bearer <token>`.
//! For tests, demos and operators; not part of the agent's contract.
//!
//! - `GET|POST /console/v1/environments` (`{"id"}` to create)
//! - `POST /console/v1/environments/{env}/bundles` `{"dp_id", "days"?}` -> PEM bundle
//! - `GET /console/v1/environments/{env}/resources`,
//!   `PUT|DELETE /console/v1/environments/{env}/resources/{kind}/{id}` (every write
//!   bumps the global revision; PUT takes any JSON, so invalid resources can be served)
//! - `POST /console/v1/compact` `{"revision"?}` (default: the current revision)
//! - `POST /console/v1/environments/{env}/gateways/{dp}/revoke`
//! - `GET|PUT /console/v1/faults`, `POST /console/v1/faults/cut-watches`
//!
//! Errors are `{"error": "..."}` with 400, 401, 404 or 409.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ControlPlane;
use super::etcd_api::{env_prefix, prefix_end};
use super::faults::FaultSettings;

const DAY: Duration = Duration::from_secs(86_400);
const KINDS: [&str; 4] = ["provider_keys", "models", "api_keys", "guardrails"];

struct Console {
    cp: Arc<ControlPlane>,
    token: String,
}

/// A console error: a status and a message for `{"error": ...}`.
pub struct ConsoleError(StatusCode, String);

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ConsoleError {
    ConsoleError(status, message.into())
}

type Answer = Result<Response, ConsoleError>;

/// The console router; `token` is the bearer token every request must carry.
pub fn router(cp: Arc<ControlPlane>, token: String) -> Router {
    let console = Arc::new(Console { cp, token });
    Router::new()
        .route("/console/v1/environments", get(list_envs).post(create_env))
        .route("/console/v1/environments/{env}/bundles", post(issue_bundle))
        .route(
            "/console/v1/environments/{env}/resources",
            get(list_resources),
        )
        .route(
            "/console/v1/environments/{env}/resources/{kind}/{id}",
            put(put_resource).delete(delete_resource),
        )
        .route(
            "/console/v1/environments/{env}/gateways/{dp}/revoke",
            post(revoke),
        )
        .route("/console/v1/compact", post(compact))
        .route("/console/v1/faults", get(get_faults).put(set_faults))
        .route("/console/v1/faults/cut-watches", post(cut_watches))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(
            console.clone(),
            authenticate,
        ))
        .with_state(console)
}

async fn authenticate(State(console): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented == Some(console.token.as_str()) {
        next.run(req).await
    } else {
        error(StatusCode::UNAUTHORIZED, "missing or wrong console token").into_response()
    }
}

fn parse<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ConsoleError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))
}

fn known_env(console: &Console, env: &str) -> Result<(), ConsoleError> {
    if console.cp.has_environment(env) {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("environment '{env}' does not exist"),
        ))
    }
}

async fn list_envs(State(console): State<Arc<Console>>) -> Response {
    axum::Json(json!({"environments": console.cp.environments()})).into_response()
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CreateEnv {
    id: String,
}

async fn create_env(State(console): State<Arc<Console>>, body: Bytes) -> Answer {
    let request: CreateEnv = parse(&body)?;
    let id = if request.id.is_empty() {
        format!("env-{}", uuid::Uuid::new_v4().simple())
    } else {
        request.id
    };
    if certs::GatewayIdentity::new(&id, "probe").is_err() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("id: '{id}' is not a valid environment id"),
        ));
    }
    if !console.cp.add_environment(&id) {
        return Err(error(
            StatusCode::CONFLICT,
            format!("environment '{id}' already exists"),
        ));
    }
    Ok((StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response())
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct BundleRequest {
    dp_id: String,
    days: Option<u64>,
}

async fn issue_bundle(
    State(console): State<Arc<Console>>,
    Path(env): Path<String>,
    body: Bytes,
) -> Answer {
    known_env(&console, &env)?;
    let request: BundleRequest = parse(&body)?;
    let validity = DAY * u32::try_from(request.days.unwrap_or(30)).unwrap_or(30);
    let issued = console
        .cp
        .issue_gateway(&env, &request.dp_id, validity)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(axum::Json(json!({
        "env_id": env,
        "dp_id": request.dp_id,
        "cert_pem": issued.cert_pem,
        "key_pem": issued.key_pem.expose(),
        "ca_pem": console.cp.ca().cert_pem(),
    }))
    .into_response())
}

async fn list_resources(State(console): State<Arc<Console>>, Path(env): Path<String>) -> Answer {
    known_env(&console, &env)?;
    let prefix = env_prefix(&env);
    let (revision, entries) = console
        .cp
        .kv
        .range(&prefix, Some(&prefix_end(&prefix)), 0)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let items: Vec<Value> = entries
        .into_iter()
        .map(|(key, e)| {
            let value = serde_json::from_str::<Value>(&e.value).unwrap_or(Value::String(e.value));
            json!({"key": key, "value": value, "mod_revision": e.mod_revision})
        })
        .collect();
    Ok(axum::Json(json!({"revision": revision, "resources": items})).into_response())
}

fn resource_key(env: &str, kind: &str, id: &str) -> Result<String, ConsoleError> {
    if !KINDS.contains(&kind) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("unknown resource kind '{kind}'"),
        ));
    }
    if id.is_empty() || id.contains('/') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "id must not be empty or contain '/'",
        ));
    }
    Ok(format!("{}{kind}/{id}", env_prefix(env)))
}

async fn put_resource(
    State(console): State<Arc<Console>>,
    Path((env, kind, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Answer {
    known_env(&console, &env)?;
    let key = resource_key(&env, &kind, &id)?;
    // Stored as given: an invalid resource is a legitimate thing to serve in a test.
    let value = String::from_utf8_lossy(&body).into_owned();
    let revision = console.cp.kv.put(&key, value);
    Ok(axum::Json(json!({"key": key, "revision": revision})).into_response())
}

async fn delete_resource(
    State(console): State<Arc<Console>>,
    Path((env, kind, id)): Path<(String, String, String)>,
) -> Answer {
    known_env(&console, &env)?;
    let key = resource_key(&env, &kind, &id)?;
    let revision = console
        .cp
        .kv
        .delete(&key)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("{key} does not exist")))?;
    Ok(axum::Json(json!({"key": key, "revision": revision})).into_response())
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CompactRequest {
    revision: i64,
}

async fn compact(State(console): State<Arc<Console>>, body: Bytes) -> Answer {
    let request: CompactRequest = parse(&body)?;
    let revision = if request.revision > 0 {
        request.revision
    } else {
        console.cp.kv.revision()
    };
    let compacted = console
        .cp
        .kv
        .compact(revision)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(axum::Json(json!({"compact_revision": compacted})).into_response())
}

async fn revoke(
    State(console): State<Arc<Console>>,
    Path((env, dp)): Path<(String, String)>,
) -> Answer {
    known_env(&console, &env)?;
    console.cp.revoke(&env, &dp);
    Ok(axum::Json(json!({"env_id": env, "dp_id": dp, "revoked": true})).into_response())
}

async fn get_faults(State(console): State<Arc<Console>>) -> Response {
    axum::Json(console.cp.faults.get()).into_response()
}

async fn set_faults(State(console): State<Arc<Console>>, body: Bytes) -> Answer {
    let settings: FaultSettings = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid faults: {e}")))?;
    console.cp.faults.set(&settings);
    Ok(axum::Json(settings).into_response())
}

async fn cut_watches(State(console): State<Arc<Console>>) -> Response {
    console.cp.faults.cut();
    axum::Json(json!({"cut": true})).into_response()
}
