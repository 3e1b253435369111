//! The console API: plain HTTP on its own port, `Authorization: Bearer <token>`.
//! For tests, demos and operators; not part of the agent's contract.
//!
//! Environments:
//! - `GET|POST /console/v1/environments` (`{"id"}` to create)
//!
//! Gateways and certificates, under `/console/v1/environments/{env}`:
//! - `POST .../bundles` `{"dp_id", "days"?, "validity_seconds"?}` -> PEM bundle
//! - `POST .../enrollment-tokens` `{"dp_id", "ttl_seconds"?, "days"?, "validity_seconds"?}`
//!   -> `{"token", "expires_unix"}` (one use)
//! - `GET .../gateways` (certificates, instances with last heartbeat and last-seen time)
//! - `POST .../gateways/{dp}/revoke`, `POST .../gateways/{dp}/rotate` (the next
//!   heartbeat answer asks for a rotation), `DELETE .../gateways/{dp}` (forget it: its
//!   heartbeats answer 404)
//! - `POST /console/v1/ca/rotate` (a new CA signs from now on; old client
//!   certificates stay trusted)
//!
//! Resources, budgets and usage, under `/console/v1/environments/{env}`:
//! - `GET .../resources`, `PUT|DELETE .../resources/{kind}/{id}` (every write bumps the
//!   global revision; PUT takes any body, so invalid resources can be served)
//! - `GET .../budgets`, `PUT|DELETE .../budgets/{api_key_id}`
//!   `{"limit_usd", "period": daily|weekly|monthly|total, "fail_mode"?, "ttl_seconds"?}`
//! - `PUT .../spend/{api_key_id}` `{"spent_usd"}` (this period's spend)
//! - `GET .../usage[?api_key_id=]` (received usage events, most recent last)
//! - `POST /console/v1/compact` `{"revision"?}` (default: the current revision)
//!
//! Control: `GET|PUT /console/v1/settings`, `GET|PUT /console/v1/faults`,
//! `POST /console/v1/faults/cut-watches`, `GET /console/v1/calls` (data-plane calls per
//! endpoint name since the start).
//!
//! Errors are `{"error": "..."}` with 400, 401, 404, 409 or 500.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use certs::enrollment::EnrollmentToken;
use serde::Deserialize;
use serde_json::{Value, json};

use super::etcd_api::{env_prefix, prefix_end};
use super::faults::FaultSettings;
use super::state::{Budget, Settings, Spend, scoped};
use super::{ControlPlane, budget, unix_now, unix_now_ms};

const DAY: u64 = 86_400;
const KINDS: [&str; 5] = [
    "provider_keys",
    "models",
    "api_keys",
    "guardrails",
    "guardrail_attachments",
];

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

fn internal(e: &anyhow::Error) -> ConsoleError {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

type Answer = Result<Response, ConsoleError>;
type Cp = State<Arc<ControlPlane>>;

fn ok(value: Value) -> Answer {
    Ok(axum::Json(value).into_response())
}

/// The console router; every request must carry the control plane's console token.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    let env = "/console/v1/environments/{env}";
    Router::new()
        .route("/console/v1/environments", get(list_envs).post(create_env))
        .route(&format!("{env}/bundles"), post(issue_bundle))
        .route(&format!("{env}/enrollment-tokens"), post(issue_token))
        .route(&format!("{env}/gateways"), get(list_gateways))
        .route(
            &format!("{env}/gateways/{{dp}}"),
            axum::routing::delete(forget_gateway),
        )
        .route(&format!("{env}/gateways/{{dp}}/revoke"), post(revoke))
        .route(&format!("{env}/gateways/{{dp}}/rotate"), post(ask_rotation))
        .route(&format!("{env}/resources"), get(list_resources))
        .route(
            &format!("{env}/resources/{{kind}}/{{id}}"),
            put(put_resource).delete(delete_resource),
        )
        .route(&format!("{env}/budgets"), get(list_budgets))
        .route(
            &format!("{env}/budgets/{{key}}"),
            put(set_budget).delete(delete_budget),
        )
        .route(&format!("{env}/spend/{{key}}"), put(set_spend))
        .route(&format!("{env}/usage"), get(list_usage))
        .route("/console/v1/compact", post(compact))
        .route("/console/v1/ca/rotate", post(rotate_ca))
        .route("/console/v1/settings", get(get_settings).put(set_settings))
        .route("/console/v1/calls", get(get_calls))
        .route("/console/v1/faults", get(get_faults).put(set_faults))
        .route("/console/v1/faults/cut-watches", post(cut_watches))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(middleware::from_fn_with_state(cp.clone(), authenticate))
        .with_state(cp)
}

