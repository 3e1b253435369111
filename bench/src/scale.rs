//! Configuration scale, measured in a process of its own (so its memory is only the
//! configuration's): the snapshot store built from a full list of 10,000 models and
//! 100,000 caller keys, then single changes applied to it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use proxy_core::snapshot::{SnapshotStore, Source, SourceEvent};

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    #[arg(long, default_value_t = 10_000)]
    pub models: usize,
    #[arg(long, default_value_t = 100_000)]
    pub keys: usize,
    /// Single changes to time after the build.
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
}

const PREFIX: &str = "/aisix";
const PROVIDER_KEYS: usize = 10;

fn model(i: usize, upstream: &str) -> (String, Bytes) {
    let doc = serde_json::json!({
        "display_name": format!("model-{i}"),
        "model_name": upstream,
        "provider_key_id": format!("pk-{}", i % PROVIDER_KEYS),
    });
    (
        format!("{PREFIX}/models/m-{i}"),
        Bytes::from(doc.to_string()),
    )
}

fn caller_key(i: usize, allowed: &str) -> (String, Bytes) {
    let doc = serde_json::json!({
        "display_name": format!("caller-{i}"),
        "key_hash": tests::key_hash(&format!("caller-key-{i}")),
        "allowed_models": [allowed],
    });
    (
        format!("{PREFIX}/api_keys/k-{i}"),
        Bytes::from(doc.to_string()),
    )
}

/// Prints one JSON line: build time, change times, memory.
pub fn run(args: &ScaleArgs) {
    let rss_before = crate::procs::rss_mib(std::process::id());
    let mut entries: Vec<(String, Bytes)> = (0..PROVIDER_KEYS)
        .map(|i| {
            let doc = serde_json::json!({"display_name": format!("pk-{i}"), "provider": "openai", "api_base": "http://127.0.0.1:9/v1", "api_key": format!("sk-scale-{i}")});
            (format!("{PREFIX}/provider_keys/pk-{i}"), Bytes::from(doc.to_string()))
        })
        .collect();
    entries.extend((0..args.models).map(|i| model(i, "up")));
    entries.extend((0..args.keys).map(|i| caller_key(i, "model-*")));
    let store = SnapshotStore::new(PREFIX);
    let started = Instant::now();
    let report = store.apply(
        Source::Etcd,
        [SourceEvent::Reset {
            entries,
            revision: 1,
        }],
    );
    let build = started.elapsed();
    let snapshot = store.load();
    let (_, models, keys) = snapshot.counts();
    assert_eq!(
        (models, keys, report.newly_rejected.len()),
        (args.models, args.keys, 0),
        "every resource is served; first rejection: {:?}",
        report.newly_rejected.first()
    );
    drop(snapshot);
    let rss_built = crate::procs::rss_mib(std::process::id());

    let mut model_changes = Vec::new();
    let mut key_changes = Vec::new();
    for n in 0..args.changes {
        let i = (n * 7919) % args.models;
        let (key, value) = if n % 2 == 0 {
            model(i, &format!("up-{n}"))
        } else {
            caller_key(i * 10, &format!("model-{n}"))
        };
        let started = Instant::now();
        store.apply(
            Source::Etcd,
            [SourceEvent::Put {
                key,
                value,
                revision: 2 + n as i64,
            }],
        );
        let took = started.elapsed();
        if n % 2 == 0 {
            model_changes.push(took)
        } else {
            key_changes.push(took)
        }
    }
    let started = Instant::now();
    let documents = store.documents();
    let list = started.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        serde_json::json!({"p50_ms": ms(v[v.len() / 2]), "max_ms": ms(v[v.len() - 1])})
    };
    println!(
        "{}",
        serde_json::json!({
            "models": args.models,
            "keys": args.keys,
            "build_ms": ms(build),
            "model_change": stats(&mut model_changes),
            "key_change": stats(&mut key_changes),
            "documents_ms": ms(list),
            "documents": documents.entries.len(),
            "rss_mib": rss_built,
            "rss_added_mib": rss_built - rss_before,
        })
    );
}
