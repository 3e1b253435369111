//! The detector services guardrails call: Presidio (analyzer, then anonymizer for
//! masks), OpenAI moderation, Lakera Guard, Azure AI Content Safety (Prompt Shield and
//! text moderation) and Bedrock's ApplyGuardrail (signed with Signature V4, as the
//! Bedrock provider signs).
//!
//! Each call has the rule's `timeout_ms` (`0`: none is waited for). A detector that
//! fails [`TRIP_AFTER`] times in a row is not called for [`OPEN_FOR`]: its checks fail
//! at once (then `fail_open` decides), and one call is let through after that to see
//! whether it is back. Failure reasons name the detector's answer, never a credential
//! or the text.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use serde_json::{Value, json};

use super::Stage;
use crate::resources::Guardrail;
use crate::resources::guardrail::{BedrockGuardrail, PiiAction, Presidio, Remote, TextModeration};

/// Without `timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive failures that open a detector's circuit.
pub const TRIP_AFTER: u32 = 5;
/// How long an open circuit refuses calls.
pub const OPEN_FOR: Duration = Duration::from_secs(30);

/// What a detector said about the texts.
pub enum Said {
    Nothing,
    /// Blocks; the label says what was found (a category, an entity type).
    Block(String),
    /// Texts to replace (by index), and what was found.
    Rewrite(Vec<(usize, String)>, Vec<String>),
}

/// The client detector calls go through, and each detector's circuit.
pub struct Detectors {
    client: reqwest::Client,
    circuits: Arc<Mutex<HashMap<Arc<str>, Circuit>>>,
}

#[derive(Default, Clone, Copy)]
struct Circuit {
    failures: u32,
    open_until: Option<Instant>,
}

