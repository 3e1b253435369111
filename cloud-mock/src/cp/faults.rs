//! Fault injection knobs, set through the console and observed by gateways.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// What a chosen data-plane endpoint answers instead of its normal reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointFault {
    /// This status with a JSON error body.
    Status(u16),
    /// 200 with a body that is not valid JSON.
    Malformed,
}

pub struct Faults {
    /// A message here ends every open watch stream.
    pub cut_watches: broadcast::Sender<()>,
    stall_watches: AtomicBool,
    refuse_connections: AtomicBool,
    delay_ms: AtomicU64,
    endpoints: Mutex<HashMap<String, EndpointFault>>,
    /// Data-plane calls per endpoint name since the start (faulted ones included).
    calls: Mutex<BTreeMap<String, u64>>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            cut_watches: broadcast::channel(4).0,
            stall_watches: AtomicBool::new(false),
            refuse_connections: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            endpoints: Mutex::new(HashMap::new()),
            calls: Mutex::default(),
        }
    }
}

/// The settable knobs, as the console shows and takes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// Close new data-plane connections before the TLS handshake.
    pub refuse_connections: bool,
    /// Wait this long before the handshake of each new connection.
    pub delay_ms: u64,
    /// Keep watch streams open but send nothing (no events, no progress).
    pub stall_watches: bool,
    /// Endpoint name (`range`, `watch`, `heartbeat`, `budget_check`, `telemetry`,
    /// `rotate_cert`, `register`) -> fault.
    pub endpoints: HashMap<String, EndpointFault>,
}

impl Faults {
    pub fn set(&self, s: &FaultSettings) {
        self.refuse_connections
            .store(s.refuse_connections, Ordering::SeqCst);
        self.delay_ms.store(s.delay_ms, Ordering::SeqCst);
        self.stall_watches.store(s.stall_watches, Ordering::SeqCst);
        *lock(&self.endpoints) = s.endpoints.clone();
    }

    pub fn get(&self) -> FaultSettings {
        FaultSettings {
            refuse_connections: self.refuse_connections.load(Ordering::SeqCst),
            delay_ms: self.delay_ms.load(Ordering::SeqCst),
            stall_watches: self.stall_watches.load(Ordering::SeqCst),
            endpoints: lock(&self.endpoints).clone(),
        }
    }

    /// Ends every open watch stream now.
    pub fn cut(&self) {
        let _ = self.cut_watches.send(());
    }

    pub fn stalled(&self) -> bool {
        self.stall_watches.load(Ordering::SeqCst)
    }

    pub fn refusing(&self) -> bool {
        self.refuse_connections.load(Ordering::SeqCst)
    }

    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }

    /// Data-plane calls per endpoint name since the start.
    pub fn calls(&self) -> BTreeMap<String, u64> {
        lock(&self.calls).clone()
    }

    /// Counts a call of `endpoint` and returns the injected answer, if one is set.
    pub fn endpoint_answer(&self, endpoint: &str) -> Option<Response> {
        *lock(&self.calls).entry(endpoint.to_owned()).or_default() += 1;
        match lock(&self.endpoints).get(endpoint)? {
            EndpointFault::Status(code) => {
                let status =
                    StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let body = serde_json::json!({"error": "injected fault", "message": "injected fault", "code": 14});
                Some((status, axum::Json(body)).into_response())
            }
            EndpointFault::Malformed => Some(
                (
                    StatusCode::OK,
                    [("content-type", "application/json")],
                    "{\"header\": {\"revision\": ",
                )
                    .into_response(),
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
