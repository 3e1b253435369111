//! cloud-mock's control plane over real mutual TLS, driven with the agent's own etcd
//! client: the etcd subset's semantics, environment isolation, handshake refusals and
//! fault knobs as a gateway observes them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should fail the test loudly"
)]

use std::time::Duration;

use agent::etcd::{EtcdClient, EtcdError, WatchMessage, WatchStream};
use certs::tls::{SwappableIdentity, client_config};
use certs::{Bundle, CertificateAuthority, PemSource};
use cloud_mock::cp::faults::{EndpointFault, FaultSettings};
use cloud_mock::cp::{Running, start};
use proxy_core::snapshot::SourceEvent;

const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(5);

use tests::cloud::mtls_http as http_with;

fn gateway_tls(
    ca: &CertificateAuthority,
    trust_pem: &str,
    env: &str,
    dp: &str,
) -> rustls::ClientConfig {
    let issued = ca
        .issue_gateway(&certs::GatewayIdentity::new(env, dp).unwrap(), DAY)
        .unwrap();
    let src = |s: &str| PemSource::Inline(s.to_owned());
    let bundle = Bundle::load(
        &src(&issued.cert_pem),
        &src(issued.key_pem.expose()),
        &src(ca.cert_pem()),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    client_config(trust_pem, None, SwappableIdentity::new(&bundle).unwrap()).unwrap()
}

fn client(cp: &Running, env: &str, dp: &str) -> EtcdClient {
    let ca = cp.cp.ca();
    let tls = gateway_tls(&ca, ca.cert_pem(), env, dp);
    EtcdClient::with_http(http_with(tls), std::slice::from_ref(&cp.dp_url), WAIT, None).unwrap()
}

async fn next(stream: &mut WatchStream) -> WatchMessage {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a watch message in time")
        .unwrap()
        .expect("the stream is open")
}

fn keys(events: &[SourceEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            SourceEvent::Put { key, .. } => format!("put {key}"),
            SourceEvent::Delete { key, .. } => format!("delete {key}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn watch_semantics_and_environment_isolation() {
    let cp = start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    cp.cp.set_progress_interval(Duration::from_millis(200));
    let kv = &cp.cp.kv;
    kv.put("/aisix/env-a/models/m1", "{\"a\":1}".into());
    kv.put("/aisix/env-b/models/m1", "{\"b\":1}".into());
    let a = client(&cp, "env-a", "dp-1");

    let listing = a.list("/aisix/env-a/").await.unwrap();
    assert_eq!(listing.kvs.len(), 1);
    assert_eq!(listing.kvs[0].key, "/aisix/env-a/models/m1");
    assert_eq!(listing.revision, kv.revision());
    for outside in ["/aisix/env-b/", "/aisix/", "/aisix/env-a"] {
        match a.list(outside).await {
            Err(EtcdError::Status { status: 403, .. }) => {}
            other => panic!("{outside}: expected 403, got {other:?}"),
        }
    }
    assert!(matches!(
        a.get("/aisix/env-b/models/m1").await,
        Err(EtcdError::Status { status: 403, .. })
    ));
    assert!(matches!(
        a.watch("/aisix/env-b/", 1).await,
        Err(EtcdError::Status { status: 403, .. })
    ));

    // From the next revision: deltas in order, other environments invisible, deletes.
    let mut watch = a
        .watch("/aisix/env-a/", listing.revision + 1)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut watch).await,
        WatchMessage::Created { .. }
    ));
    kv.put("/aisix/env-b/models/m2", "{}".into());
    let r1 = kv.put("/aisix/env-a/models/m2", "{}".into());
    let r2 = kv.delete("/aisix/env-a/models/m1").unwrap();
    let mut seen = Vec::new();
    let mut revisions = Vec::new();
    while seen.len() < 2 {
        match next(&mut watch).await {
            WatchMessage::Events { events, .. } => {
                revisions.extend(events.iter().map(|e| match e {
                    SourceEvent::Put { revision, .. } | SourceEvent::Delete { revision, .. } => {
                        *revision
                    }
                    _ => 0,
                }));
                seen.extend(keys(&events));
            }
            WatchMessage::Progress { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "put /aisix/env-a/models/m2",
            "delete /aisix/env-a/models/m1"
        ]
    );
    assert_eq!(revisions, [r1, r2]);

    // A quiet watch gets progress at the current revision.
    let WatchMessage::Progress { revision } = next(&mut watch).await else {
        panic!("expected progress")
    };
    assert_eq!(revision, kv.revision());

    // A start revision before the compaction point is answered with compact_revision.
    let start = listing.revision + 1;
    kv.compact(kv.revision()).unwrap();
    let mut old = a.watch("/aisix/env-a/", start).await.unwrap();
    let mut compacted = None;
    for _ in 0..2 {
        if let WatchMessage::Compacted { compact_revision } = next(&mut old).await {
            compacted = Some(compact_revision);
            break;
        }
    }
    assert_eq!(compacted, Some(kv.revision()));
    // Starting from the past but after compaction replays what happened since.
    let r3 = kv.put("/aisix/env-a/models/m3", "{}".into());
    let mut replay = a.watch("/aisix/env-a/", r3).await.unwrap();
    assert!(matches!(
        next(&mut replay).await,
        WatchMessage::Created { .. }
    ));
    let WatchMessage::Events { events, .. } = next(&mut replay).await else {
        panic!("expected the replayed put")
    };
    assert_eq!(keys(&events), ["put /aisix/env-a/models/m3"]);
    cp.shutdown().await;
}

#[tokio::test]
async fn foreign_ca_and_revoked_handshakes_are_refused_and_no_certificate_reaches_only_enrollment()
{
    let cp = start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let ca = cp.cp.ca();
    let list = |client: EtcdClient| async move { client.list("/aisix/env-a/").await };

    assert!(list(client(&cp, "env-a", "dp-1")).await.is_ok());

    let anonymous = certs::tls::plain_client_config(ca.cert_pem(), None).unwrap();
    let anonymous = EtcdClient::with_http(
        http_with(anonymous),
        std::slice::from_ref(&cp.dp_url),
        WAIT,
        None,
    )
    .unwrap();
    // Without a certificate the handshake completes (agents enroll that way) but
    // nothing beyond /dp/register answers.
    assert!(matches!(
        list(anonymous).await,
        Err(EtcdError::Status { status: 401, .. })
    ));

    let foreign = CertificateAuthority::generate("foreign", DAY).unwrap();
    let tls = gateway_tls(&foreign, ca.cert_pem(), "env-a", "dp-1");
    let foreign =
        EtcdClient::with_http(http_with(tls), std::slice::from_ref(&cp.dp_url), WAIT, None)
            .unwrap();
    assert!(matches!(
        list(foreign).await,
        Err(EtcdError::Transport { .. })
    ));

    cp.cp.revoke("env-a", "dp-gone").unwrap();
    assert!(matches!(
        list(client(&cp, "env-a", "dp-gone")).await,
        Err(EtcdError::Transport { .. })
    ));
    assert!(
        list(client(&cp, "env-a", "dp-2")).await.is_ok(),
        "others are unaffected"
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn fault_knobs_are_observable_from_a_gateway() {
    let cp = start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    cp.cp.set_progress_interval(Duration::from_millis(100));
    let a = client(&cp, "env-a", "dp-1");
    let faults = &cp.cp.faults;

    faults.set(&FaultSettings {
        endpoints: [("range".to_owned(), EndpointFault::Status(503))].into(),
        ..FaultSettings::default()
    });
    assert!(matches!(
        a.list("/aisix/env-a/").await,
        Err(EtcdError::Status { status: 503, .. })
    ));
    faults.set(&FaultSettings {
        endpoints: [("range".to_owned(), EndpointFault::Malformed)].into(),
        ..FaultSettings::default()
    });
    assert!(matches!(
        a.list("/aisix/env-a/").await,
        Err(EtcdError::Malformed { .. })
    ));
    faults.set(&FaultSettings::default());
    let revision = a.list("/aisix/env-a/").await.unwrap().revision;

    // Stalled: the stream stays open but says nothing, not even progress.
    let mut watch = a.watch("/aisix/env-a/", revision + 1).await.unwrap();
    assert!(matches!(
        next(&mut watch).await,
        WatchMessage::Created { .. }
    ));
    assert!(matches!(
        next(&mut watch).await,
        WatchMessage::Progress { .. }
    ));
    faults.set(&FaultSettings {
        stall_watches: true,
        ..FaultSettings::default()
    });
    // Drain what was already queued, then expect silence.
    let _ = tokio::time::timeout(Duration::from_millis(150), watch.next()).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.next())
            .await
            .is_err()
    );
    faults.set(&FaultSettings::default());
    assert!(matches!(
        next(&mut watch).await,
        WatchMessage::Progress { .. }
    ));

    // Cut: open streams end.
    faults.cut();
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match watch.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(ended, Ok(None) | Err(_)));

    // Refused and delayed connections.
    faults.set(&FaultSettings {
        refuse_connections: true,
        ..FaultSettings::default()
    });
    assert!(matches!(
        client(&cp, "env-a", "dp-9").list("/aisix/env-a/").await,
        Err(EtcdError::Transport { .. })
    ));
    faults.set(&FaultSettings {
        delay_ms: 400,
        ..FaultSettings::default()
    });
    let started = std::time::Instant::now();
    client(&cp, "env-a", "dp-10")
        .list("/aisix/env-a/")
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400));
    cp.shutdown().await;
}

