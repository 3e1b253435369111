//! The REST side of the contract: `POST /dp/heartbeat`, `GET /dp/budget_check`,
//! `POST /dp/telemetry`, `POST /dp/rotate-cert` (all with the identity of the verified
//! client certificate) and `POST /dp/register` (anonymous: a one-time enrollment token
//! is the credential). Errors are `{"error", "message", "code"}` like the etcd subset.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use certs::GatewayIdentity;
use certs::enrollment::EnrollmentToken;
use contract::certificate::{IssuedBundle, RegisterRequest, RotateRequest};
use contract::heartbeat::{Heartbeat, HeartbeatAnswer};
use contract::telemetry::{TelemetryAnswer, TelemetryBatch, UsageEvent};
use serde::Deserialize;
use serde_json::Value;

use super::etcd_api::gateway_error;
use super::state::{Period, StoredEvent, scoped};
use super::{ControlPlane, budget, unix_now, unix_now_ms};

/// A refused request: status and message.
pub struct DpError(StatusCode, String);

impl IntoResponse for DpError {
    fn into_response(self) -> Response {
        let code = match self.0 {
            StatusCode::BAD_REQUEST => 3,
            StatusCode::NOT_FOUND => 5,
            StatusCode::FORBIDDEN => 7,
            StatusCode::UNAUTHORIZED => 16,
            _ => 13,
        };
        gateway_error(self.0, code, &self.1)
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> DpError {
    DpError(status, message.into())
}

fn internal(e: &anyhow::Error) -> DpError {
    tracing::error!(error = %e, "control plane state");
    refuse(StatusCode::INTERNAL_SERVER_ERROR, "control plane error")
}

type Answer = Result<Response, DpError>;

fn parse<T: for<'de> Deserialize<'de>>(what: &str, body: &[u8]) -> Result<T, DpError> {
    serde_json::from_slice(body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("invalid {what} body: {e}")))
}

/// Answers with the fault injected on this endpoint, if any.
macro_rules! injected {
    ($cp:expr, $endpoint:literal) => {
        if let Some(answer) = $cp.faults.endpoint_answer($endpoint) {
            return Ok(answer);
        }
    };
}

pub async fn heartbeat(
    State(cp): State<Arc<ControlPlane>>,
    Extension(peer): Extension<GatewayIdentity>,
    body: Bytes,
) -> Answer {
    injected!(cp, "heartbeat");
    let beat: Heartbeat = parse("heartbeat", &body)?;
    if beat.instance_id.is_empty() {
        return Err(refuse(StatusCode::BAD_REQUEST, "instance_id: missing"));
    }
    let instance = beat.instance_id.clone();
    let dp = &beat.dp_id;
    if !dp.is_empty() && *dp != peer.dp_id {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "dp_id '{dp}' does not match the certificate's '{}'",
                peer.dp_id
            ),
        ));
    }
    let key = scoped(&peer.env_id, &peer.dp_id);
    // Heartbeat records are observations, not state worth an fsync per beat: they are
    // saved with the next durable change or at shutdown.
    let answer = cp
        .observe(|r| {
            let gateway = r.gateways.get_mut(&key)?;
            let entry =
                gateway
                    .instances
                    .entry(instance)
                    .or_insert_with(|| super::state::Instance {
                        last_seen_unix_ms: 0,
                        heartbeats: 0,
                        last: Value::Null,
                    });
            entry.last_seen_unix_ms = unix_now_ms();
            entry.heartbeats += 1;
            entry.last = serde_json::to_value(&beat).unwrap_or_default();
            Some(HeartbeatAnswer {
                server_time_unix: unix_now(),
                heartbeat_interval_secs: r.settings.heartbeat_interval_secs,
                rotate_certificate: gateway.rotate_requested,
            })
        })
        .ok_or_else(|| {
            refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "gateway '{}' of environment '{}' is not known to this control plane",
                    peer.dp_id, peer.env_id
                ),
            )
        })?;
    Ok(axum::Json(answer).into_response())
}

#[derive(Deserialize)]
pub struct BudgetQuery {
    api_key_id: Option<String>,
}

