//! The incremental builder behind `SnapshotStore`: the prepare step.
//!
//! It keeps, for every key the source has, the raw document and the last value that
//! passed validation on its own ("good"). A change re-checks only the key and the keys
//! whose validity depends on it, found through reverse indexes:
//! provider key id -> direct models using it; model name -> models claiming that name
//! and routing models targeting it; key hash -> caller keys claiming it.
//! The snapshot maps are persistent (`imbl`), so cloning for a commit is O(1) and each
//! update is O(log n): applying a change costs in proportion to what changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::{Rejection, Snapshot, unix_now};
use crate::resources::{KeyHash, Kind, Model, ModelTarget, Resource, ResourceKey, types::Adapter};

#[derive(Default)]
pub(super) struct Builder {
    docs: HashMap<ResourceKey, Doc>,
    models_by_pk: Index<Arc<str>>,
    name_claims: Index<Arc<str>>,
    routers_by_target: Index<Arc<str>>,
    hash_claims: Index<KeyHash>,
    pub(super) snapshot: Snapshot,
}

struct Doc {
    raw: Bytes,
    /// The last value of this key that passed validation on its own, and its document.
    good: Option<Resource>,
    good_raw: Option<Bytes>,
    /// Why the current raw document failed validation, if it did.
    invalid: Option<String>,
    /// What the snapshot serves for this key right now.
    published: Option<Resource>,
}

type Index<K> = HashMap<K, BTreeSet<ResourceKey>>;

/// What one batch changed, for logging by the caller.
#[derive(Debug, Default)]
pub struct BatchReport {
    pub changed_keys: usize,
    pub newly_rejected: Vec<Rejection>,
    pub recovered: Vec<String>,
}

impl Builder {
    /// Records a new document for `key` and marks the keys whose validity may change.
    /// Returns false when the document is the one already held.
    pub(super) fn put(
        &mut self,
        key: ResourceKey,
        raw: Bytes,
        dirty: &mut BTreeSet<ResourceKey>,
    ) -> bool {
        if self.docs.get(&key).is_some_and(|d| d.raw == raw) {
            return false;
        }
        let parsed = Resource::parse(&key, &raw);
        let doc = self.docs.entry(key.clone()).or_insert_with(|| Doc {
            raw: Bytes::new(),
            good: None,
            good_raw: None,
            invalid: None,
            published: None,
        });
        doc.raw = raw;
        match parsed {
            Ok(resource) => {
                doc.invalid = None;
                doc.good_raw = Some(doc.raw.clone());
                let old = doc.good.replace(resource);
                self.reindex(&key, old, dirty);
            }
            Err(problems) => {
                doc.invalid = Some(problems.to_string());
                dirty.insert(key);
            }
        }
        true
    }

