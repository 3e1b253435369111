//! The admin listener of self-hosted mode.
//!
//! - `GET /livez`: as on the proxy listener (no key needed).
//! - `GET /admin/v1/health`: model health and snapshot freshness, from memory.
//! - `GET|POST /admin/v1/{kind}`, `GET|PUT|DELETE /admin/v1/{kind}/{id}` for
//!   `provider_keys`, `models`, `api_keys`, `guardrails`: reads come from etcd (so a
//!   write is readable at once); writes are validated (document, references, unique
//!   names) and then stored in etcd. The proxy sees them through its watch like any
//!   other write: a 2xx means "accepted and stored", not "serving".
//!
//! - `POST /api/v1/admin/guardrails/test` `{"text", "policy"?, "hook"?}`: runs the text
//!   through the guardrail named `policy` (or every enabled one; `"default"` too) at
//!   `hook` (`input`, or `output`) and says what they did, masks included.
//!
//! Every route but `/livez` needs an admin key (`Authorization: Bearer` or
//! `x-api-key`), compared in constant time. Errors use `{"error_msg": "..."}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use proxy_core::policy::guardrails::{Detectors, Stage, trial};
use proxy_core::policy::health::{Health, ModelHealth};
use proxy_core::resources::{Kind, ModelTarget, Resource, ResourceKey};
use proxy_core::secret::Secret;
use proxy_core::snapshot::{Snapshot, SnapshotStore};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::etcd::{EtcdClient, EtcdError};
use crate::watch::WatchStatus;

/// What GET shows instead of a provider credential; sending it back on PUT keeps the
/// stored credential.
pub const REDACTED: &str = "******";

pub struct Admin {
    pub store: Arc<SnapshotStore>,
    pub health: Arc<ModelHealth>,
    pub etcd: Arc<EtcdClient>,
    /// The configuration watch: whether etcd is reached.
    pub watch: Arc<WatchStatus>,
    /// Digests of the admin keys.
    key_digests: Vec<[u8; 32]>,
    pub draining: CancellationToken,
    /// For guardrail trials that call detector services.
    detectors: Detectors,
}

impl Admin {
    pub fn new(
        store: Arc<SnapshotStore>,
        health: Arc<ModelHealth>,
        etcd: Arc<EtcdClient>,
        watch: Arc<WatchStatus>,
        admin_keys: &[Secret],
        draining: CancellationToken,
    ) -> Self {
        Self {
            store,
            health,
            etcd,
            watch,
            key_digests: admin_keys.iter().map(|k| digest(k.expose())).collect(),
            draining,
            detectors: Detectors::standalone(),
        }
    }

    fn prefix(&self) -> &str {
        self.store.prefix()
    }

    fn key(&self, kind: Kind, id: &str) -> String {
        ResourceKey::new(kind, id).full(self.prefix())
    }

    fn dir(&self, kind: Kind) -> String {
        format!("{}/{kind}/", self.prefix())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        let Some(presented) = presented else {
            return false;
        };
        let presented = digest(presented.trim());
        // Compare with every key, without stopping early.
        self.key_digests
            .iter()
            .fold(subtle::Choice::from(0), |found, d| {
                found | d.ct_eq(&presented)
            })
            .into()
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// An admin error: a status and a message for `{"error_msg": ...}`.
#[derive(Debug)]
pub struct AdminError(StatusCode, String);

impl AdminError {
    fn bad(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into())
    }
}

impl From<EtcdError> for AdminError {
    fn from(e: EtcdError) -> Self {
        tracing::warn!(error = %e, "admin request could not reach etcd");
        Self(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("configuration store unavailable: {e}"),
        )
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error_msg": self.1 }))).into_response()
    }
}

type Answer = Result<Response, AdminError>;

pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/admin/v1/health", get(health))
        .route(
            "/api/v1/admin/guardrails/test",
            axum::routing::post(guardrail_trial),
        )
        .route("/admin/v1/{kind}", get(list).post(create))
        .route(
            "/admin/v1/{kind}/{id}",
            get(read).put(replace).delete(remove),
        )
        .fallback(|| async { AdminError(StatusCode::NOT_FOUND, "no such route".to_owned()) })
        .method_not_allowed_fallback(|| async {
            AdminError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route".to_owned(),
            )
        })
        .layer(middleware::from_fn_with_state(admin.clone(), authenticate))
        .with_state(admin)
}