impl Detectors {
    /// `client` never follows redirects (the upstream client is).
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            circuits: Arc::default(),
        }
    }

    /// The same circuits, calling through `client`.
    pub fn with_client(&self, client: reqwest::Client) -> Self {
        Self {
            client,
            circuits: self.circuits.clone(),
        }
    }

    /// With a client of its own (no redirects followed), for callers outside the
    /// proxy (the admin API's trials, tools).
    pub fn standalone() -> Self {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self::new(client)
    }

    /// Asks `remote` (the detector of rule `g`) about `texts`.
    pub async fn check(
        &self,
        g: &Guardrail,
        remote: &Remote,
        texts: &[&str],
        stage: Stage,
    ) -> Result<Said, String> {
        if let Some(open) = self.open(&g.id) {
            return Err(open);
        }
        let timeout = match remote {
            Remote::Bedrock(b) => b.timed.or(g.timeout),
            _ => g.timeout,
        }
        .unwrap_or(DEFAULT_TIMEOUT);
        let said = if timeout.is_zero() {
            Err("timeout_ms is 0: no answer is waited for".to_owned())
        } else {
            match tokio::time::timeout(timeout, self.call(remote, texts, stage)).await {
                Ok(said) => said,
                Err(_) => Err(format!(
                    "the detector did not answer within {} ms",
                    timeout.as_millis()
                )),
            }
        };
        self.settle(&g.id, said.is_ok());
        said
    }

    fn open(&self, id: &Arc<str>) -> Option<String> {
        let mut circuits = self.circuits.lock().unwrap_or_else(PoisonError::into_inner);
        let circuit = circuits.get_mut(id)?;
        let until = circuit.open_until?;
        if Instant::now() < until {
            return Some(format!(
                "the detector failed {} times in a row; not called for {} s",
                circuit.failures,
                OPEN_FOR.as_secs()
            ));
        }
        // Half open: this call decides.
        circuit.open_until = None;
        circuit.failures = TRIP_AFTER - 1;
        None
    }

    fn settle(&self, id: &Arc<str>, ok: bool) {
        let mut circuits = self.circuits.lock().unwrap_or_else(PoisonError::into_inner);
        if ok {
            circuits.remove(id);
            return;
        }
        let circuit = circuits.entry(id.clone()).or_default();
        circuit.failures += 1;
        if circuit.failures >= TRIP_AFTER {
            circuit.open_until = Some(Instant::now() + OPEN_FOR);
        }
    }

    async fn call(&self, remote: &Remote, texts: &[&str], stage: Stage) -> Result<Said, String> {
        let joined = texts
            .iter()
            .filter(|t| !t.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        match remote {
            Remote::Presidio(p) => self.presidio(p, texts).await,
            Remote::OpenAiModeration {
                base,
                api_key,
                model,
                thresholds,
            } => {
                let request = self
                    .client
                    .post(format!("{base}/moderations"))
                    .bearer_auth(api_key.expose())
                    .json(&json!({"model": model, "input": joined}));
                let answer = send(request).await?;
                let result = answer
                    .pointer("/results/0")
                    .ok_or("the answer has no results")?;
                let scores = result.get("category_scores");
                if thresholds.is_empty() {
                    if result.get("flagged").and_then(Value::as_bool) == Some(true) {
                        let category = result
                            .get("categories")
                            .and_then(Value::as_object)
                            .and_then(|c| c.iter().find(|(_, v)| v.as_bool() == Some(true)))
                            .map_or("flagged".to_owned(), |(k, _)| k.clone());
                        return Ok(Said::Block(category));
                    }
                    return Ok(Said::Nothing);
                }
                for (category, threshold) in thresholds {
                    let score = scores
                        .and_then(|s| s.get(category))
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0);
                    if score >= *threshold {
                        return Ok(Said::Block(category.clone()));
                    }
                }
                Ok(Said::Nothing)
            }
            Remote::Lakera {
                base,
                api_key,
                project_id,
            } => {
                let role = match stage {
                    Stage::Input => "user",
                    Stage::Output => "assistant",
                };
                let mut body = json!({"messages": [{"role": role, "content": joined}]});
                if let Some(project) = project_id {
                    body["project_id"] = json!(project);
                }
                let request = self
                    .client
                    .post(format!("{base}/v2/guard"))
                    .bearer_auth(api_key.expose())
                    .json(&body);
                let answer = send(request).await?;
                Ok(
                    if answer.get("flagged").and_then(Value::as_bool) == Some(true) {
                        Said::Block("flagged".into())
                    } else {
                        Said::Nothing
                    },
                )
            }
            Remote::PromptShield { base, api_key } => {
                let body = match stage {
                    Stage::Input => json!({"userPrompt": joined, "documents": []}),
                    Stage::Output => json!({"userPrompt": "", "documents": [joined]}),
                };
                let request = self
                    .client
                    .post(format!(
                        "{base}/contentsafety/text:shieldPrompt?api-version=2024-09-01"
                    ))
                    .header("Ocp-Apim-Subscription-Key", api_key.expose())
                    .json(&body);
                let answer = send(request).await?;
                let attacked = answer
                    .pointer("/userPromptAnalysis/attackDetected")
                    .and_then(Value::as_bool)
                    == Some(true)
                    || answer
                        .get("documentsAnalysis")
                        .and_then(Value::as_array)
                        .is_some_and(|docs| {
                            docs.iter()
                                .any(|d| d.get("attackDetected") == Some(&json!(true)))
                        });
                Ok(if attacked {
                    Said::Block("prompt_attack".into())
                } else {
                    Said::Nothing
                })
            }
            Remote::TextModeration(t) => self.text_moderation(t, &joined).await,
            Remote::Bedrock(b) => self.bedrock(b, texts, stage).await,
        }
    }

    async fn presidio(&self, p: &Presidio, texts: &[&str]) -> Result<Said, String> {
        let checks =
            texts
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.is_empty())
                .map(|(i, text)| async move {
                    let mut body = json!({"text": text, "language": p.language});
                    if !p.entities.is_empty() {
                        body["entities"] = p.entities.iter().map(|(e, _)| json!(e)).collect();
                    }
                    if let Some(threshold) = p.score_threshold {
                        body["score_threshold"] = json!(threshold);
                    }
                    let request = self
                        .client
                        .post(format!("{}/analyze", p.analyzer))
                        .json(&body);
                    let hits = send(request).await?;
                    let hits: Vec<Value> = hits
                        .as_array()
                        .ok_or("the analyzer's answer is not a list")?
                        .iter()
                        .filter(|h| {
                            let score = h.get("score").and_then(Value::as_f64).unwrap_or(1.0);
                            p.score_threshold.is_none_or(|t| score >= t)
                        })
                        .cloned()
                        .collect();
                    Ok::<_, String>((i, *text, hits))
                });
        let mut rewrites = Vec::new();
        let mut found: Vec<String> = Vec::new();
        for checked in join_all(checks).await {
            let (i, text, hits) = checked?;
            let mut masked = Vec::new();
            for hit in hits {
                let entity = hit
                    .get("entity_type")
                    .and_then(Value::as_str)
                    .unwrap_or("ENTITY")
                    .to_owned();
                let action = p
                    .entities
                    .iter()
                    .find(|(e, _)| *e == entity)
                    .map_or(p.default_action, |(_, a)| *a);
                if action == PiiAction::Block {
                    return Ok(Said::Block(entity));
                }
                if !found.contains(&entity) {
                    found.push(entity);
                }
                masked.push(hit);
            }
            if masked.is_empty() {
                continue;
            }
            let Some(anonymizer) = &p.anonymizer else {
                return Err("no anonymizer_url to mask with".into());
            };
            let body = json!({"text": text, "analyzer_results": masked,
                "anonymizers": {"DEFAULT": {"type": p.operator}}});
            let request = self
                .client
                .post(format!("{anonymizer}/anonymize"))
                .json(&body);
            let answer = send(request).await?;
            let text = answer
                .get("text")
                .and_then(Value::as_str)
                .ok_or("the anonymizer's answer has no text")?;
            rewrites.push((i, text.to_owned()));
        }
        Ok(if rewrites.is_empty() {
            Said::Nothing
        } else {
            Said::Rewrite(rewrites, found)
        })
    }

    async fn text_moderation(&self, t: &TextModeration, text: &str) -> Result<Said, String> {
        let mut body = json!({"text": text, "outputType": t.output_type,
            "haltOnBlocklistHit": t.halt_on_blocklist_hit});
        if !t.categories.is_empty() {
            body["categories"] = json!(t.categories);
        }
        if !t.blocklists.is_empty() {
            body["blocklistNames"] = json!(t.blocklists);
        }
        let request = self
            .client
            .post(format!(
                "{}/contentsafety/text:analyze?api-version=2024-09-01",
                t.base
            ))
            .header("Ocp-Apim-Subscription-Key", t.api_key.expose())
            .json(&body);
        let answer = send(request).await?;
        if let Some(hit) = answer
            .get("blocklistsMatch")
            .and_then(Value::as_array)
            .and_then(|m| m.first())
        {
            let name = hit
                .get("blocklistName")
                .and_then(Value::as_str)
                .unwrap_or("blocklist");
            return Ok(Said::Block(format!("blocklist:{name}")));
        }
        for analysis in answer
            .get("categoriesAnalysis")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let category = analysis
                .get("category")
                .and_then(Value::as_str)
                .unwrap_or("");
            let severity = analysis
                .get("severity")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let threshold = t.by_category.get(category).copied().unwrap_or(t.threshold);
            if severity >= u64::from(threshold) {
                return Ok(Said::Block(category.to_owned()));
            }
        }
        Ok(Said::Nothing)
    }

    async fn bedrock(
        &self,
        b: &BedrockGuardrail,
        texts: &[&str],
        stage: Stage,
    ) -> Result<Said, String> {
        let source = match stage {
            Stage::Input => "INPUT",
            Stage::Output => "OUTPUT",
        };
        let content: Vec<Value> = texts.iter().map(|t| json!({"text": {"text": t}})).collect();
        let url = format!(
            "{}/guardrail/{}/version/{}/apply",
            b.base,
            percent_encoding::utf8_percent_encode(&b.id, percent_encoding::NON_ALPHANUMERIC),
            percent_encoding::utf8_percent_encode(&b.version, percent_encoding::NON_ALPHANUMERIC)
        );
        let mut request = self
            .client
            .post(url)
            .json(&json!({"source": source, "content": content}))
            .build()
            .map_err(|e| format!("the request cannot be built: {}", e.without_url()))?;
        crate::providers::bedrock::sign_v4(
            &mut request,
            &b.credential,
            "bedrock",
            SystemTime::now(),
        )?;
        let answer = read(self.client.execute(request).await).await?;
        if answer.get("action").and_then(Value::as_str) != Some("GUARDRAIL_INTERVENED") {
            return Ok(Said::Nothing);
        }
        if mentions_blocked(answer.get("assessments").unwrap_or(&Value::Null)) {
            return Ok(Said::Block("intervened".into()));
        }
        let outputs: Vec<&str> = answer
            .get("outputs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("text").and_then(Value::as_str))
            .collect();
        if outputs.len() != texts.len() {
            // An intervention whose masked texts cannot be matched up blocks.
            return Ok(Said::Block("intervened".into()));
        }
        let rewrites = outputs
            .into_iter()
            .enumerate()
            .filter(|(i, o)| texts[*i] != *o)
            .map(|(i, o)| (i, o.to_owned()))
            .collect();
        Ok(Said::Rewrite(rewrites, vec!["anonymized".into()]))
    }
}

/// Whether an ApplyGuardrail assessment says any policy blocked.
fn mentions_blocked(value: &Value) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| (k == "action" && v.as_str() == Some("BLOCKED")) || mentions_blocked(v)),
        Value::Array(items) => items.iter().any(mentions_blocked),
        _ => false,
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<Value, String> {
    read(request.send().await).await
}

/// A detector's JSON answer, or why there is none.
async fn read(sent: Result<reqwest::Response, reqwest::Error>) -> Result<Value, String> {
    let response =
        sent.map_err(|e| format!("the detector could not be reached: {}", e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the detector answered {status}"));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| format!("the detector's answer broke off: {}", e.without_url()))?;
    serde_json::from_slice(&bytes).map_err(|_| "the detector's answer is not JSON".to_owned())
}
