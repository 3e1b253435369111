//! The data-plane listener: mutual TLS only. Each connection's gateway identity comes
//! from its verified client certificate and is handed to the handlers; revoked
//! gateways and certificates without an identity are refused in the handshake.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Extension;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use certs::GatewayIdentity;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ControlPlane, etcd_api};

pub fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/v3/kv/range", post(etcd_api::range))
        .route("/v3/watch", post(etcd_api::watch))
        .layer(middleware::from_fn_with_state(cp.clone(), refuse_revoked))
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
pub async fn serve(
    cp: Arc<ControlPlane>,
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    stop: CancellationToken,
) {
    let app = router(cp.clone());
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
        let (cp, app, tls, stop) = (cp.clone(), app.clone(), tls.clone(), stop.clone());
        connections.spawn(async move {
            let delay = cp.faults.delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = tcp.set_nodelay(true);
            let stream = match TlsAcceptor::from(tls.load_full()).accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(peer = %peer_addr, error = %e, "data-plane handshake refused");
                    return;
                }
            };
            let Some(identity) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(certs::tls::peer_identity)
            else {
                return;
            };
            let service = TowerToHyperService::new(app.layer(Extension(identity)));
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