/// Probes and paths outside the admin API (404) need no key.
async fn authenticate(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let api = path.starts_with("/admin/") || path.starts_with("/api/");
    let open = matches!(path, "/livez" | "/readyz") || !api;
    if open || admin.authorized(req.headers()) {
        return next.run(req).await;
    }
    AdminError(
        StatusCode::UNAUTHORIZED,
        "missing or invalid admin key".to_owned(),
    )
    .into_response()
}

#[derive(serde::Deserialize)]
struct TrialRequest {
    text: String,
    policy: Option<String>,
    hook: Option<String>,
}

async fn guardrail_trial(State(admin): State<Arc<Admin>>, body: Bytes) -> Response {
    let request: TrialRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return AdminError::bad(format!(
                "the body must be {{\"text\": ..., \"policy\"?: ..., \"hook\"?: ...}}: {e}"
            ))
            .into_response();
        }
    };
    let stage = match request.hook.as_deref() {
        None | Some("input") => Stage::Input,
        Some("output") => Stage::Output,
        Some(other) => {
            return AdminError::bad(format!("hook: '{other}' is not one of input, output"))
                .into_response();
        }
    };
    let policy = request.policy.as_deref().filter(|p| *p != "default");
    let snapshot = admin.store.load();
    match trial(&snapshot, policy, stage, &request.text, &admin.detectors).await {
        Some(found) => axum::Json(found).into_response(),
        None => AdminError(
            StatusCode::NOT_FOUND,
            format!(
                "no enabled guardrail named '{}' runs at this hook",
                policy.unwrap_or_default()
            ),
        )
        .into_response(),
    }
}

async fn livez(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    proxy_core::http::livez_response(admin.draining.is_cancelled(), &q)
}

async fn readyz(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    proxy_core::http::readyz_response(
        admin.store.freshness().source,
        admin.draining.is_cancelled(),
        &q,
    )
}

/// `GET /admin/v1/health`, in the shape and field order of the health-check docs.
#[derive(Serialize)]
struct HealthBody<'a> {
    /// `unhealthy` when a model is down; `degraded` when one is degraded or the
    /// configuration is stale (etcd cannot be reached, the snapshot keeps serving);
    /// else `ok`. A fresh start is never `unhealthy` (no model has failed yet).
    status: &'static str,
    /// Whether the configuration watch on etcd is established.
    source_connected: bool,
    models: Vec<ModelHealthEntry<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<ConfigFreshness>,
}

#[derive(Serialize)]
struct ModelHealthEntry<'a> {
    id: &'a str,
    name: &'a str,
    health: u8,
}

#[derive(Serialize)]
struct ConfigFreshness {
    snapshot_revision: i64,
    /// `null` until the first apply.
    snapshot_age_seconds: Option<u64>,
}

async fn health(State(admin): State<Arc<Admin>>) -> Response {
    let snapshot = admin.store.load();
    let mut worst = Health::Healthy;
    let mut models: Vec<ModelHealthEntry<'_>> = snapshot
        .models()
        .map(|m| {
            let health = admin.health.of(&snapshot, m);
            worst = worst.max(health);
            ModelHealthEntry {
                id: &m.id,
                name: &m.name,
                health: health.as_u8(),
            }
        })
        .collect();
    models.sort_by(|a, b| a.name.cmp(b.name));
    let freshness = admin.store.freshness();
    let connected = admin.watch.connected();
    let body = HealthBody {
        status: match (worst, connected) {
            (Health::Down, _) => "unhealthy",
            (Health::Degraded, _) | (_, false) => "degraded",
            (Health::Healthy, true) => "ok",
        },
        source_connected: connected,
        models,
        config: Some(ConfigFreshness {
            snapshot_revision: freshness.revision,
            snapshot_age_seconds: freshness.age.map(|a| a.as_secs()),
        }),
    };
    axum::Json(body).into_response()
}

fn kind(name: &str) -> Result<Kind, AdminError> {
    Kind::parse(name).ok_or_else(|| {
        AdminError(
            StatusCode::NOT_FOUND,
            format!("unknown resource kind '{name}' (provider_keys, models, api_keys, guardrails, guardrail_attachments)"),
        )
    })
}