async fn authenticate(State(cp): Cp, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let expected = cp.console_token.as_bytes();
    let matches = presented.is_some_and(|p| {
        use subtle::ConstantTimeEq;
        bool::from(p.as_bytes().ct_eq(expected))
    });
    if matches {
        next.run(req).await
    } else {
        error(StatusCode::UNAUTHORIZED, "missing or wrong console token").into_response()
    }
}

fn parse<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ConsoleError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    strict(body)
}

fn strict<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ConsoleError> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))
}

fn known_env(cp: &ControlPlane, env: &str) -> Result<(), ConsoleError> {
    if cp.has_environment(env) {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("environment '{env}' does not exist"),
        ))
    }
}

async fn list_envs(State(cp): Cp) -> Answer {
    ok(json!({"environments": cp.environments()}))
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CreateEnv {
    id: String,
}

async fn create_env(State(cp): Cp, body: Bytes) -> Answer {
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
    if !cp.add_environment(&id).map_err(|e| internal(&e))? {
        return Err(error(
            StatusCode::CONFLICT,
            format!("environment '{id}' already exists"),
        ));
    }
    Ok((StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response())
}

/// How long certificates for a gateway live: `validity_seconds`, else `days`, else 30
/// days.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GatewayRequest {
    dp_id: String,
    days: Option<u64>,
    validity_seconds: Option<u64>,
    /// Enrollment tokens only: how long the token may be used (default one hour).
    ttl_seconds: Option<u64>,
}

impl GatewayRequest {
    fn validity(&self) -> Duration {
        Duration::from_secs(
            self.validity_seconds
                .unwrap_or(self.days.unwrap_or(30).saturating_mul(DAY))
                .max(1),
        )
    }

    fn identity(&self, env: &str) -> Result<certs::GatewayIdentity, ConsoleError> {
        certs::GatewayIdentity::new(env, &self.dp_id)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("dp_id: {e}")))
    }
}

async fn issue_bundle(State(cp): Cp, Path(env): Path<String>, body: Bytes) -> Answer {
    known_env(&cp, &env)?;
    let request: GatewayRequest = parse(&body)?;
    request.identity(&env)?;
    let issued = cp
        .issue_gateway(&env, &request.dp_id, request.validity())
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    ok(json!({
        "env_id": env,
        "dp_id": request.dp_id,
        "cert_pem": issued.cert_pem,
        "key_pem": issued.key_pem.expose(),
        "ca_pem": cp.trusted_ca_pem(),
    }))
}

async fn issue_token(State(cp): Cp, Path(env): Path<String>, body: Bytes) -> Answer {
    known_env(&cp, &env)?;
    let request: GatewayRequest = parse(&body)?;
    let identity = request.identity(&env)?;
    let token = EnrollmentToken::generate(&identity, cp.ca().cert_pem())
        .map_err(|e| internal(&e.into()))?;
    let expires = unix_now()
        .saturating_add(i64::try_from(request.ttl_seconds.unwrap_or(3600)).unwrap_or(i64::MAX));
    let record = super::state::EnrollmentToken {
        env_id: env.clone(),
        dp_id: request.dp_id.clone(),
        expires_unix: expires,
        used_unix: None,
        validity_secs: request.validity().as_secs(),
    };
    cp.update(|r| r.tokens.insert(token.secret_sha256(), record))
        .map_err(|e| internal(&e))?;
    ok(json!({
        "env_id": env,
        "dp_id": request.dp_id,
        "token": token.expose(),
        "expires_unix": expires,
    }))
}

async fn list_gateways(State(cp): Cp, Path(env): Path<String>) -> Answer {
    known_env(&cp, &env)?;
    let now = unix_now_ms();
    let gateways: Vec<Value> = cp
        .registry()
        .gateways
        .values()
        .filter(|g| g.env_id == env)
        .map(|g| {
            let instances: Vec<Value> = g
                .instances
                .iter()
                .map(|(id, i)| {
                    json!({
                        "instance_id": id,
                        "last_seen_unix_ms": i.last_seen_unix_ms,
                        "seconds_since_last_seen": (now - i.last_seen_unix_ms).max(0) / 1000,
                        "heartbeats": i.heartbeats,
                        "last_heartbeat": i.last,
                    })
                })
                .collect();
            json!({
                "dp_id": g.dp_id,
                "revoked": g.revoked,
                "rotate_requested": g.rotate_requested,
                "validity_seconds": g.validity_secs,
                "certificates": g.certificates,
                "instances": instances,
            })
        })
        .collect();
    ok(json!({"gateways": gateways}))
}

async fn revoke(State(cp): Cp, Path((env, dp)): Path<(String, String)>) -> Answer {
    known_env(&cp, &env)?;
    cp.revoke(&env, &dp).map_err(|e| internal(&e))?;
    ok(json!({"env_id": env, "dp_id": dp, "revoked": true}))
}

