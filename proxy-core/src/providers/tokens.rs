//! Bearer tokens minted from a provider key's credentials: Entra ID client credentials
//! (Azure OpenAI) and service accounts (Vertex AI). A token is kept until a minute (or a
//! tenth of its life, for short ones) before it expires; requests that need one while
//! it is being minted wait for that one mint. The cache lives in the upstream client,
//! keyed by the credential, so a configuration change that keeps a credential keeps
//! its token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use super::{azure, gemini};
use crate::resources::{EntraCredential, ServiceAccount};
use crate::secret::Secret;

/// Where a token comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenSource {
    Entra(EntraCredential),
    Google(ServiceAccount),
}

/// A token as its endpoint gave it.
pub struct Minted {
    pub value: Secret,
    pub life: Duration,
}

#[derive(Default)]
pub struct Tokens {
    slots: Mutex<HashMap<TokenSource, Arc<tokio::sync::Mutex<Option<Kept>>>>>,
}

struct Kept {
    value: Secret,
    refresh_at: Instant,
}

impl Tokens {
    /// The source's token, or why none could be had (for logs: never the secret).
    pub async fn token(
        &self,
        client: &reqwest::Client,
        source: &TokenSource,
    ) -> Result<Secret, String> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(source.clone())
            .or_default()
            .clone();
        let mut kept = slot.lock().await;
        if let Some(k) = kept.as_ref().filter(|k| Instant::now() < k.refresh_at) {
            return Ok(k.value.clone());
        }
        let asked = Instant::now();
        let minted = match source {
            TokenSource::Entra(credential) => azure::mint(client, credential).await?,
            TokenSource::Google(account) => gemini::mint(client, account).await?,
        };
        let early = Duration::from_secs(60).min(minted.life / 10);
        let value = minted.value.clone();
        *kept = Some(Kept {
            value: minted.value,
            refresh_at: asked + minted.life - early,
        });
        Ok(value)
    }
}

/// Sends an OAuth2 token request and reads `{access_token, expires_in}`; failures say
/// what went wrong without the endpoint's words.
pub(super) async fn exchange(request: reqwest::RequestBuilder) -> Result<Minted, String> {
    #[derive(Deserialize)]
    struct Answer {
        access_token: Secret,
        expires_in: u64,
    }
    let response = tokio::time::timeout(Duration::from_secs(10), request.send())
        .await
        .map_err(|_| "the token endpoint did not answer within 10 s".to_owned())?
        .map_err(|e| format!("the token endpoint cannot be reached: {}", e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the token endpoint answered {status}"));
    }
    let answer: Answer = response
        .json()
        .await
        .map_err(|_| "the token endpoint's answer is not a token".to_owned())?;
    Ok(Minted {
        value: answer.access_token,
        life: Duration::from_secs(answer.expires_in),
    })
}