pub async fn budget_check(
    State(cp): State<Arc<ControlPlane>>,
    Extension(peer): Extension<GatewayIdentity>,
    Query(query): Query<BudgetQuery>,
) -> Answer {
    injected!(cp, "budget_check");
    let id = query
        .api_key_id
        .filter(|s| !s.is_empty())
        .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "api_key_id: missing"))?;
    let key = scoped(&peer.env_id, &id);
    let r = cp.registry();
    let answer = budget::answer(
        &id,
        r.budgets.get(&key),
        r.spend.get(&key),
        &r.settings,
        time::OffsetDateTime::now_utc(),
    );
    Ok(axum::Json(answer).into_response())
}

/// Checks one usage event against the contract; `(event_id, api_key_id, cost_usd)`.
fn usage_fields(i: usize, event: &Value) -> Result<(String, String, f64), DpError> {
    let bad = |message: String| refuse(StatusCode::BAD_REQUEST, format!("events[{i}]{message}"));
    // The two fields the control plane keys on are named when missing.
    for field in ["event_id", "api_key_id"] {
        if event
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(bad(format!(".{field}: missing or not a string")));
        }
    }
    let event: UsageEvent =
        serde_json::from_value(event.clone()).map_err(|e| bad(format!(": {e}")))?;
    if !event.cost_usd.is_finite() || event.cost_usd < 0.0 {
        return Err(bad(".cost_usd: not a non-negative number".to_owned()));
    }
    Ok((event.event_id, event.api_key_id, event.cost_usd))
}

pub async fn telemetry(
    State(cp): State<Arc<ControlPlane>>,
    Extension(peer): Extension<GatewayIdentity>,
    body: Bytes,
) -> Answer {
    injected!(cp, "telemetry");
    let batch: TelemetryBatch<Value> = parse("telemetry", &body)?;
    let checked = batch
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| usage_fields(i, e))
        .collect::<Result<Vec<_>, _>>()?;
    // Recording syncs the usage log and saves the state file: blocking work, kept off
    // the runtime so the mock provider beside it keeps answering meanwhile.
    let events = checked.into_iter().zip(batch.events).collect();
    let (accepted, duplicates) =
        tokio::task::spawn_blocking(move || record_usage(&cp, &peer, events))
            .await
            .map_err(|e| internal(&e.into()))??;
    Ok(axum::Json(TelemetryAnswer {
        accepted,
        duplicates,
    })
    .into_response())
}

/// Stores the events not seen before and adds their cost to the keys' spend; returns
/// how many were accepted and how many were duplicates.
fn record_usage(
    cp: &ControlPlane,
    peer: &GatewayIdentity,
    events: Vec<((String, String, f64), Value)>,
) -> Result<(usize, usize), DpError> {
    let total = events.len();
    let env = &peer.env_id;
    let mut usage = super::lock(&cp.usage);
    let mut in_batch = HashSet::new();
    let mut fresh = Vec::new();
    let mut spend: BTreeMap<String, f64> = BTreeMap::new();
    for ((id, key, cost), event) in events {
        if usage.seen(env, &id) || !in_batch.insert(id) {
            continue;
        }
        *spend.entry(key).or_default() += cost;
        fresh.push(StoredEvent {
            env_id: env.clone(),
            dp_id: peer.dp_id.clone(),
            received_unix_ms: unix_now_ms(),
            event,
        });
    }
    let accepted = fresh.len();
    let duplicates = total - accepted;
    usage.append(fresh).map_err(|e| internal(&e.into()))?;
    if duplicates > 0 {
        *usage.duplicates.entry(env.clone()).or_default() += duplicates as u64;
    }
    drop(usage);
    let now = time::OffsetDateTime::now_utc();
    cp.update(|r| {
        for (key, cost) in spend {
            let key = scoped(env, &key);
            let period = r.budgets.get(&key).map_or(Period::Monthly, |b| b.period);
            let mut current = budget::current(r.spend.get(&key), period, now);
            current.spent_usd += cost;
            r.spend.insert(key, current);
        }
    })
    .map_err(|e| internal(&e))?;
    Ok((accepted, duplicates))
}