fn with_gateway(
    cp: &ControlPlane,
    env: &str,
    dp: &str,
    change: impl FnOnce(&mut super::state::Registry, &str) -> bool,
) -> Result<(), ConsoleError> {
    known_env(cp, env)?;
    let key = scoped(env, dp);
    if cp.update(|r| change(r, &key)).map_err(|e| internal(&e))? {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("gateway '{dp}' does not exist in '{env}'"),
        ))
    }
}

async fn ask_rotation(State(cp): Cp, Path((env, dp)): Path<(String, String)>) -> Answer {
    with_gateway(&cp, &env, &dp, |r, key| {
        r.gateways
            .get_mut(key)
            .map(|g| g.rotate_requested = true)
            .is_some()
    })?;
    ok(json!({"env_id": env, "dp_id": dp, "rotate_requested": true}))
}

async fn forget_gateway(State(cp): Cp, Path((env, dp)): Path<(String, String)>) -> Answer {
    with_gateway(&cp, &env, &dp, |r, key| r.gateways.remove(key).is_some())?;
    ok(json!({"env_id": env, "dp_id": dp, "forgotten": true}))
}

async fn rotate_ca(State(cp): Cp) -> Answer {
    let ca_pem = cp.rotate_ca().map_err(|e| internal(&e))?;
    ok(json!({"ca_pem": ca_pem, "trusted_ca_pem": cp.trusted_ca_pem()}))
}

async fn list_resources(State(cp): Cp, Path(env): Path<String>) -> Answer {
    known_env(&cp, &env)?;
    let prefix = env_prefix(&env);
    let (revision, entries) = cp
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
    ok(json!({"revision": revision, "resources": items}))
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
    State(cp): Cp,
    Path((env, kind, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Answer {
    known_env(&cp, &env)?;
    let key = resource_key(&env, &kind, &id)?;
    // Stored as given (an invalid resource is a legitimate thing to serve in a test),
    // except that a caller key's plaintext is stored as its hash, as the admin API does.
    let value = match kind.as_str() {
        "api_keys" => hash_plaintext_key(&body)?,
        _ => String::from_utf8_lossy(&body).into_owned(),
    };
    let revision = cp.kv.put(&key, value);
    cp.persist().map_err(|e| internal(&e))?;
    ok(json!({"key": key, "revision": revision}))
}

/// A caller-key document with `key` (plaintext) stored with `key_hash` (its SHA-256,
/// hex) instead; any other document as it is.
fn hash_plaintext_key(body: &[u8]) -> Result<String, ConsoleError> {
    let Ok(Value::Object(mut doc)) = serde_json::from_slice::<Value>(body) else {
        return Ok(String::from_utf8_lossy(body).into_owned());
    };
    let Some(plaintext) = doc.remove("key") else {
        return Ok(String::from_utf8_lossy(body).into_owned());
    };
    let bad = |message: &str| error(StatusCode::BAD_REQUEST, message.to_owned());
    let Value::String(plaintext) = plaintext else {
        return Err(bad("key: must be a string"));
    };
    if plaintext.is_empty() {
        return Err(bad("key: must not be empty"));
    }
    if doc.contains_key("key_hash") {
        return Err(bad("key: give either key or key_hash, not both"));
    }
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(plaintext.as_bytes()));
    doc.insert("key_hash".to_owned(), Value::String(hash));
    Ok(Value::Object(doc).to_string())
}

async fn delete_resource(
    State(cp): Cp,
    Path((env, kind, id)): Path<(String, String, String)>,
) -> Answer {
    known_env(&cp, &env)?;
    let key = resource_key(&env, &kind, &id)?;
    let revision = cp
        .kv
        .delete(&key)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("{key} does not exist")))?;
    cp.persist().map_err(|e| internal(&e))?;
    ok(json!({"key": key, "revision": revision}))
}

async fn list_budgets(State(cp): Cp, Path(env): Path<String>) -> Answer {
    known_env(&cp, &env)?;
    let now = time::OffsetDateTime::now_utc();
    let prefix = scoped(&env, "");
    let r = cp.registry();
    let budgets: Vec<Value> = r
        .budgets
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, b)| {
            let id = &k[prefix.len()..];
            json!({
                "api_key_id": id,
                "budget": b,
                "answer": budget::answer(id, Some(b), r.spend.get(k), &r.settings, now),
            })
        })
        .collect();
    let spend: Vec<Value> = r
        .spend
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, s)| json!({"api_key_id": &k[prefix.len()..], "spent_usd": s.spent_usd, "period_start_unix": s.period_start_unix}))
        .collect();
    ok(json!({"budgets": budgets, "spend": spend}))
}

fn key_id(id: &str) -> Result<(), ConsoleError> {
    if id.is_empty() || id.contains('/') {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "api_key_id must not be empty or contain '/'",
        ));
    }
    Ok(())
}