/// The kind of a `/admin/v1/{kind}/{id}` route, once both parts are checked.
fn kind_and_id(kind_name: &str, id: &str) -> Result<Kind, AdminError> {
    let kind = kind(kind_name)?;
    check_id(id)?;
    Ok(kind)
}

fn check_id(id: &str) -> Result<(), AdminError> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(AdminError::bad(
            "id: use 1 to 128 letters, digits, '-', '_' or '.'",
        ))
    }
}

async fn list(State(admin): State<Arc<Admin>>, Path(kind_name): Path<String>) -> Answer {
    let kind = kind(&kind_name)?;
    let listing = admin.etcd.list(&admin.dir(kind)).await?;
    let items: Vec<Value> = listing
        .kvs
        .iter()
        .map(|kv| item(kind, id_of(&kv.key), &kv.value))
        .collect();
    Ok(axum::Json(json!({ "total": items.len(), "list": items })).into_response())
}

async fn read(
    State(admin): State<Arc<Admin>>,
    Path((kind_name, id)): Path<(String, String)>,
) -> Answer {
    let kind = kind_and_id(&kind_name, &id)?;
    match admin.etcd.get(&admin.key(kind, &id)).await? {
        Some(kv) => Ok(axum::Json(item(kind, &id, &kv.value)).into_response()),
        None => Err(not_found(kind, &id)),
    }
}

async fn create(
    State(admin): State<Arc<Admin>>,
    Path(kind_name): Path<String>,
    body: Bytes,
) -> Answer {
    let kind = kind(&kind_name)?;
    let id = uuid::Uuid::new_v4().to_string();
    let value = store(&admin, kind, &id, &body, None).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(item_value(kind, &id, value)),
    )
        .into_response())
}

async fn replace(
    State(admin): State<Arc<Admin>>,
    Path((kind_name, id)): Path<(String, String)>,
    body: Bytes,
) -> Answer {
    let kind = kind_and_id(&kind_name, &id)?;
    let existing = admin.etcd.get(&admin.key(kind, &id)).await?;
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let value = store(&admin, kind, &id, &body, existing.map(|kv| kv.value)).await?;
    Ok((status, axum::Json(item_value(kind, &id, value))).into_response())
}

async fn remove(
    State(admin): State<Arc<Admin>>,
    Path((kind_name, id)): Path<(String, String)>,
) -> Answer {
    let kind = kind_and_id(&kind_name, &id)?;
    let dependents = dependents(&admin.store.load(), kind, &id);
    if !dependents.is_empty() {
        return Err(AdminError(
            StatusCode::CONFLICT,
            format!(
                "{kind}/{id} is still used by {}: change or delete those first",
                dependents.join(", ")
            ),
        ));
    }
    if admin.etcd.delete(&admin.key(kind, &id)).await? {
        Ok(axum::Json(json!({ "id": id, "deleted": true })).into_response())
    } else {
        Err(not_found(kind, &id))
    }
}

/// What would silently stop serving if `kind/id` went: the models of a provider key,
/// the routing models that name a model.
fn dependents(snapshot: &Snapshot, kind: Kind, id: &str) -> Vec<String> {
    let mut found: Vec<String> = match kind {
        Kind::ProviderKeys => snapshot
            .models()
            .filter(|m| matches!(&m.target, ModelTarget::Direct(d) if d.provider_key_id == id))
            .map(|m| format!("models/{} ({})", m.id, m.name))
            .collect(),
        Kind::Models => {
            let Some(name) = snapshot
                .models()
                .find(|m| &*m.id == id)
                .map(|m| m.name.clone())
            else {
                return Vec::new();
            };
            snapshot
                .models()
                .filter(|m| match &m.target {
                    ModelTarget::Routing(r) => r.targets.iter().any(|t| *t.model == *name),
                    ModelTarget::Direct(_) => false,
                })
                .map(|m| format!("models/{} ({})", m.id, m.name))
                .collect()
        }
        Kind::Guardrails => {
            let id: std::sync::Arc<str> = id.into();
            snapshot
                .attachments_of(&id)
                .map(|a| format!("guardrail_attachments/{}", a.id))
                .collect()
        }
        Kind::ApiKeys | Kind::GuardrailAttachments => Vec::new(),
    };
    found.sort();
    found
}

fn not_found(kind: Kind, id: &str) -> AdminError {
    AdminError(StatusCode::NOT_FOUND, format!("{kind}/{id} does not exist"))
}