fn bundle_answer(cp: &ControlPlane, certificate_pem: String) -> Answer {
    let not_after = certs::inspect_pem("certificate", &certificate_pem)
        .ok()
        .and_then(|i| i.into_iter().next())
        .map(|i| i.not_after.unix_timestamp());
    Ok(axum::Json(IssuedBundle {
        certificate_pem,
        ca_pem: cp.trusted_ca_pem(),
        not_after_unix: not_after,
    })
    .into_response())
}

pub async fn rotate_cert(
    State(cp): State<Arc<ControlPlane>>,
    Extension(peer): Extension<GatewayIdentity>,
    body: Bytes,
) -> Answer {
    injected!(cp, "rotate_cert");
    let request: RotateRequest = parse("rotate-cert", &body)?;
    let validity = cp
        .registry()
        .gateways
        .get(&scoped(&peer.env_id, &peer.dp_id))
        .map_or(30 * 86_400, |g| g.validity_secs);
    let certificate = cp
        .sign_csr(
            &peer.env_id,
            &peer.dp_id,
            &request.csr_pem,
            Duration::from_secs(validity),
            "rotation",
        )
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("csr_pem: {e}")))?;
    bundle_answer(&cp, certificate)
}

fn token_refused(message: impl Into<String>) -> DpError {
    refuse(StatusCode::UNAUTHORIZED, message)
}

/// Checks the token is unused and unexpired; `(env, dp, validity_secs)`.
fn usable(cp: &ControlPlane, hash: &str, now: i64) -> Result<(String, String, u64), DpError> {
    let r = cp.registry();
    let token = r.tokens.get(hash).ok_or_else(|| {
        token_refused("enrollment token is not valid: issue a new one in the console")
    })?;
    if let Some(used) = token.used_unix {
        return Err(token_refused(format!(
            "enrollment token was already used (at unix time {used}); issue a new one"
        )));
    }
    if token.expires_unix <= now {
        return Err(token_refused(format!(
            "enrollment token expired at unix time {}; issue a new one",
            token.expires_unix
        )));
    }
    Ok((
        token.env_id.clone(),
        token.dp_id.clone(),
        token.validity_secs,
    ))
}

pub async fn register(State(cp): State<Arc<ControlPlane>>, body: Bytes) -> Answer {
    injected!(cp, "register");
    let request: RegisterRequest = parse("register", &body)?;
    let token = EnrollmentToken::parse(&request.token).map_err(|e| token_refused(e.to_string()))?;
    let hash = token.secret_sha256();
    let (env, dp, validity) = usable(&cp, &hash, unix_now())?;
    if token.identity.env_id != env || token.identity.dp_id != dp {
        return Err(token_refused(
            "enrollment token is not valid: identity altered",
        ));
    }
    if cp.is_revoked(&GatewayIdentity::new(&env, &dp).map_err(|e| internal(&e.into()))?) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "this gateway has been revoked",
        ));
    }
    // Claim the token before signing, so two concurrent uses cannot both succeed.
    let claimed = cp
        .update(|r| match r.tokens.get_mut(&hash) {
            Some(t) if t.used_unix.is_none() => {
                t.used_unix = Some(unix_now());
                true
            }
            _ => false,
        })
        .map_err(|e| internal(&e))?;
    if !claimed {
        return Err(token_refused(
            "enrollment token was already used; issue a new one",
        ));
    }
    let signed = cp.sign_csr(
        &env,
        &dp,
        &request.csr_pem,
        Duration::from_secs(validity),
        "enrollment",
    );
    match signed {
        Ok(certificate) => bundle_answer(&cp, certificate),
        Err(e) => {
            // A bad CSR does not burn the token.
            let _ = cp.update(|r| {
                if let Some(t) = r.tokens.get_mut(&hash) {
                    t.used_unix = None;
                }
            });
            Err(refuse(StatusCode::BAD_REQUEST, format!("csr_pem: {e}")))
        }
    }
}