    /// Forgets `key`; returns false when it was not held.
    pub(super) fn delete(&mut self, key: &ResourceKey, dirty: &mut BTreeSet<ResourceKey>) -> bool {
        let Some(mut doc) = self.docs.remove(key) else {
            return false;
        };
        if let Some(published) = doc.published.take() {
            self.unpublish(key, &published);
        }
        self.snapshot.rejected.remove(key);
        self.reindex(key, doc.good.take(), dirty);
        dirty.remove(key);
        true
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &ResourceKey> {
        self.docs.keys()
    }

    /// The last self-valid document of every key: what a restart should begin from.
    pub(super) fn good_documents(&self) -> impl Iterator<Item = (&ResourceKey, &Bytes)> {
        self.docs
            .iter()
            .filter_map(|(k, d)| d.good_raw.as_ref().map(|raw| (k, raw)))
    }

    /// Re-evaluates every dirty key in dependency order and updates the snapshot maps.
    pub(super) fn settle(&mut self, dirty: BTreeSet<ResourceKey>, report: &mut BatchReport) {
        let mut direct = Vec::new();
        let mut routers = BTreeSet::new();
        let mut rest = Vec::new();
        for key in dirty {
            match (key.kind, self.good(&key)) {
                (Kind::ProviderKeys, _) => self.evaluate(&key, report),
                (Kind::Models, Some(Resource::Model(m)))
                    if matches!(m.target, ModelTarget::Routing(_)) =>
                {
                    routers.insert(key);
                }
                (Kind::Models, _) => direct.push(key),
                (Kind::ApiKeys | Kind::Guardrails | Kind::GuardrailAttachments, _) => {
                    rest.push(key)
                }
            }
        }
        for key in direct {
            self.evaluate(&key, report);
            // A direct model's state decides the routing models that target it.
            let names = [self.good(&key), self.published(&key)]
                .into_iter()
                .flatten()
                .filter_map(model_name);
            for name in names.collect::<Vec<_>>() {
                routers.extend(
                    self.routers_by_target
                        .get(&name)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
        }
        for key in routers.iter().chain(&rest) {
            self.evaluate(key, report);
        }
    }

    fn good(&self, key: &ResourceKey) -> Option<&Resource> {
        self.docs.get(key).and_then(|d| d.good.as_ref())
    }

    fn published(&self, key: &ResourceKey) -> Option<&Resource> {
        self.docs.get(key).and_then(|d| d.published.as_ref())
    }

    /// Moves `key`'s index entries from `old` to its current good value and marks every
    /// key that shares a name, hash or reference with either.
    fn reindex(
        &mut self,
        key: &ResourceKey,
        old: Option<Resource>,
        dirty: &mut BTreeSet<ResourceKey>,
    ) {
        dirty.insert(key.clone());
        let new = self.docs.get(key).and_then(|d| d.good.clone());
        if let Some(old) = &old {
            self.mark_related(key, old, dirty);
            self.index(key, old, false);
        }
        if let Some(new) = &new {
            self.index(key, new, true);
            self.mark_related(key, new, dirty);
        }
    }

    fn mark_related(&self, key: &ResourceKey, r: &Resource, dirty: &mut BTreeSet<ResourceKey>) {
        let mut add =
            |set: Option<&BTreeSet<ResourceKey>>| dirty.extend(set.into_iter().flatten().cloned());
        match r {
            Resource::ProviderKey(_) => add(self.models_by_pk.get(&key.id)),
            Resource::Model(m) => {
                add(self.name_claims.get(&m.name));
                add(self.routers_by_target.get(&m.name));
            }
            Resource::ApiKey(k) => add(self.hash_claims.get(&k.key_hash)),
            Resource::Guardrail(_) | Resource::Attachment(_) => {}
        }
    }

    fn index(&mut self, key: &ResourceKey, r: &Resource, insert: bool) {
        fn edit<K: std::hash::Hash + Eq>(ix: &mut Index<K>, k: K, key: &ResourceKey, insert: bool) {
            if insert {
                ix.entry(k).or_default().insert(key.clone());
            } else if let Some(set) = ix.get_mut(&k) {
                set.remove(key);
                if set.is_empty() {
                    ix.remove(&k);
                }
            }
        }
        match r {
            Resource::ProviderKey(_) => {}
            Resource::Model(m) => {
                edit(&mut self.name_claims, m.name.clone(), key, insert);
                match &m.target {
                    ModelTarget::Direct(d) => {
                        edit(
                            &mut self.models_by_pk,
                            d.provider_key_id.as_str().into(),
                            key,
                            insert,
                        );
                    }
                    ModelTarget::Routing(r) => {
                        for t in &r.targets {
                            edit(
                                &mut self.routers_by_target,
                                t.model.as_str().into(),
                                key,
                                insert,
                            );
                        }
                    }
                }
            }
            Resource::ApiKey(k) => edit(&mut self.hash_claims, k.key_hash, key, insert),
            Resource::Guardrail(_) | Resource::Attachment(_) => {}
        }
    }

    /// Decides what the snapshot serves for `key` and records or clears its rejection.
    fn evaluate(&mut self, key: &ResourceKey, report: &mut BatchReport) {
        let Some(doc) = self.docs.get(key) else {
            return;
        };
        let (invalid, good) = (doc.invalid.clone(), doc.good.clone());
        let serve = match &good {
            Some(r) => self.check_references(key, r).map(|()| r.clone()),
            None => Err(String::new()),
        };
        if let Some(old) = self.docs.get_mut(key).and_then(|d| d.published.take()) {
            self.unpublish(key, &old);
        }
        if let Ok(r) = &serve {
            self.publish(r);
        }
        let serving = serve.as_ref().ok().cloned();
        let error = match (invalid, serve) {
            (Some(invalid), _) => Some(invalid),
            (None, Err(reference)) => Some(reference),
            (None, Ok(_)) => None,
        };
        if let Some(doc) = self.docs.get_mut(key) {
            doc.published = serving.clone();
        }
        self.record(key, error, serving.is_some(), report);
    }

    fn record(
        &mut self,
        key: &ResourceKey,
        error: Option<String>,
        serving: bool,
        report: &mut BatchReport,
    ) {
        let previous = self.snapshot.rejected.get(key).cloned();
        match (error, previous) {
            (None, None) => {}
            (None, Some(_)) => {
                self.snapshot.rejected.remove(key);
                report.recovered.push(key.to_string());
            }
            (Some(error), previous) => {
                let unchanged = previous.as_ref().is_some_and(|p| p.error == error);
                let rejection = Rejection {
                    key: key.clone(),
                    since_unix: match &previous {
                        Some(p) if unchanged => p.since_unix,
                        _ => unix_now(),
                    },
                    error,
                    serving_previous: serving,
                };
                if !unchanged || previous.is_some_and(|p| p.serving_previous != serving) {
                    report.newly_rejected.push(rejection.clone());
                }
                self.snapshot.rejected.insert(key.clone(), rejection);
            }
        }
    }

    /// Checks what a resource refers to against what is published now.
    fn check_references(&self, key: &ResourceKey, r: &Resource) -> Result<(), String> {
        match r {
            Resource::ProviderKey(_) | Resource::Guardrail(_) | Resource::Attachment(_) => Ok(()),
            Resource::Model(m) => {
                self.check_owner(&self.name_claims, &m.name, key, "display_name")?;
                self.check_model_refs(m)
            }
            Resource::ApiKey(k) => {
                self.check_owner(&self.hash_claims, &k.key_hash, key, "key_hash")
            }
        }
    }

    fn check_owner<K: std::hash::Hash + Eq>(
        &self,
        claims: &Index<K>,
        claim: &K,
        key: &ResourceKey,
        field: &str,
    ) -> Result<(), String> {
        match claims.get(claim).and_then(|s| s.first()) {
            Some(owner) if owner != key => Err(format!(
                "{field}: duplicate of {owner}, which keeps it (the lowest key wins)"
            )),
            _ => Ok(()),
        }
    }

    fn check_model_refs(&self, m: &Model) -> Result<(), String> {
        match &m.target {
            ModelTarget::Direct(d) => {
                let pk = self
                    .snapshot
                    .provider_keys
                    .get(d.provider_key_id.as_str())
                    .ok_or_else(|| {
                        format!(
                            "provider_key_id: provider key '{}' does not exist or is rejected",
                            d.provider_key_id
                        )
                    })?;
                match &d.provider {
                    None if pk.generic => Err(format!(
                        "provider: required: provider key '{}' names no provider, so the model's chooses the protocol",
                        d.provider_key_id
                    )),
                    Some(p) if pk.generic => match pk.for_provider(p) {
                        Some(_) => Ok(()),
                        None => Err(format!(
                            "provider: '{p}' has no public endpoint and provider key '{}' no api_base",
                            d.provider_key_id
                        )),
                    },
                    Some(p) if p != &pk.provider && !matches!(pk.adapter, Adapter::Other(_)) => {
                        Err(format!(
                            "provider: '{p}' does not match provider key '{}' (provider '{}')",
                            d.provider_key_id, pk.provider
                        ))
                    }
                    _ => Ok(()),
                }
            }
            ModelTarget::Routing(r) => {
                let missing: Vec<String> = r
                    .targets
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| {
                        !self
                            .snapshot
                            .models
                            .get(t.model.as_str())
                            .is_some_and(|m| matches!(m.target, ModelTarget::Direct(_)))
                    })
                    .map(|(i, t)| {
                        format!(
                            "routing.targets[{i}].model: '{}' is not an available direct model",
                            t.model
                        )
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(missing.join("; "))
                }
            }
        }
    }

    fn publish(&mut self, r: &Resource) {
        let s = &mut self.snapshot;
        match r {
            Resource::ProviderKey(p) => {
                s.provider_keys.insert(p.id.clone(), p.clone());
            }
            Resource::Model(m) => {
                s.models.insert(m.name.clone(), m.clone());
            }
            Resource::ApiKey(k) => {
                s.api_keys.insert(k.key_hash, k.clone());
            }
            Resource::Guardrail(g) => {
                s.guardrails.insert(g.order(), g.clone());
            }
            Resource::Attachment(a) => {
                s.attachments
                    .insert((a.guardrail_id.clone(), a.id.clone()), a.clone());
            }
        }
    }

    fn unpublish(&mut self, key: &ResourceKey, r: &Resource) {
        let s = &mut self.snapshot;
        match r {
            Resource::ProviderKey(p) => {
                s.provider_keys.remove(&p.id);
            }
            Resource::Model(m) => {
                if s.models.get(&m.name).is_some_and(|cur| cur.id == key.id) {
                    s.models.remove(&m.name);
                }
            }
            Resource::ApiKey(k) => {
                if s.api_keys
                    .get(&k.key_hash)
                    .is_some_and(|cur| cur.id == key.id)
                {
                    s.api_keys.remove(&k.key_hash);
                }
            }
            Resource::Guardrail(g) => {
                s.guardrails.remove(&g.order());
            }
            Resource::Attachment(a) => {
                s.attachments
                    .remove(&(a.guardrail_id.clone(), a.id.clone()));
            }
        }
    }
}

fn model_name(r: &Resource) -> Option<Arc<str>> {
    match r {
        Resource::Model(m) => Some(m.name.clone()),
        _ => None,
    }
}