/// Validates a write and stores it; returns the stored document.
async fn store(
    admin: &Admin,
    kind: Kind,
    id: &str,
    body: &[u8],
    existing: Option<Bytes>,
) -> Result<Map<String, Value>, AdminError> {
    let mut doc = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(doc)) => doc,
        Ok(_) => return Err(AdminError::bad("the body must be a JSON object")),
        Err(e) => return Err(AdminError::bad(format!("the body is not valid JSON: {e}"))),
    };
    prepare(kind, &mut doc, existing.as_deref())?;
    let bytes = serde_json::to_vec(&doc).map_err(|e| AdminError::bad(e.to_string()))?;
    let key = ResourceKey::new(kind, id);
    let resource = Resource::parse(&key, &bytes)
        .map_err(|problems| AdminError::bad(format!("invalid {kind}: {problems}")))?;
    check_unique(admin, kind, id, &resource).await?;
    check_references(admin, &resource).await?;
    admin.etcd.put(&key.full(admin.prefix()), &bytes).await?;
    tracing::info!(key = %key, "admin write stored");
    Ok(doc)
}

/// Kind-specific input conveniences: a plaintext caller key becomes its hash; a
/// provider key written without a credential (or with the redaction marker) keeps
/// the stored one.
fn prepare(
    kind: Kind,
    doc: &mut Map<String, Value>,
    existing: Option<&[u8]>,
) -> Result<(), AdminError> {
    match kind {
        Kind::ApiKeys => {
            if let Some(key) = doc.remove("key") {
                let Value::String(key) = key else {
                    return Err(AdminError::bad("key: must be a string"));
                };
                if key.is_empty() {
                    return Err(AdminError::bad("key: must not be empty"));
                }
                if doc.contains_key("key_hash") {
                    return Err(AdminError::bad(
                        "key: give either key or key_hash, not both",
                    ));
                }
                let hash = hex::encode(Sha256::digest(key.as_bytes()));
                doc.insert("key_hash".to_owned(), Value::String(hash));
            }
        }
        Kind::ProviderKeys => {
            for field in ["api_key", "secret"] {
                if doc.get(field).and_then(Value::as_str) == Some(REDACTED) {
                    doc.remove(field);
                }
            }
            let has_credential = doc.contains_key("api_key") || doc.contains_key("secret");
            let stored =
                existing.and_then(|b| serde_json::from_slice::<Map<String, Value>>(b).ok());
            if let (false, Some(stored)) = (has_credential, stored) {
                for field in ["api_key", "secret"] {
                    if let Some(v) = stored.get(field) {
                        doc.insert(field.to_owned(), v.clone());
                    }
                }
            }
        }
        Kind::Models | Kind::Guardrails | Kind::GuardrailAttachments => {}
    }
    Ok(())
}

/// 409 when another resource of the kind already has this display name (guardrails:
/// name; caller keys: also the key hash).
async fn check_unique(
    admin: &Admin,
    kind: Kind,
    id: &str,
    resource: &Resource,
) -> Result<(), AdminError> {
    let (field, name, hash) = match resource {
        Resource::ProviderKey(p) => ("display_name", Some(p.display_name.clone()), None),
        Resource::Model(m) => ("display_name", Some(m.name.to_string()), None),
        Resource::ApiKey(k) => (
            "display_name",
            k.display_name.clone(),
            Some(hex::encode(k.key_hash.0)),
        ),
        Resource::Guardrail(g) => ("name", Some(g.name.to_string()), None),
        Resource::Attachment(_) => return Ok(()),
    };
    let listing = admin.etcd.list(&admin.dir(kind)).await?;
    for kv in &listing.kvs {
        let other = id_of(&kv.key);
        if other == id {
            continue;
        }
        let Ok(doc) = serde_json::from_slice::<Map<String, Value>>(&kv.value) else {
            continue;
        };
        if let Some(name) = &name {
            if doc.get(field).and_then(Value::as_str) == Some(name.as_str()) {
                return Err(AdminError(
                    StatusCode::CONFLICT,
                    format!("{field}: '{name}' is already used by {kind}/{other}"),
                ));
            }
        }
        if let Some(hash) = &hash {
            if doc.get("key_hash").and_then(Value::as_str) == Some(hash.as_str()) {
                return Err(AdminError(
                    StatusCode::CONFLICT,
                    format!("key_hash: this key is already used by {kind}/{other}"),
                ));
            }
        }
    }
    Ok(())
}