#[tokio::test]
async fn the_console_drives_what_gateways_see() {
    let cp = start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let console = |method: reqwest::Method, path: &str, body: Option<serde_json::Value>| {
        let mut request = http
            .request(method, format!("{}{path}", cp.console_url))
            .bearer_auth(&cp.console_token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response
                    .json::<serde_json::Value>()
                    .await
                    .unwrap_or_default(),
            )
        }
    };
    use reqwest::Method;
    use serde_json::json;

    let wrong = http
        .get(format!("{}/console/v1/environments", cp.console_url))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        console(
            Method::POST,
            "/console/v1/environments",
            Some(json!({"id": "prod"}))
        )
        .await
        .0,
        201
    );
    assert_eq!(
        console(
            Method::POST,
            "/console/v1/environments",
            Some(json!({"id": "prod"}))
        )
        .await
        .0,
        409
    );
    let (_, envs) = console(Method::GET, "/console/v1/environments", None).await;
    assert_eq!(envs["environments"], json!(["prod"]));

    // A bundle issued by the console is a working gateway identity for its environment.
    let (status, bundle) = console(
        Method::POST,
        "/console/v1/environments/prod/bundles",
        Some(json!({"dp_id": "dp-1"})),
    )
    .await;
    assert_eq!(status, 200, "{bundle}");
    let src = |field: &str| PemSource::Inline(bundle[field].as_str().unwrap().to_owned());
    let loaded = Bundle::load(
        &src("cert_pem"),
        &src("key_pem"),
        &src("ca_pem"),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(
        (
            loaded.identity.env_id.as_str(),
            loaded.identity.dp_id.as_str()
        ),
        ("prod", "dp-1")
    );
    let tls = client_config(
        &loaded.ca_pem,
        None,
        SwappableIdentity::new(&loaded).unwrap(),
    )
    .unwrap();
    let gateway =
        EtcdClient::with_http(http_with(tls), std::slice::from_ref(&cp.dp_url), WAIT, None)
            .unwrap();

    // Writes through the console are what the gateway lists and watches.
    let (status, put) = console(
        Method::PUT,
        "/console/v1/environments/prod/resources/models/m1",
        Some(json!({"display_name": "gpt"})),
    )
    .await;
    assert_eq!(status, 200, "{put}");
    let first = put["revision"].as_i64().unwrap();
    let listing = gateway.list("/aisix/prod/").await.unwrap();
    assert_eq!((listing.kvs.len(), listing.revision), (1, first));
    let (_, second) = console(
        Method::PUT,
        "/console/v1/environments/prod/resources/models/m2",
        Some(json!({"display_name": "x"})),
    )
    .await;
    assert!(
        second["revision"].as_i64().unwrap() > first,
        "every write bumps the revision"
    );
    assert_eq!(
        console(
            Method::DELETE,
            "/console/v1/environments/prod/resources/models/m2",
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        console(
            Method::DELETE,
            "/console/v1/environments/prod/resources/models/m2",
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        console(
            Method::PUT,
            "/console/v1/environments/nowhere/resources/models/m1",
            Some(json!({}))
        )
        .await
        .0,
        404
    );
    assert_eq!(
        console(
            Method::PUT,
            "/console/v1/environments/prod/resources/widgets/w",
            Some(json!({}))
        )
        .await
        .0,
        404
    );
    let (_, listed) = console(Method::GET, "/console/v1/environments/prod/resources", None).await;
    assert_eq!(listed["resources"][0]["value"]["display_name"], "gpt");

    // Compaction: a watch from before it is answered with compact_revision.
    let (status, compacted) = console(Method::POST, "/console/v1/compact", None).await;
    assert_eq!(status, 200, "{compacted}");
    let mut watch = gateway.watch("/aisix/prod/", first).await.unwrap();
    let mut got = None;
    for _ in 0..2 {
        if let WatchMessage::Compacted { compact_revision } = next(&mut watch).await {
            got = Some(compact_revision);
            break;
        }
    }
    assert_eq!(got, compacted["compact_revision"].as_i64());

    // Faults set through the console are what the gateway observes.
    let (status, _) = console(
        Method::PUT,
        "/console/v1/faults",
        Some(json!({"endpoints": {"range": {"status": 502}}})),
    )
    .await;
    assert_eq!(status, 200);
    assert!(matches!(
        gateway.list("/aisix/prod/").await,
        Err(EtcdError::Status { status: 502, .. })
    ));
    assert_eq!(
        console(Method::PUT, "/console/v1/faults", Some(json!({"bogus": 1})))
            .await
            .0,
        400
    );
    assert_eq!(
        console(Method::PUT, "/console/v1/faults", Some(json!({})))
            .await
            .0,
        200
    );
    assert!(gateway.list("/aisix/prod/").await.is_ok());

    // Revocation: the revoked gateway's open watch ends, its open connection answers
    // 403 and new handshakes fail; another gateway of the environment is unaffected.
    cp.cp.set_progress_interval(Duration::from_millis(100));
    let revision = gateway.list("/aisix/prod/").await.unwrap().revision;
    let mut revoked_watch = gateway.watch("/aisix/prod/", revision + 1).await.unwrap();
    assert!(matches!(
        next(&mut revoked_watch).await,
        WatchMessage::Created { .. }
    ));
    let other = client(&cp, "prod", "dp-2");
    let mut other_watch = other.watch("/aisix/prod/", revision + 1).await.unwrap();
    assert!(matches!(
        next(&mut other_watch).await,
        WatchMessage::Created { .. }
    ));
    assert_eq!(
        console(
            Method::POST,
            "/console/v1/environments/prod/gateways/dp-1/revoke",
            None
        )
        .await
        .0,
        200
    );
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match revoked_watch.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked gateway's watch ends");
    assert!(matches!(ended, Ok(None) | Err(_)));
    assert!(matches!(
        next(&mut other_watch).await,
        WatchMessage::Progress { .. }
    ));
    match gateway.list("/aisix/prod/").await {
        Err(EtcdError::Status { status: 403, .. } | EtcdError::Transport { .. }) => {}
        other => panic!("revoked gateway still answered: {other:?}"),
    }
    let tls = client_config(
        &loaded.ca_pem,
        None,
        SwappableIdentity::new(&loaded).unwrap(),
    )
    .unwrap();
    let fresh = EtcdClient::with_http(http_with(tls), std::slice::from_ref(&cp.dp_url), WAIT, None)
        .unwrap();
    assert!(matches!(
        fresh.list("/aisix/prod/").await,
        Err(EtcdError::Transport { .. })
    ));
    assert!(other.list("/aisix/prod/").await.is_ok());
    cp.shutdown().await;
}
