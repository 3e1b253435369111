//! The AISIX gateway's resources-file format: `_format_version: "1"`, top-level lists
//! named by kind, entries without ids.
//!
//! - An entry's id is the UUID v5 (URL namespace) of `aisix:<kind>/<identity>`, so it
//!   is the same across reloads and processes; the identity is `display_name`
//!   (provider keys, models, api keys) or `name` (guardrails), unique per kind.
//! - `models[].provider_key: <display_name>` names its provider key; an unknown name
//!   is a problem listing the names there are.
//! - `api_keys[]` carry `key_hash` or `key_env`, the name of a variable holding the
//!   plaintext key, hashed here and never shown.
//! - `${VAR}` in any string is replaced from the environment.
//!
//! A wrong version or an unknown top-level key rejects the file (every such problem in
//! one message); a bad entry is reported, with its kind, entry and field, and skipped.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use proxy_core::resources::Kind;
use serde_yaml_ng::{Mapping, Value};
use sha2::{Digest, Sha256};

use super::ResourcesFile;

/// AISIX kinds this build does not have: their lists are reported and skipped.
const NOT_SUPPORTED: &[&str] = &["policies"];

/// An AISIX-format document (its root), as storage keys and JSON documents under
/// `prefix`; `Err` says why the whole file is refused.
pub(super) fn read(
    mut root: Mapping,
    prefix: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ResourcesFile, String> {
    let version = root.shift_remove("_format_version");
    let mut refusals = Vec::new();
    if !matches!(&version, Some(Value::String(v)) if v == "1") {
        refusals.push("_format_version: must be \"1\"".to_owned());
    }
    let mut lists: BTreeMap<Kind, Vec<Value>> = BTreeMap::new();
    let mut out = ResourcesFile::default();
    for (name, list) in root {
        let name = name.as_str().unwrap_or_default().to_owned();
        if NOT_SUPPORTED.contains(&name.as_str()) {
            out.problems
                .push(format!("{name}: not supported by this build; ignored"));
            continue;
        }
        let Some(kind) = Kind::parse(&name) else {
            refusals.push(format!(
                "{name}: unknown top-level key (expected _format_version, provider_keys, models, api_keys, guardrails, guardrail_attachments)"
            ));
            continue;
        };
        match list {
            Value::Null => {}
            Value::Sequence(items) => {
                lists.insert(kind, items);
            }
            _ => refusals.push(format!("{name}: must be a list")),
        }
    }
    if !refusals.is_empty() {
        return Err(refusals.join("; "));
    }
    // Provider keys first: models name them.
    let mut key_ids: HashMap<String, String> = HashMap::new();
    let order = [
        Kind::ProviderKeys,
        Kind::Models,
        Kind::ApiKeys,
        Kind::Guardrails,
        Kind::GuardrailAttachments,
    ];
    for kind in order {
        let Some(items) = lists.remove(&kind) else {
            continue;
        };
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let at = format!("{kind}[{i}]");
            match entry(kind, item, &at, env, &key_ids) {
                Ok((identity, document)) => {
                    if let Some(first) = seen.get(&identity) {
                        out.problems.push(format!(
                            "{at}: duplicate {} '{identity}' (first used by {kind}[{first}]); skipped",
                            identity_field(kind)
                        ));
                        continue;
                    }
                    seen.insert(identity.clone(), i);
                    let id = derived_id(kind, &identity);
                    if matches!(kind, Kind::ProviderKeys | Kind::Guardrails) {
                        key_ids.insert(format!("{kind}/{identity}"), id.clone());
                    }
                    out.entries
                        .push((format!("{prefix}/{kind}/{id}"), Bytes::from(document)));
                }
                Err(problem) => out.problems.push(problem),
            }
        }
    }
    Ok(out)
}

fn identity_field(kind: Kind) -> &'static str {
    match kind {
        Kind::Guardrails => "name",
        Kind::GuardrailAttachments => "guardrail, scope_type and scope_id",
        _ => "display_name",
    }
}

/// An attachment names its guardrail by `guardrail` (the guardrail's name in this
/// file) or `guardrail_id`; it is identified by what it attaches to what.
fn attachment(
    mut fields: serde_yaml_ng::Mapping,
    at: &str,
    ids: &HashMap<String, String>,
) -> Result<(String, Vec<u8>), String> {
    let text = |fields: &serde_yaml_ng::Mapping, name: &str| {
        fields
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if let Some(name) = fields.shift_remove("guardrail") {
        let name = name.as_str().unwrap_or_default().to_owned();
        let Some(id) = ids.get(&format!("{}/{name}", Kind::Guardrails)) else {
            return Err(format!(
                "{at}.guardrail: no guardrail named '{name}' in this file"
            ));
        };
        fields.insert("guardrail_id".into(), Value::String(id.clone()));
    }
    let identity = format!(
        "{}/{}/{}",
        text(&fields, "guardrail_id"),
        text(&fields, "scope_type"),
        text(&fields, "scope_id")
    );
    let json = serde_json::to_vec(&fields).map_err(|e| format!("{at}: {e}"))?;
    Ok((identity, json))
}

/// The id of the entry of `kind` named `identity`: stable across reloads and processes.
pub(super) fn derived_id(kind: Kind, identity: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("aisix:{kind}/{identity}").as_bytes(),
    )
    .to_string()
}

