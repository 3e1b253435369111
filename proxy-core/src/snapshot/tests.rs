use super::*;
use crate::resources::{Kind, ModelTarget};

const P: &str = "/aisix";

fn pk(id: &str) -> (String, Bytes) {
    (
        format!("{P}/provider_keys/{id}"),
        Bytes::from(format!(
            r#"{{"display_name":"{id}","provider":"openai","api_key":"sk-{id}"}}"#
        )),
    )
}

fn direct(id: &str, name: &str, pk: &str) -> (String, Bytes) {
    (
        format!("{P}/models/{id}"),
        Bytes::from(format!(
            r#"{{"display_name":"{name}","model_name":"up-{name}","provider_key_id":"{pk}"}}"#
        )),
    )
}

fn router(id: &str, name: &str, targets: &[&str]) -> (String, Bytes) {
    let t: Vec<String> = targets
        .iter()
        .map(|t| format!(r#"{{"model":"{t}"}}"#))
        .collect();
    (
        format!("{P}/models/{id}"),
        Bytes::from(format!(
            r#"{{"display_name":"{name}","routing":{{"targets":[{}]}}}}"#,
            t.join(",")
        )),
    )
}

fn put((key, value): (String, Bytes), revision: i64) -> SourceEvent {
    SourceEvent::Put {
        key,
        value,
        revision,
    }
}

fn del(key: &str, revision: i64) -> SourceEvent {
    SourceEvent::Delete {
        key: format!("{P}/{key}"),
        revision,
    }
}

fn rejected(s: &Snapshot) -> Vec<(String, bool)> {
    s.rejections()
        .map(|r| (r.key.to_string(), r.serving_previous))
        .collect()
}

fn model_names(s: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = s.models().map(|m| m.name.to_string()).collect();
    v.sort();
    v
}

#[test]
fn reset_builds_indexes_and_rejects_only_bad_resources() {
    let store = SnapshotStore::new(P);
    let report = store.apply(
        Source::File,
        [SourceEvent::Reset {
            entries: vec![
                pk("pk1"),
                direct("m1", "gpt", "pk1"),
                direct("m2", "orphan", "missing"),
                (format!("{P}/models/m3"), Bytes::from_static(b"{broken")),
                router("r1", "auto", &["gpt"]),
                (format!("{P}/unknown_kind/x"), Bytes::from_static(b"{}")),
            ],
            revision: 7,
        }],
    );
    let s = store.load();
    assert_eq!(s.revision, 7);
    assert_eq!(model_names(&s), ["auto", "gpt"]);
    assert_eq!(
        rejected(&s),
        [("models/m2".into(), false), ("models/m3".into(), false)]
    );
    assert_eq!(report.newly_rejected.len(), 2);
    let orphan = s.rejections().next().unwrap();
    assert!(
        orphan
            .error
            .contains("provider key 'missing' does not exist"),
        "{}",
        orphan.error
    );
    assert_eq!(s.provider_key("pk1").unwrap().credential.expose(), "sk-pk1");
}

#[test]
fn a_rejected_update_keeps_the_previous_value_serving() {
    let store = SnapshotStore::new(P);
    store.apply(
        Source::Etcd,
        [put(pk("pk1"), 1), put(direct("m1", "gpt", "pk1"), 2)],
    );
    store.apply(
        Source::Etcd,
        [put(
            (
                format!("{P}/models/m1"),
                Bytes::from_static(br#"{"display_name":"gpt","timeout":"x"}"#),
            ),
            3,
        )],
    );
    let s = store.load();
    assert_eq!(s.revision, 3);
    let ModelTarget::Direct(d) = &s.model("gpt").unwrap().target else {
        panic!()
    };
    assert_eq!(d.model_name, "up-gpt");
    assert_eq!(rejected(&s), [("models/m1".into(), true)]);

    // A fixed document clears the rejection.
    let report = store.apply(Source::Etcd, [put(direct("m1", "gpt", "pk1"), 4)]);
    assert_eq!(report.recovered, ["models/m1"]);
    assert!(rejected(&store.load()).is_empty());
}

#[test]
fn deleting_a_provider_key_cascades_to_models_and_routers_and_back() {
    let store = SnapshotStore::new(P);
    store.apply(
        Source::Etcd,
        [
            put(pk("pk1"), 1),
            put(direct("m1", "gpt", "pk1"), 2),
            put(router("r1", "auto", &["gpt"]), 3),
        ],
    );
    assert_eq!(model_names(&store.load()), ["auto", "gpt"]);

    store.apply(Source::Etcd, [del("provider_keys/pk1", 4)]);
    let s = store.load();
    assert!(model_names(&s).is_empty());
    assert_eq!(
        rejected(&s),
        [("models/m1".into(), false), ("models/r1".into(), false)]
    );

    store.apply(Source::Etcd, [put(pk("pk1"), 5)]);
    let s = store.load();
    assert_eq!(model_names(&s), ["auto", "gpt"]);
    assert!(rejected(&s).is_empty());
}

#[test]
fn duplicate_names_and_hashes_keep_the_lowest_key() {
    let store = SnapshotStore::new(P);
    store.apply(
        Source::Etcd,
        [put(pk("pk1"), 1), put(direct("m2", "gpt", "pk1"), 2)],
    );
    store.apply(Source::Etcd, [put(direct("m1", "gpt", "pk1"), 3)]);
    let s = store.load();
    assert_eq!(&*s.model("gpt").unwrap().id, "m1");
    assert_eq!(rejected(&s), [("models/m2".into(), false)]);

    // Renaming the winner frees the name for the other.
    store.apply(Source::Etcd, [put(direct("m1", "gpt-renamed", "pk1"), 4)]);
    let s = store.load();
    assert_eq!(&*s.model("gpt").unwrap().id, "m2");
    assert_eq!(model_names(&s), ["gpt", "gpt-renamed"]);
    assert!(rejected(&s).is_empty());

    let hash = hex::encode(KeyHash::of_plaintext("k").0);
    let key = |id: &str| {
        (
            format!("{P}/api_keys/{id}"),
            Bytes::from(format!(r#"{{"key_hash":"{hash}","allowed_models":["*"]}}"#)),
        )
    };
    store.apply(Source::Etcd, [put(key("b"), 5), put(key("a"), 6)]);
    let s = store.load();
    assert_eq!(&*s.api_key(&KeyHash::of_plaintext("k")).unwrap().id, "a");
    assert_eq!(rejected(&s), [("api_keys/b".into(), false)]);
    store.apply(Source::Etcd, [del("api_keys/a", 7)]);
    assert_eq!(
        &*store
            .load()
            .api_key(&KeyHash::of_plaintext("k"))
            .unwrap()
            .id,
        "b"
    );
}

#[test]
fn reset_deletes_missing_keys_and_skips_unchanged_ones() {
    let store = SnapshotStore::new(P);
    store.apply(
        Source::Etcd,
        [put(pk("pk1"), 1), put(direct("m1", "gpt", "pk1"), 2)],
    );
    let report = store.apply(
        Source::Etcd,
        [SourceEvent::Reset {
            entries: vec![pk("pk1"), direct("m1", "gpt", "pk1")],
            revision: 9,
        }],
    );
    assert_eq!(report.changed_keys, 0);
    let report = store.apply(
        Source::Etcd,
        [SourceEvent::Reset {
            entries: vec![pk("pk1")],
            revision: 10,
        }],
    );
    assert_eq!(report.changed_keys, 1);
    assert!(store.load().model("gpt").is_none());
}

#[test]
fn a_request_keeps_its_snapshot_while_updates_commit() {
    let store = SnapshotStore::new(P);
    store.apply(
        Source::Etcd,
        [put(pk("pk1"), 1), put(direct("m1", "gpt", "pk1"), 2)],
    );
    let held = store.load();
    store.apply(Source::Etcd, [del("models/m1", 3)]);
    assert!(held.model("gpt").is_some());
    assert!(store.load().model("gpt").is_none());
}

#[test]
fn routing_targets_must_be_direct_models() {
    let store = SnapshotStore::new(P);
    store.apply(
        Source::Etcd,
        [
            put(pk("pk1"), 1),
            put(direct("m1", "gpt", "pk1"), 2),
            put(router("r1", "auto", &["gpt"]), 3),
            put(router("r2", "meta", &["auto", "nope"]), 4),
        ],
    );
    let s = store.load();
    assert_eq!(model_names(&s), ["auto", "gpt"]);
    let r = s.rejections().next().unwrap();
    assert_eq!(r.key.kind, Kind::Models);
    assert!(
        r.error.contains("routing.targets[0].model: 'auto'")
            && r.error.contains("routing.targets[1].model: 'nope'"),
        "{}",
        r.error
    );
}

#[tokio::test(start_paused = true)]
async fn freshness_tracks_apply_and_progress() {
    let store = SnapshotStore::new(P);
    assert_eq!(
        store.freshness(),
        Freshness {
            source: None,
            revision: 0,
            age: None
        }
    );
    store.apply(Source::Etcd, [put(pk("pk1"), 5)]);
    tokio::time::advance(Duration::from_secs(30)).await;
    let f = store.freshness();
    assert_eq!(
        (f.source, f.revision, f.age),
        (Some(Source::Etcd), 5, Some(Duration::from_secs(30)))
    );
    store.apply(Source::Etcd, [SourceEvent::Progress { revision: 8 }]);
    let f = store.freshness();
    assert_eq!((f.revision, f.age), (8, Some(Duration::ZERO)));
}

#[test]
fn large_configs_apply_single_changes_cheaply() {
    // Not a timing test: checks that a one-key change touches one key.
    let store = SnapshotStore::new(P);
    let mut entries = vec![pk("pk1")];
    entries.extend((0..2000).map(|i| direct(&format!("m{i}"), &format!("name{i}"), "pk1")));
    store.apply(
        Source::Etcd,
        [SourceEvent::Reset {
            entries,
            revision: 1,
        }],
    );
    let report = store.apply(Source::Etcd, [put(direct("m5", "renamed", "pk1"), 2)]);
    assert_eq!(report.changed_keys, 1);
    assert_eq!(store.load().counts(), (1, 2000, 0));
}

#[test]
fn documents_keep_the_last_good_value_and_commits_are_signalled() {
    let store = SnapshotStore::new(P);
    let mut commits = store.subscribe();
    store.apply(
        Source::Etcd,
        [put(pk("a"), 2), put(direct("m1", "gpt", "a"), 3)],
    );
    assert!(commits.has_changed().unwrap());
    commits.borrow_and_update();
    let good = store.documents();
    assert_eq!(good.revision, 3);
    assert_eq!(good.entries.len(), 2);
    assert!(good.entries[0].0.ends_with("/models/m1"), "sorted by key");

    // A broken update keeps the old document for a restart, and is signalled.
    store.apply(
        Source::Etcd,
        [put(
            (
                format!("{P}/provider_keys/a"),
                Bytes::from_static(b"{not json"),
            ),
            4,
        )],
    );
    assert!(commits.has_changed().unwrap());
    commits.borrow_and_update();
    let after = store.documents();
    assert_eq!(after.revision, 4);
    assert_eq!(after.entries, good.entries);

    // Progress alone is not a change worth persisting.
    store.apply(Source::Etcd, [SourceEvent::Progress { revision: 9 }]);
    assert!(!commits.has_changed().unwrap());

    store.apply(Source::Etcd, [del("models/m1", 10)]);
    assert_eq!(store.documents().entries.len(), 1);
}

#[test]
fn a_generic_key_serves_models_that_name_their_provider_only() {
    let store = SnapshotStore::new(P);
    let model = |id: &str, body: &str| (format!("{P}/models/{id}"), Bytes::from(body.to_owned()));
    store.apply(
        Source::File,
        [SourceEvent::Reset {
            entries: vec![
                (
                    format!("{P}/provider_keys/shared"),
                    Bytes::from_static(br#"{"display_name":"shared","api_key":"sk-shared"}"#),
                ),
                model(
                    "m1",
                    r#"{"display_name":"claude","provider":"anthropic","model_name":"c","provider_key_id":"shared"}"#,
                ),
                model(
                    "m2",
                    r#"{"display_name":"orphan","model_name":"x","provider_key_id":"shared"}"#,
                ),
                model(
                    "m3",
                    r#"{"display_name":"acme","provider":"acme-llm","model_name":"x","provider_key_id":"shared"}"#,
                ),
            ],
            revision: 1,
        }],
    );
    let s = store.load();
    assert_eq!(model_names(&s), ["claude"]);
    let key = s.provider_key("shared").unwrap();
    assert!(key.generic);
    let as_anthropic = key.for_provider("anthropic").unwrap();
    assert_eq!(as_anthropic.adapter, crate::resources::Adapter::Anthropic);
    assert_eq!(as_anthropic.api_base, "https://api.anthropic.com");
    let errors: Vec<String> = s.rejections().map(|r| r.error.clone()).collect();
    assert!(errors[0].contains("provider: required"), "{errors:?}");
    assert!(errors[1].contains("no public endpoint"), "{errors:?}");
}