async fn set_budget(State(cp): Cp, Path((env, id)): Path<(String, String)>, body: Bytes) -> Answer {
    known_env(&cp, &env)?;
    key_id(&id)?;
    let budget: Budget = strict(&body)?;
    if !(budget.limit_usd.is_finite() && budget.limit_usd >= 0.0) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "limit_usd: must be a non-negative number",
        ));
    }
    cp.update(|r| r.budgets.insert(scoped(&env, &id), budget.clone()))
        .map_err(|e| internal(&e))?;
    ok(json!({"api_key_id": id, "budget": budget}))
}

async fn delete_budget(State(cp): Cp, Path((env, id)): Path<(String, String)>) -> Answer {
    known_env(&cp, &env)?;
    let removed = cp
        .update(|r| r.budgets.remove(&scoped(&env, &id)))
        .map_err(|e| internal(&e))?;
    if removed.is_none() {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no budget for '{id}' in '{env}'"),
        ));
    }
    ok(json!({"api_key_id": id, "deleted": true}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSpend {
    spent_usd: f64,
}

async fn set_spend(State(cp): Cp, Path((env, id)): Path<(String, String)>, body: Bytes) -> Answer {
    known_env(&cp, &env)?;
    key_id(&id)?;
    let request: SetSpend = strict(&body)?;
    if !(request.spent_usd.is_finite() && request.spent_usd >= 0.0) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "spent_usd: must be a non-negative number",
        ));
    }
    let now = time::OffsetDateTime::now_utc();
    cp.update(|r| {
        let key = scoped(&env, &id);
        let period = r
            .budgets
            .get(&key)
            .map_or(super::state::Period::Monthly, |b| b.period);
        r.spend.insert(
            key,
            Spend {
                spent_usd: request.spent_usd,
                period_start_unix: budget::bounds(period, now).0.unix_timestamp(),
            },
        );
    })
    .map_err(|e| internal(&e))?;
    ok(json!({"api_key_id": id, "spent_usd": request.spent_usd}))
}

#[derive(Deserialize)]
struct UsageQuery {
    api_key_id: Option<String>,
}

async fn list_usage(
    State(cp): Cp,
    Path(env): Path<String>,
    Query(query): Query<UsageQuery>,
) -> Answer {
    known_env(&cp, &env)?;
    let usage = super::lock(&cp.usage);
    let events: Vec<&super::state::StoredEvent> = usage
        .recent
        .iter()
        .filter(|e| e.env_id == env)
        .filter(|e| {
            query
                .api_key_id
                .as_deref()
                .is_none_or(|k| e.event.get("api_key_id").and_then(Value::as_str) == Some(k))
        })
        .collect();
    let duplicates = usage.duplicates.get(&env).copied().unwrap_or(0);
    ok(json!({"events": events, "duplicates_received": duplicates}))
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CompactRequest {
    revision: i64,
}

async fn compact(State(cp): Cp, body: Bytes) -> Answer {
    let request: CompactRequest = parse(&body)?;
    let revision = if request.revision > 0 {
        request.revision
    } else {
        cp.kv.revision()
    };
    let compacted = cp
        .kv
        .compact(revision)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
    ok(json!({"compact_revision": compacted}))
}

async fn get_settings(State(cp): Cp) -> Answer {
    let settings = cp.registry().settings.clone();
    ok(json!(settings))
}

async fn set_settings(State(cp): Cp, body: Bytes) -> Answer {
    let settings: Settings = strict(&body)?;
    cp.update(|r| r.settings = settings.clone())
        .map_err(|e| internal(&e))?;
    ok(json!(settings))
}

async fn get_calls(State(cp): Cp) -> Answer {
    ok(json!(cp.faults.calls()))
}

async fn get_faults(State(cp): Cp) -> Answer {
    ok(json!(cp.faults.get()))
}

async fn set_faults(State(cp): Cp, body: Bytes) -> Answer {
    let settings: FaultSettings = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid faults: {e}")))?;
    cp.faults.set(&settings);
    ok(json!(settings))
}

async fn cut_watches(State(cp): Cp) -> Answer {
    cp.faults.cut();
    ok(json!({"cut": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plaintext_caller_key_is_stored_as_its_hash() {
        let stored = hash_plaintext_key(br#"{"key": "sk-caller", "allowed_models": ["*"]}"#)
            .unwrap_or_default();
        let doc: Value = serde_json::from_str(&stored).unwrap_or_default();
        assert_eq!(
            doc["key_hash"],
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"sk-caller"))
        );
        assert!(doc.get("key").is_none() && !stored.contains("sk-caller"));
        // Anything else is stored as given, invalid documents included.
        assert_eq!(
            hash_plaintext_key(b"not json").unwrap_or_default(),
            "not json"
        );
        assert!(hash_plaintext_key(br#"{"key": "a", "key_hash": "b"}"#).is_err());
    }
}