/// One entry: its identity and its JSON document, or the problem that skips it.
fn entry(
    kind: Kind,
    item: Value,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
    key_ids: &HashMap<String, String>,
) -> Result<(String, Vec<u8>), String> {
    let Value::Mapping(mut fields) = item else {
        return Err(format!("{at}: must be a mapping"));
    };
    if fields.contains_key("id") {
        return Err(format!(
            "{at}.id: entries of an AISIX-format file carry no id (it is derived from the {})",
            identity_field(kind)
        ));
    }
    let mut missing = Vec::new();
    substitute(&mut fields, at, env, &mut missing);
    if let Some(problem) = missing.into_iter().next() {
        return Err(problem);
    }
    if kind == Kind::GuardrailAttachments {
        return attachment(fields, at, key_ids);
    }
    let identity = match fields.get(identity_field(kind)) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            return Err(format!(
                "{at}.{}: required (it names the entry)",
                identity_field(kind)
            ));
        }
    };
    let at = format!("{at} ('{identity}')");
    match kind {
        Kind::Models => {
            if let Some(name) = fields.shift_remove("provider_key") {
                let name = name.as_str().unwrap_or_default().to_owned();
                let Some(id) = key_ids.get(&format!("{}/{name}", Kind::ProviderKeys)) else {
                    let mut known: Vec<&str> = key_ids
                        .keys()
                        .filter_map(|k| k.strip_prefix("provider_keys/"))
                        .collect();
                    known.sort_unstable();
                    return Err(format!(
                        "{at}.provider_key: no provider key named '{name}' (there are: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ));
                };
                fields.insert("provider_key_id".into(), Value::String(id.clone()));
            }
        }
        Kind::ApiKeys => match (
            fields.contains_key("key_hash"),
            fields.shift_remove("key_env"),
        ) {
            (true, Some(_)) => {
                return Err(format!("{at}: set key_hash or key_env, not both"));
            }
            (false, None) => {
                return Err(format!("{at}: key_hash or key_env is required"));
            }
            (false, Some(var)) => {
                let var = var.as_str().unwrap_or_default().to_owned();
                let Some(plaintext) = env(&var).filter(|k| !k.is_empty()) else {
                    return Err(format!(
                        "{at}.key_env: the environment variable {var} is not set"
                    ));
                };
                let hash = hex::encode(Sha256::digest(plaintext.as_bytes()));
                fields.insert("key_hash".into(), Value::String(hash));
            }
            (true, None) => {}
        },
        _ => {}
    }
    let document = serde_json::to_vec(&fields)
        .map_err(|e| format!("{at}: cannot be represented as JSON: {e}"))?;
    Ok((identity, document))
}

/// Replaces `${VAR}` in every string under `fields`; a variable that is not set is a
/// problem naming the field.
fn substitute(
    fields: &mut Mapping,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) {
    for (name, value) in fields.iter_mut() {
        let path = format!("{at}.{}", name.as_str().unwrap_or_default());
        substitute_value(value, &path, env, missing);
    }
}

fn substitute_value(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) {
    match value {
        Value::String(text) if text.contains("${") => {
            let mut out = String::with_capacity(text.len());
            let mut rest = text.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let Some(end) = rest[start..].find('}') else {
                    out.push_str(&rest[start..]);
                    rest = "";
                    break;
                };
                let var = &rest[start + 2..start + end];
                match env(var) {
                    Some(v) => out.push_str(&v),
                    None => {
                        missing.push(format!("{path}: the environment variable {var} is not set"))
                    }
                }
                rest = &rest[start + end + 1..];
            }
            out.push_str(rest);
            *text = out;
        }
        Value::Mapping(map) => substitute(map, path, env, missing),
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{path}[{i}]"), env, missing);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::path::Path;

    use super::*;

    const FILE: &str = r#"
_format_version: "1"
provider_keys:
  - display_name: openai-prod
    provider: openai
    api_key: "${OPENAI_KEY}"
models:
  - display_name: gpt-4o
    model_name: gpt-4o
    provider_key: openai-prod
  - display_name: smart
    routing: {targets: [{model: gpt-4o}]}
api_keys:
  - display_name: team-a
    key_env: TEAM_A_KEY
    allowed_models: ["*"]
  - display_name: team-b
    key_hash: 0000000000000000000000000000000000000000000000000000000000000000
    allowed_models: [gpt-4o]
"#;

    fn env(name: &str) -> Option<String> {
        match name {
            "OPENAI_KEY" => Some("sk-from-env".to_owned()),
            "TEAM_A_KEY" => Some("team-a-secret".to_owned()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<ResourcesFile, super::super::FileError> {
        ResourcesFile::parse_with(Path::new("r.yaml"), text, "/aisix", &env)
    }

    #[test]
    fn entries_get_stable_ids_references_by_name_and_hashed_env_keys() {
        let f = parse(FILE).unwrap();
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        let key_id = derived_id(Kind::ProviderKeys, "openai-prod");
        assert_eq!(
            key_id,
            derived_id(Kind::ProviderKeys, "openai-prod"),
            "the same across calls"
        );
        assert_ne!(key_id, derived_id(Kind::Models, "openai-prod"));
        let doc = |key: String| -> serde_json::Value {
            let (_, json) = f.entries.iter().find(|(k, _)| *k == key).unwrap();
            serde_json::from_slice(json).unwrap()
        };
        let pk = doc(format!("/aisix/provider_keys/{key_id}"));
        assert_eq!(pk["api_key"], "sk-from-env");
        let model = doc(format!(
            "/aisix/models/{}",
            derived_id(Kind::Models, "gpt-4o")
        ));
        assert_eq!(model["provider_key_id"], key_id.as_str());
        assert!(model.get("provider_key").is_none());
        let team_a = doc(format!(
            "/aisix/api_keys/{}",
            derived_id(Kind::ApiKeys, "team-a")
        ));
        assert_eq!(
            team_a["key_hash"],
            hex::encode(Sha256::digest(b"team-a-secret"))
        );
        assert!(team_a.get("key_env").is_none());
        assert_eq!(f.entries.len(), 5);
    }

    #[test]
    fn attachments_name_their_guardrail_by_name() {
        let text = format!(
            "{FILE}guardrails:\n  - {{name: pii, kind: pii, detectors: [{{type: email}}]}}\nguardrail_attachments:\n  - {{guardrail: pii, scope_type: model, scope_id: gpt-4o, priority: 2}}\n  - {{guardrail: pii, scope_type: model, scope_id: gpt-4o}}\n"
        );
        let f = parse(&text).unwrap();
        assert_eq!(
            f.problems,
            ["guardrail_attachments[1]: duplicate guardrail, scope_type and scope_id '{id}/model/gpt-4o' (first used by guardrail_attachments[0]); skipped"
                .replace("{id}", &derived_id(Kind::Guardrails, "pii"))]
        );
        let (key, json) = f
            .entries
            .iter()
            .find(|(k, _)| k.starts_with("/aisix/guardrail_attachments/"))
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(json).unwrap();
        assert_eq!(
            doc["guardrail_id"],
            derived_id(Kind::Guardrails, "pii").as_str()
        );
        assert!(doc.get("guardrail").is_none());
        let resource = proxy_core::resources::ResourceKey::parse("/aisix", key).unwrap();
        assert!(proxy_core::resources::Resource::parse(&resource, json).is_ok());
    }

    #[test]
    fn every_problem_is_reported_with_kind_entry_and_field() {
        let text = FILE
            .replace("provider_key: openai-prod", "provider_key: openai-staging")
            .replace("TEAM_A_KEY", "UNSET_KEY")
            .replace("${OPENAI_KEY}", "${NOT_SET}")
            + "  - display_name: team-b\n    key_hash: x\n    allowed_models: []\npolicies: []\nguardrail_attachments:\n  - {guardrail: nope, scope_type: env}\n";
        let f = parse(&text).unwrap();
        assert_eq!(
            f.problems,
            [
                "policies: not supported by this build; ignored",
                "provider_keys[0].api_key: the environment variable NOT_SET is not set",
                "models[0] ('gpt-4o').provider_key: no provider key named 'openai-staging' (there are: none)",
                "api_keys[0] ('team-a').key_env: the environment variable UNSET_KEY is not set",
                "api_keys[2]: duplicate display_name 'team-b' (first used by api_keys[1]); skipped",
                "guardrail_attachments[0].guardrail: no guardrail named 'nope' in this file",
            ]
        );
        // The key's value never shows in a problem.
        assert!(!format!("{:?}", f.problems).contains("team-a-secret"));
    }

    #[test]
    fn a_wrong_version_or_unknown_list_refuses_the_file_naming_each() {
        let e = parse("_format_version: 2\nwidgets: []\nmodels: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("_format_version: must be \"1\""), "{e}");
        assert!(e.contains("widgets: unknown top-level key"), "{e}");
        assert!(e.contains("models: must be a list"), "{e}");
        let e = parse("_format_version: \"1\"\nmodels:\n  - {id: x, display_name: m}\n").unwrap();
        assert_eq!(
            e.problems,
            [
                "models[0].id: entries of an AISIX-format file carry no id (it is derived from the display_name)"
            ]
        );
    }
}
