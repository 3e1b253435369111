//! The data-plane listener: mutual TLS. Each connection's gateway identity comes from
//! its verified client certificate and is handed to the handlers; revoked gateways,
//! foreign CAs and certificates without an identity are refused in the handshake.
//! A client without a certificate (an agent enrolling) reaches `POST /dp/register`
//! and nothing else (401).

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use certs::GatewayIdentity;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ControlPlane, dp_api, etcd_api};

/// What a gateway with a verified certificate may call.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/v3/kv/range", post(etcd_api::range))
        .route("/v3/watch", post(etcd_api::watch))
        .route("/dp/heartbeat", post(dp_api::heartbeat))
        .route("/dp/budget_check", get(dp_api::budget_check))
        .route("/dp/telemetry", post(dp_api::telemetry))
        .route("/dp/rotate-cert", post(dp_api::rotate_cert))
        .route("/dp/register", post(dp_api::register))
        .fallback(|| async {
            etcd_api::gateway_error(StatusCode::NOT_FOUND, 5, "no such endpoint")
        })
        .layer(middleware::from_fn_with_state(cp.clone(), refuse_revoked))
        .with_state(cp)
}

/// What a client without a certificate may call: enrollment only.
pub fn anonymous_router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/dp/register", post(dp_api::register))
        .fallback(|| async {
            etcd_api::gateway_error(
                StatusCode::UNAUTHORIZED,
                16,
                "a client certificate issued by this control plane is required",
            )
        })
        .with_state(cp)
}

/// A gateway revoked after its connection was made gets 403 on every request.
async fn refuse_revoked(
    State(cp): State<Arc<ControlPlane>>,
    Extension(peer): Extension<GatewayIdentity>,
    req: Request,
    next: Next,
) -> Response {
    if cp.is_revoked(&peer) {
        return etcd_api::gateway_error(StatusCode::FORBIDDEN, 7, "this gateway has been revoked");
    }
    next.run(req).await
}

/// Accepts connections until `stop`, then waits for open ones (watches end at `stop`).
pub async fn serve(cp: Arc<ControlPlane>, listener: TcpListener, stop: CancellationToken) {
    let app = router(cp.clone());
    let anonymous = anonymous_router(cp.clone());
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, peer_addr)) = accepted else {
            continue;
        };
        if cp.faults.refusing() {
            drop(tcp);
            continue;
        }
        let Some(tls) = cp.tls.load_full() else {
            continue;
        };
        let (cp, app, anonymous, stop) = (cp.clone(), app.clone(), anonymous.clone(), stop.clone());
        connections.spawn(async move {
            let delay = cp.faults.delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = tcp.set_nodelay(true);
            let stream = match TlsAcceptor::from(tls).accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(peer = %peer_addr, error = %e, "data-plane handshake refused");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(certs::tls::peer_identity);
            let app = match identity {
                Some(identity) => app.layer(Extension(identity)),
                None => anonymous,
            };
            let service = TowerToHyperService::new(app);
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}
