//! File mode: resources from one YAML document, reloaded on SIGHUP.
//!
//! The document has lists `provider_keys`, `models`, `api_keys` and `guardrails`; each entry is a
//! resource document plus its `id`. A file that cannot be read or parsed is rejected
//! whole (the last good snapshot keeps serving); a bad entry is reported and skipped,
//! and a bad resource is rejected alone by the snapshot builder.
//!
//! A document with `_format_version: "1"` is in the AISIX gateway's format instead
//! (`aisix.rs`): entries without ids, references by name, `key_env`, `${VAR}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use proxy_core::resources::Kind;
use serde_yaml_ng::{Mapping, Value};

mod aisix;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read resources file {path}: {error}")]
    Read {
        path: PathBuf,
        /// Shown in the message, not as a separate cause (printed once).
        error: std::io::Error,
    },
    #[error("resources file {path} is not valid YAML: {error}")]
    Syntax {
        path: PathBuf,
        error: serde_yaml_ng::Error,
    },
    #[error("resources file {path}: {message}")]
    Shape { path: PathBuf, message: String },
}

/// The entries of a resources file as storage keys and JSON documents, plus the
/// problems found in entries that were skipped.
#[derive(Debug, Default)]
pub struct ResourcesFile {
    pub entries: Vec<(String, Bytes)>,
    pub problems: Vec<String>,
}

impl ResourcesFile {
    pub fn load(path: &Path, prefix: &str) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|error| FileError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse_with(path, &text, prefix, &|name| std::env::var(name).ok())
    }

    pub fn parse(path: &Path, text: &str, prefix: &str) -> Result<Self, FileError> {
        Self::parse_with(path, text, prefix, &|_| None)
    }

    /// Reads `text`; `env` looks up the variables of an AISIX-format file.
    pub fn parse_with(
        path: &Path,
        text: &str,
        prefix: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, FileError> {
        let shape = |message: String| FileError::Shape {
            path: path.to_owned(),
            message,
        };
        let root: Value = serde_yaml_ng::from_str(text).map_err(|error| FileError::Syntax {
            path: path.to_owned(),
            error,
        })?;
        let root = match root {
            Value::Null => Mapping::new(),
            Value::Mapping(m) => m,
            _ => {
                return Err(shape(
                    "the document must be a mapping with lists provider_keys, models, api_keys, guardrails, guardrail_attachments"
                        .to_owned(),
                ));
            }
        };
        if root.contains_key("_format_version") {
            return aisix::read(root, prefix, env).map_err(shape);
        }
        let mut out = ResourcesFile::default();
        for (name, list) in root {
            let Some(name) = name.as_str() else {
                return Err(shape("top-level keys must be strings".to_owned()));
            };
            let Some(kind) = Kind::parse(name) else {
                out.problems.push(format!("{name}: unknown resource list (expected provider_keys, models, api_keys, guardrails or guardrail_attachments); ignored"));
                continue;
            };
            let items = match list {
                Value::Null => Vec::new(),
                Value::Sequence(items) => items,
                _ => return Err(shape(format!("{name}: must be a list"))),
            };
            out.read_list(kind, items, prefix);
        }
        Ok(out)
    }

    fn read_list(&mut self, kind: Kind, items: Vec<Value>, prefix: &str) {
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let at = format!("{kind}[{i}]");
            let Value::Mapping(mut fields) = item else {
                self.problems.push(format!("{at}: must be a mapping"));
                continue;
            };
            let id = match fields.shift_remove("id") {
                Some(Value::String(s)) if valid_id(&s) => s,
                Some(Value::Number(n)) => n.to_string(),
                Some(_) => {
                    self.problems
                        .push(format!("{at}.id: must be a non-empty string without '/'"));
                    continue;
                }
                None => {
                    self.problems.push(format!("{at}.id: required"));
                    continue;
                }
            };
            if let Some(first) = first_seen.get(&id) {
                self.problems.push(format!(
                    "{at}.id: duplicate id '{id}' (first used by {kind}[{first}]); skipped"
                ));
                continue;
            }
            first_seen.insert(id.clone(), i);
            match serde_json::to_vec(&fields) {
                Ok(json) => self
                    .entries
                    .push((format!("{prefix}/{kind}/{id}"), Bytes::from(json))),
                Err(e) => self
                    .problems
                    .push(format!("{at}: cannot be represented as JSON: {e}")),
            }
        }
    }
}

fn valid_id(s: &str) -> bool {
    !s.trim().is_empty() && !s.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ResourcesFile, FileError> {
        ResourcesFile::parse(Path::new("r.yaml"), text, "/aisix")
    }

    #[test]
    fn entries_become_keys_and_json() {
        let f = parse("provider_keys:\n  - id: pk1\n    display_name: p\n    api_key: sk\nmodels:\n  - {id: 7, display_name: m}\n").unwrap();
        assert!(f.problems.is_empty());
        let keys: Vec<&str> = f.entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["/aisix/provider_keys/pk1", "/aisix/models/7"]);
        assert_eq!(
            &f.entries[0].1[..],
            br#"{"display_name":"p","api_key":"sk"}"#
        );
    }

    #[test]
    fn bad_entries_are_reported_and_skipped() {
        let f = parse("models:\n  - {display_name: a}\n  - {id: x}\n  - {id: x}\n  - 5\n  - {id: 'a/b'}\nwidgets: []\n").unwrap();
        assert_eq!(f.entries.len(), 1);
        assert_eq!(
            f.problems,
            [
                "models[0].id: required",
                "models[2].id: duplicate id 'x' (first used by models[1]); skipped",
                "models[3]: must be a mapping",
                "models[4].id: must be a non-empty string without '/'",
                "widgets: unknown resource list (expected provider_keys, models, api_keys, guardrails or guardrail_attachments); ignored",
            ]
        );
    }

    #[test]
    fn malformed_files_are_rejected_whole() {
        let e = parse("models: [\n").unwrap_err().to_string();
        assert!(
            e.starts_with("resources file r.yaml is not valid YAML"),
            "{e}"
        );
        let e = parse("- a\n").unwrap_err().to_string();
        assert!(e.contains("must be a mapping"), "{e}");
        let e = parse("models: 3\n").unwrap_err().to_string();
        assert!(e.contains("models: must be a list"), "{e}");
        assert!(parse("").unwrap().entries.is_empty());
    }
}