/// A model must refer to what exists in the store: its provider key, or (routing)
/// direct models by display name.
async fn check_references(admin: &Admin, resource: &Resource) -> Result<(), AdminError> {
    if let Resource::Attachment(a) = resource {
        let key = admin.key(Kind::Guardrails, &a.guardrail_id);
        if admin.etcd.get(&key).await?.is_none() {
            return Err(AdminError::bad(format!(
                "guardrail_id: guardrail '{}' does not exist",
                a.guardrail_id
            )));
        }
        return Ok(());
    }
    let Resource::Model(model) = resource else {
        return Ok(());
    };
    match &model.target {
        ModelTarget::Direct(d) => {
            let key = admin.key(Kind::ProviderKeys, &d.provider_key_id);
            if admin.etcd.get(&key).await?.is_none() {
                return Err(AdminError::bad(format!(
                    "provider_key_id: provider key '{}' does not exist",
                    d.provider_key_id
                )));
            }
        }
        ModelTarget::Routing(routing) => {
            let listing = admin.etcd.list(&admin.dir(Kind::Models)).await?;
            let direct: Vec<String> = listing
                .kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Map<String, Value>>(&kv.value).ok())
                .filter(|doc| doc.get("routing").is_none())
                .filter_map(|doc| doc.get("display_name")?.as_str().map(str::to_owned))
                .collect();
            let missing: Vec<String> = routing
                .targets
                .iter()
                .enumerate()
                .filter(|(_, t)| !direct.contains(&t.model))
                .map(|(i, t)| {
                    format!(
                        "routing.targets[{i}].model: '{}' is not a direct model",
                        t.model
                    )
                })
                .collect();
            if !missing.is_empty() {
                return Err(AdminError::bad(missing.join("; ")));
            }
        }
    }
    Ok(())
}

fn id_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// `{"id", "value"}` with provider credentials redacted. A stored document that is not
/// a JSON object is reported by its id and what is wrong with it, never by its bytes: a
/// broken provider key may still hold its credential in plain text.
fn item(kind: Kind, id: &str, raw: &[u8]) -> Value {
    let error = match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(doc)) => return item_value(kind, id, doc),
        Ok(_) => "the document is JSON but not an object".to_owned(),
        Err(e) => format!("the document is not valid JSON: {e}"),
    };
    json!({ "id": id, "invalid": true, "error": error })
}

fn item_value(kind: Kind, id: &str, mut doc: Map<String, Value>) -> Value {
    if kind == Kind::ProviderKeys {
        for field in ["api_key", "secret"] {
            if let Some(v) = doc.get_mut(field) {
                *v = Value::String(REDACTED.to_owned());
            }
        }
    }
    json!({ "id": id, "value": doc })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_document_is_reported_without_its_bytes() {
        for raw in [
            &br#"{"display_name": "x", "api_key": "sk-plain-secret-1", oops"#[..],
            br#""sk-plain-secret-1""#,
        ] {
            let shown = item(Kind::ProviderKeys, "pk1", raw).to_string();
            assert!(!shown.contains("sk-plain-secret-1"), "{shown}");
            assert!(shown.contains(r#""invalid":true"#), "{shown}");
            assert!(shown.contains("the document is"), "{shown}");
        }
    }

    #[test]
    fn plaintext_keys_become_hashes_and_credentials_survive_redaction() {
        let mut doc = json!({"key": "sk-caller", "allowed_models": ["*"]});
        let doc = doc.as_object_mut().unwrap();
        prepare(Kind::ApiKeys, doc, None).unwrap();
        assert!(doc.get("key").is_none());
        assert_eq!(doc["key_hash"], hex::encode(Sha256::digest(b"sk-caller")));

        let stored = br#"{"display_name":"p","api_key":"sk-upstream"}"#;
        let mut doc = json!({"display_name": "p2", "api_key": REDACTED});
        let doc = doc.as_object_mut().unwrap();
        prepare(Kind::ProviderKeys, doc, Some(stored)).unwrap();
        assert_eq!(doc["api_key"], "sk-upstream");
        let shown = item_value(Kind::ProviderKeys, "x", doc.clone());
        assert_eq!(shown["value"]["api_key"], REDACTED);
        assert!(!shown.to_string().contains("sk-upstream"));
    }
}
