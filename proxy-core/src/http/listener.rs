//! Accepting connections: optional TLS, a header read timeout, a connection limit and
//! graceful drain, for every listener of the agent (proxy, admin, status).
//!
//! One task per connection, tracked so `serve` returns only when the last one is done.
//! At the connection limit the accept loop pauses: new connections wait in the
//! kernel's listen backlog until an open one closes (idle ones close after the header
//! read timeout, which also bounds the wait for a keep-alive connection's next
//! request). A client that never finishes its headers, or its TLS handshake, is
//! disconnected after the same timeout.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, info, warn};

use super::Proxy;

/// How a listener accepts and reads connections.
#[derive(Clone)]
pub struct ListenerOptions {
    /// `proxy`, `admin`, `metrics`: names the listener in logs.
    pub name: &'static str,
    /// Serve HTTPS with this configuration; plain HTTP without one.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A connection must complete its TLS handshake, and each request its headers,
    /// within this time; an idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// Open connections at most; past it new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Hyper's read buffer, the hard bound of a request head (at least 8 KiB). The
    /// proxy refuses smaller oversized heads itself, in its error envelope.
    pub max_head_bytes: usize,
    /// The hard bound of header lines in a request head (hyper's own, 100, when
    /// unset); the proxy refuses fewer past its own limit, in its error envelope.
    pub max_headers: Option<usize>,
    /// Connection slots shared by listeners of one address (a worker each); a
    /// listener alone has `max_connections` of its own.
    pub slots: Option<Arc<Semaphore>>,
}

impl ListenerOptions {
    pub fn plain(name: &'static str) -> Self {
        Self {
            name,
            tls: None,
            header_read_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_head_bytes: 128 * 1024,
            max_headers: None,
            slots: None,
        }
    }
}

/// What a listener serves: an axum router (admin, status), or the proxy.
#[derive(Clone)]
pub enum App {
    Router(Router),
    Proxy(Proxy),
}

impl From<Router> for App {
    fn from(router: Router) -> App {
        App::Router(router)
    }
}

impl From<Proxy> for App {
    fn from(proxy: Proxy) -> App {
        App::Proxy(proxy)
    }
}

impl App {
    async fn call(self, req: http::Request<Incoming>, peer: SocketAddr) -> Response {
        match self {
            App::Router(router) => via_router(router, req.map(Body::new), peer).await,
            App::Proxy(proxy) => proxy.call(req, peer).await,
        }
    }
}

/// `req` answered by `router`, its handlers given the peer's address (`ConnectInfo`).
pub(super) async fn via_router(
    mut router: Router,
    mut req: http::Request<Body>,
    peer: SocketAddr,
) -> Response {
    req.extensions_mut().insert(ConnectInfo(peer));
    match router.call(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Serves `app` on `listener` until `stop` is cancelled, then stops accepting, asks
/// open connections to close after their current request, and waits for them
/// (streams included).
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    stop: CancellationToken,
    options: ListenerOptions,
) -> io::Result<()> {
    let app = app.into();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_head_bytes.max(8192))
        .keep_alive(true);
    if let Some(lines) = options.max_headers {
        http.max_headers(lines);
    }
    let http = Arc::new(http);
    let tls = options.tls.clone().map(TlsAcceptor::from);
    let slots = options
        .slots
        .clone()
        .unwrap_or_else(|| Arc::new(Semaphore::new(options.max_connections.max(1))));
    let connections = TaskTracker::new();
    let mut accept_errors = Throttle::default();
    let mut at_limit = Throttle::default();
    loop {
        let Some(permit) = slot(&slots, &stop, &mut at_limit, &options).await else {
            break;
        };
        let Some((tcp, peer)) = accept(&listener, &stop, &mut accept_errors, options.name).await
        else {
            break;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (app, http, tls, stop) = (app.clone(), http.clone(), tls.clone(), stop.clone());
        let timeout = options.header_read_timeout;
        let name = options.name;
        connections.spawn(async move {
            let _slot = permit;
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.call(req, peer).await) }
            });
            match tls {
                None => drive(&http, tcp, service, &stop).await,
                // Boxed: a TLS stream is larger than a plain one, and every plain
                // connection's task was sized for it (4.7 KiB, 1.1 KiB without).
                Some(acceptor) => {
                    Box::pin(async move {
                        match handshake(acceptor, tcp, timeout).await {
                            Ok(stream) => drive(&http, stream, service, &stop).await,
                            Err(e) => {
                                debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                            }
                        }
                    })
                    .await;
                }
            }
        });
    }
    drop(listener);
    info!(
        listener = options.name,
        open = connections.len(),
        "listener closed; draining connections"
    );
    connections.close();
    connections.wait().await;
    Ok(())
}

/// A connection slot, waiting (and warning, throttled) while the listener is at
/// `max_connections`; `None` once `stop` is cancelled.
async fn slot(
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    at_limit: &mut Throttle,
    options: &ListenerOptions,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    if at_limit.ready() {
        warn!(
            listener = options.name,
            max_connections = options.max_connections,
            "connection limit reached; new connections wait until one closes"
        );
    }
    tokio::select! {
        () = stop.cancelled() => None,
        permit = slots.clone().acquire_owned() => permit.ok(),
    }
}

/// The next connection; `None` once `stop` is cancelled. Errors of one connection are
/// skipped; running out of file descriptors or memory backs off instead of spinning.
async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    errors: &mut Throttle,
    name: &'static str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) if per_connection(&e) => {}
                Err(e) => {
                    if errors.ready() {
                        warn!(listener = name, error = %e, "cannot accept connections; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// Serves one connection; at `stop`, finishes the request in flight and closes.
async fn drive<I, S>(http: &http1::Builder, io: I, service: S, stop: &CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = axum::response::Response,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    let connection = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "connection ended with an error");
    }
}

/// Errors that concern one connection only (it went away before being accepted).
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// At most one log line per interval for a repeating condition.
#[derive(Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        let ready = self
            .0
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(10));
        if ready {
            self.0 = Some(now);
        }
        ready
    }
}
