//! The resource model: keys, kinds, wire specs (`spec`), validated types (`types`) and
//! the conversions between them (`validate`).
//!
//! A resource is one JSON document stored at `<prefix>/<kind>/<id>`. Parsing a document
//! checks it on its own (types, required fields, value ranges); references between
//! resources are checked by the snapshot builder, which sees all of them.

pub mod guardrail;
pub mod spec;
pub mod types;
pub mod validate;

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

pub use guardrail::{Attachment, Check, Guardrail, HookPoint, Scope};
pub use types::{
    Adapter, ApiKey, AwsCredential, Cost, DirectTarget, EntraCredential, FieldError, GoogleAuth,
    KeyHash, Model, ModelTarget, Problems, PromptCache, ProviderKey, RateLimit, Routing,
    ServiceAccount, Strategy, Target, VertexProject, WhenAllUnavailable,
};

/// The resource kinds this build understands, as they appear in keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ProviderKeys,
    Models,
    ApiKeys,
    Guardrails,
    GuardrailAttachments,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::ProviderKeys,
        Kind::Models,
        Kind::ApiKeys,
        Kind::Guardrails,
        Kind::GuardrailAttachments,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ProviderKeys => "provider_keys",
            Kind::Models => "models",
            Kind::ApiKeys => "api_keys",
            Kind::Guardrails => "guardrails",
            Kind::GuardrailAttachments => "guardrail_attachments",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `<kind>/<id>` below the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: Kind,
    pub id: Arc<str>,
}

/// Why a storage key is not a resource this build handles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is outside the prefix '{0}'")]
    OutsidePrefix(String),
    #[error("key does not have the form <prefix>/<kind>/<id>")]
    Malformed,
    #[error("unknown resource kind '{0}'")]
    UnknownKind(String),
}

impl ResourceKey {
    pub fn new(kind: Kind, id: &str) -> Self {
        Self {
            kind,
            id: id.into(),
        }
    }

    /// Parses `<prefix>/<kind>/<id>`; `prefix` has no trailing slash.
    pub fn parse(prefix: &str, key: &str) -> Result<Self, KeyError> {
        let rest = key
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| KeyError::OutsidePrefix(prefix.to_owned()))?;
        let (kind, id) = rest.split_once('/').ok_or(KeyError::Malformed)?;
        if id.is_empty() || id.contains('/') {
            return Err(KeyError::Malformed);
        }
        let kind = Kind::parse(kind).ok_or_else(|| KeyError::UnknownKind(kind.to_owned()))?;
        Ok(Self::new(kind, id))
    }

    pub fn full(&self, prefix: &str) -> String {
        format!("{prefix}/{}/{}", self.kind, self.id)
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// A resource that passed validation on its own.
#[derive(Debug, Clone)]
pub enum Resource {
    ProviderKey(Arc<ProviderKey>),
    Model(Arc<Model>),
    ApiKey(Arc<ApiKey>),
    Guardrail(Arc<Guardrail>),
    Attachment(Arc<Attachment>),
}

impl Resource {
    /// Parses and validates one document. Every problem is reported with its field path.
    pub fn parse(key: &ResourceKey, json: &[u8]) -> Result<Resource, Problems> {
        let id = &key.id;
        Ok(match key.kind {
            Kind::ProviderKeys => {
                Resource::ProviderKey(Arc::new(ProviderKey::from_spec(id, decode(json)?)?))
            }
            Kind::Models => Resource::Model(Arc::new(Model::from_spec(id, decode(json)?)?)),
            Kind::ApiKeys => Resource::ApiKey(Arc::new(ApiKey::from_spec(id, decode(json)?)?)),
            Kind::Guardrails => {
                Resource::Guardrail(Arc::new(Guardrail::from_spec(id, decode(json)?)?))
            }
            Kind::GuardrailAttachments => {
                Resource::Attachment(Arc::new(Attachment::from_spec(id, decode(json)?)?))
            }
        })
    }

    /// Fields the document carried that this build does not know.
    pub fn unknown_fields(&self) -> usize {
        match self {
            Resource::ProviderKey(r) => r.unknown_fields,
            Resource::Model(r) => r.unknown_fields,
            Resource::ApiKey(r) => r.unknown_fields,
            Resource::Guardrail(r) => r.unknown_fields,
            Resource::Attachment(r) => r.unknown_fields,
        }
    }
}

fn decode<T: DeserializeOwned>(json: &[u8]) -> Result<T, Problems> {
    let one = |path: String, message: String| {
        let mut p = Problems::default();
        p.push(path, message);
        p
    };
    let mut de = serde_json::Deserializer::from_slice(json);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "(document)".to_owned()
        } else {
            path
        };
        one(path, e.into_inner().to_string())
    })?;
    de.end()
        .map_err(|e| one("(document)".to_owned(), e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests;
