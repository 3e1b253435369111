//! The listener set, computed once from the config: which listeners this mode has,
//! their addresses and their TLS settings; bound before anything serves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use proxy_core::http::{ListenerOptions, serve};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::config::{Config, ListenerTlsSection};
use crate::files;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Proxy,
    /// Self-hosted mode's admin API (only with an `etcd` and an `admin` section).
    Admin,
    /// Metrics and status, unless `observability.metrics.prometheus.enabled` is false.
    Metrics,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
        }
    }
}

/// One listener of the set, before it is bound.
pub struct Planned {
    pub role: Role,
    pub addr: SocketAddr,
    /// The config field the address comes from, for error messages.
    field: &'static str,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Sockets on the address, one per worker; more than one share it with
    /// `SO_REUSEPORT`, and the kernel spreads connections over them.
    copies: usize,
}

/// The listeners `config` asks for, their TLS files read (key files made private
/// first), so a broken certificate stops start-up before any port is bound.
pub fn plan(config: &Config) -> anyhow::Result<Vec<Planned>> {
    let mut set = vec![Planned {
        role: Role::Proxy,
        addr: config.proxy.addr,
        field: "proxy.addr",
        tls: tls(config.proxy.tls.as_ref(), "proxy")?,
        copies: if config.thread_per_core() {
            config.workers()
        } else {
            1
        },
    }];
    if let (Some(_), Some(admin)) = (&config.etcd, config.admin()) {
        set.push(Planned {
            role: Role::Admin,
            addr: admin.addr,
            field: "admin.addr",
            tls: tls(admin.tls.as_ref(), "admin")?,
            copies: 1,
        });
    }
    let prometheus = &config.observability.metrics.prometheus;
    if prometheus.enabled {
        set.push(Planned {
            role: Role::Metrics,
            addr: prometheus.addr,
            field: "observability.metrics.prometheus.addr",
            tls: None,
            copies: 1,
        });
    }
    Ok(set)
}

fn tls(
    section: Option<&ListenerTlsSection>,
    name: &str,
) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let Some(tls) = section else {
        return Ok(None);
    };
    let cert = read(&tls.cert_file, &format!("{name}.tls.cert_file"))?;
    let key = files::read_private(&tls.key_file, &format!("{name}.tls.key_file"))?;
    let config = certs::tls::listener_config(&cert, &key).with_context(|| format!("{name}.tls"))?;
    Ok(Some(Arc::new(config)))
}

fn read(path: &Path, field: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("{field}: cannot read {}", path.display()))
}

/// A bound listener: one socket, or one per worker on the same address.
pub struct Bound {
    pub role: Role,
    pub listeners: Vec<TcpListener>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.listeners.first() {
            Some(listener) => listener.local_addr(),
            None => Err(std::io::Error::other("no socket bound")),
        }
    }
}

/// Connections the kernel holds for a listener at its `max_connections` (the system's
/// `net.core.somaxconn` may lower it).
pub const BACKLOG: u32 = 1024;

/// Binds the whole set; the first address that cannot be bound stops start-up.
pub async fn bind(set: Vec<Planned>) -> anyhow::Result<Vec<Bound>> {
    let mut bound = Vec::with_capacity(set.len());
    for planned in set {
        let cannot = || format!("{}: cannot listen on {}", planned.field, planned.addr);
        let mut addr = planned.addr;
        if planned.copies > 1 {
            // A socket of another process that shares the port the same way would be
            // joined silently, and take half the connections: a plain socket finds
            // the port taken. Port 0 picks the port here, once, for every worker.
            let probe = listen(addr, false).with_context(cannot)?;
            addr = probe.local_addr().with_context(cannot)?;
        }
        let shared = planned.copies > 1;
        let mut listeners = Vec::with_capacity(planned.copies);
        for _ in 0..planned.copies {
            listeners.push(listen(addr, shared).with_context(cannot)?);
        }
        bound.push(Bound {
            role: planned.role,
            listeners,
            tls: planned.tls,
        });
    }
    Ok(bound)
}

/// A listening socket with a [`BACKLOG`]-deep queue (the standard library's bind
/// gives 128); `shared` lets sockets of this process share the address.
fn listen(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves one listener until `stop`. A listener that fails (or whose task panics)
/// cancels `failed`: the agent then stops serving and exits non-zero, rather than
/// staying up and ready without it.
pub async fn serve_logged(
    listener: TcpListener,
    app: proxy_core::http::App,
    stop: CancellationToken,
    options: ListenerOptions,
    failed: CancellationToken,
) {
    let name = options.name;
    let error = match tokio::spawn(serve(listener, app, stop, options)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("its task ended: {e}"),
    };
    error!(listener = name, error, "listener failed; the agent stops");
    failed.cancel();
}

pub fn scheme(options: &ListenerOptions) -> &'static str {
    if options.tls.is_some() {
        "https"
    } else {
        "http"
    }
}
