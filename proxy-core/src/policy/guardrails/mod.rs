//! Guardrails: rules that read the text of a request before it goes upstream
//! (`input`) and of the answer before it is cached and returned (`output`), and block
//! it (422 `content_filter` naming the rule, never the text), mask spans of it in
//! place, or, in `monitor` mode, only record what they would have done.
//!
//! - Which rules run: [`applicable`] picks, from the snapshot, the enabled rules that
//!   apply to the request (by their attachments, else by their own `models` /
//!   `api_keys` scope), in the snapshot's order (`created_at`, oldest first).
//! - How they run: [`Chain::run`] passes every text string through each rule in turn;
//!   a later rule sees what an earlier one masked.
//! - Where the text is: `text.rs` (requests, passthrough bodies, answers, stream
//!   events); the PII detectors: `pii.rs`; streams: `stream.rs`.
//!
//! Every verdict but a pass is counted (`aisix_guardrail_blocks_total`,
//! `aisix_guardrail_bypasses_total`, `aisix_guardrail_latency_seconds`), logged
//! without the text, and written on the request's usage event.

mod pii;
pub mod remote;
mod stream;
pub mod text;

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::join_all;
use tracing::warn;

use crate::failure::ProxyError;
use crate::formats::body::RequestBody;
use crate::hooks::GuardrailVerdict as Verdict;
use crate::observe::metrics::Metrics;
use crate::observe::record::Record;
use crate::resources::guardrail::{PiiAction, Scope};
use crate::resources::{Check, Guardrail};
use crate::snapshot::Snapshot;

pub use remote::Detectors;
use remote::Said;
pub use stream::{StreamGuard, guarded};
use text::{RawText, RequestText};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Input,
    Output,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }
}

/// What attachments and scopes match a request on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    pub model_id: &'a str,
    /// The alias the caller named.
    pub model: &'a str,
    pub api_key_id: &'a str,
    pub team_id: Option<&'a str>,
    /// The provider segment of a passthrough call.
    pub passthrough: Option<&'a str>,
}

/// The enabled rules of one request, in order, by stage.
#[derive(Default)]
pub struct Applicable {
    pub input: Vec<Arc<Guardrail>>,
    pub output: Vec<Arc<Guardrail>>,
}

/// The rules that apply to `subject`. A rule with attachments applies when the
/// matching attachment of the highest priority (ties: the more specific scope) is
/// enabled; a rule without any keeps its own scope (`models`, `api_keys`, or all).
pub fn applicable(snapshot: &Snapshot, subject: &Subject<'_>) -> Applicable {
    let mut found = Applicable::default();
    for g in snapshot.guardrails().filter(|g| g.enabled) {
        let mut attached = snapshot.attachments_of(&g.id).peekable();
        let applies = if attached.peek().is_some() {
            attached
                .filter(|a| matches(&a.scope, subject))
                .max_by_key(|a| (a.priority, a.scope.specificity()))
                .is_some_and(|a| a.enabled)
        } else {
            (g.models.is_empty() || g.models.iter().any(|m| m.matches(subject.model)))
                && (g.api_keys.is_empty() || g.api_keys.iter().any(|k| k == subject.api_key_id))
        };
        if !applies {
            continue;
        }
        if g.runs_at(false) {
            found.input.push(g.clone());
        }
        if g.runs_at(true) {
            found.output.push(g.clone());
        }
    }
    found
}

fn matches(scope: &Scope, s: &Subject<'_>) -> bool {
    match scope {
        Scope::Env => true,
        Scope::Model(m) => m == s.model || m == s.model_id,
        Scope::ApiKey(k) => k == s.api_key_id,
        Scope::Team(t) => s.team_id == Some(t.as_str()),
        Scope::PassthroughRoute(p) => s.passthrough == Some(p.as_str()),
        Scope::McpServer(_) => false,
    }
}

/// A stage's rules with what running them needs: where verdicts go, and the client
/// of the detector services.
pub struct Chain<'a> {
    pub rules: &'a [Arc<Guardrail>],
    pub stage: Stage,
    pub request_id: &'a str,
    pub record: &'a Record,
    pub metrics: &'a Metrics,
    pub detectors: &'a Detectors,
}

/// What one rule found in a set of strings.
enum Finding {
    Nothing,
    /// A blocking match (by a detector or pattern with this label).
    Block(String),
    /// Spans to mask, per string: (string index, span, replacement), and labels.
    Mask(Vec<(usize, Range<usize>, String)>, Vec<String>),
    /// Whole strings to replace (a detector service masked them), and labels.
    Rewrite(Vec<(usize, String)>, Vec<String>),
    /// The rule could not run.
    Failed(String),
}

impl From<Result<Said, String>> for Finding {
    fn from(said: Result<Said, String>) -> Self {
        match said {
            Ok(Said::Nothing) => Finding::Nothing,
            Ok(Said::Block(label)) => Finding::Block(label),
            Ok(Said::Rewrite(texts, labels)) => Finding::Rewrite(texts, labels),
            Err(reason) => Finding::Failed(reason),
        }
    }
}

/// A rule whose detector service only blocks: consecutive ones are asked at once.
fn blocks_only(g: &Guardrail) -> bool {
    matches!(&g.check, Check::Remote(r) if !r.masks())
}

impl Chain<'_> {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs every rule over `texts`, in order, masking in place. Detector services
    /// that only block and follow each other are called at the same time. Returns the
    /// indexes of the strings a mask changed, or the refusal of the first rule that
    /// blocks.
    pub async fn run(&self, texts: &mut [&mut String]) -> Result<Vec<usize>, ProxyError> {
        let mut changed = Vec::new();
        if texts.iter().all(|t| t.is_empty()) {
            return Ok(changed);
        }
        let mut at = 0;
        while at < self.rules.len() {
            let g = &self.rules[at];
            let Check::Remote(_) = &g.check else {
                let started = Instant::now();
                let finding = find(g, texts);
                self.took(g, started.elapsed());
                self.apply(g, finding, texts, &mut changed)?;
                at += 1;
                continue;
            };
            // A masking service alone; block-only ones with those that follow them.
            let batch = if blocks_only(g) {
                self.rules[at..]
                    .iter()
                    .take_while(|g| blocks_only(g))
                    .count()
            } else {
                1
            };
            let rules = &self.rules[at..at + batch];
            let view: Vec<&str> = texts.iter().map(|t| t.as_str()).collect();
            let asked = rules.iter().filter_map(|g| {
                let Check::Remote(remote) = &g.check else {
                    return None;
                };
                let view = &view;
                Some(async move {
                    let started = Instant::now();
                    let said = self.detectors.check(g, remote, view, self.stage).await;
                    (Finding::from(said), started.elapsed())
                })
            });
            let found = join_all(asked).await;
            for (g, (finding, took)) in rules.iter().zip(found) {
                self.took(g, took);
                self.apply(g, finding, texts, &mut changed)?;
            }
            at += batch;
        }
        Ok(changed)
    }

    fn took(&self, g: &Guardrail, took: std::time::Duration) {
        self.metrics
            .record_guardrail_latency(&g.name, self.stage.as_str(), g.kind(), took);
    }

    /// Acts on what `g` found: blocks, masks, records.
    fn apply(
        &self,
        g: &Guardrail,
        finding: Finding,
        texts: &mut [&mut String],
        changed: &mut Vec<usize>,
    ) -> Result<(), ProxyError> {
        let mut mark = |i: usize| {
            if !changed.contains(&i) {
                changed.push(i);
            }
        };
        match finding {
            Finding::Nothing => {}
            Finding::Failed(reason) => {
                if !g.fails_open(self.stage == Stage::Output) {
                    return Err(self.block(g, vec![], Some(reason)));
                }
                self.metrics
                    .record_guardrail_bypass(&g.name, self.stage.as_str(), g.kind());
                warn!(request_id = self.request_id, guardrail = %g.name, stage = self.stage.as_str(), reason, "guardrail could not run; let through (fail open)");
                self.note(g, "bypassed", Vec::new(), Some(reason));
            }
            Finding::Block(label) if g.block => return Err(self.block(g, vec![label], None)),
            Finding::Block(label) => self.monitored(g, vec![label]),
            Finding::Mask(_, labels) | Finding::Rewrite(_, labels) if !g.block => {
                self.monitored(g, labels);
            }
            Finding::Mask(spans, labels) => {
                for (i, text) in texts.iter_mut().enumerate() {
                    let mine: Vec<_> = spans.iter().filter(|(at, ..)| *at == i).collect();
                    if !mine.is_empty() {
                        **text = masked(text, &mine);
                        mark(i);
                    }
                }
                self.masked(g, labels);
            }
            Finding::Rewrite(rewrites, labels) => {
                for (i, new) in rewrites {
                    if let Some(text) = texts.get_mut(i) {
                        **text = new;
                        mark(i);
                    }
                }
                self.masked(g, labels);
            }
        }
        Ok(())
    }

    fn masked(&self, g: &Guardrail, labels: Vec<String>) {
        warn!(request_id = self.request_id, guardrail = %g.name, stage = self.stage.as_str(), found = ?labels, "guardrail masked text");
        self.note(g, "masked", labels, None);
    }

    fn block(&self, g: &Guardrail, found: Vec<String>, reason: Option<String>) -> ProxyError {
        self.metrics
            .record_guardrail_block(&g.name, self.stage.as_str(), g.kind());
        warn!(request_id = self.request_id, guardrail = %g.name, stage = self.stage.as_str(), found = ?found, reason, "blocked by guardrail");
        let unavailable = reason.is_some();
        self.note(g, "blocked", found, reason);
        ProxyError::ContentFiltered {
            guardrail: g.name.to_string(),
            stage: self.stage.as_str(),
            why: if unavailable {
                ": the guardrail could not run and does not fail open"
            } else {
                ""
            },
        }
    }

    fn monitored(&self, g: &Guardrail, found: Vec<String>) {
        warn!(request_id = self.request_id, guardrail = %g.name, stage = self.stage.as_str(), found = ?found, "guardrail matched (monitor mode: allowed)");
        self.note(g, "monitored", found, None);
    }

    fn note(&self, g: &Guardrail, outcome: &str, found: Vec<String>, reason: Option<String>) {
        self.record.guardrail(Verdict {
            guardrail: g.name.to_string(),
            kind: g.kind().to_owned(),
            hook: self.stage.as_str().to_owned(),
            outcome: outcome.to_owned(),
            found,
            reason,
        });
    }

    /// Checks a request's text; `Some(body)` when a mask rewrote it.
    pub async fn request(&self, request: &RequestBody<'_>) -> Result<Option<Bytes>, ProxyError> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut text = RequestText::of(request);
        let (mut strings, owners) = text.strings();
        let changed = self.run(&mut strings).await?;
        drop(strings);
        if changed.is_empty() {
            return Ok(None);
        }
        let mut fields: Vec<usize> = changed.iter().map(|&i| owners[i]).collect();
        fields.sort_unstable();
        fields.dedup();
        Ok(Some(text.rewrite(request, &fields)))
    }

    /// Checks a body the proxy does not interpret (passthrough); `Some(body)` when a
    /// mask rewrote it.
    pub async fn raw(&self, bytes: &[u8]) -> Result<Option<Bytes>, ProxyError> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut text = RawText::of(bytes)?;
        let changed = self.run(&mut text.strings()).await?;
        Ok((!changed.is_empty()).then(|| text.into_bytes()))
    }

    /// Checks a whole answer; `Some(body)` when a mask rewrote it.
    pub async fn answer(&self, body: &[u8]) -> Result<Option<Bytes>, ProxyError> {
        if self.is_empty() {
            return Ok(None);
        }
        let Ok(mut answer) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Ok(None);
        };
        let mut strings = Vec::new();
        text::answer_strings(&mut answer, &mut strings);
        let changed = self.run(&mut strings).await?;
        Ok((!changed.is_empty()).then(|| Bytes::from(answer.to_string())))
    }
}

/// What an in-process rule `g` finds in `texts`.
fn find(g: &Guardrail, texts: &[&mut String]) -> Finding {
    match &g.check {
        Check::Keyword(patterns) => {
            let hit = texts.iter().any(|t| patterns.iter().any(|p| p.is_match(t)));
            if hit {
                Finding::Block("keyword".into())
            } else {
                Finding::Nothing
            }
        }
        Check::Pii(rules) => {
            let mut spans = Vec::new();
            let mut labels: Vec<String> = Vec::new();
            let mut found = Vec::new();
            for rule in rules {
                for (i, t) in texts.iter().enumerate() {
                    found.clear();
                    pii::find(rule, t, &mut found);
                    if found.is_empty() {
                        continue;
                    }
                    if rule.action == PiiAction::Block {
                        return Finding::Block(rule.label.clone());
                    }
                    if !labels.contains(&rule.label) {
                        labels.push(rule.label.clone());
                    }
                    let token = rule.mask_token();
                    spans.extend(found.drain(..).map(|r| (i, r, token.clone())));
                }
            }
            if spans.is_empty() {
                Finding::Nothing
            } else {
                Finding::Mask(spans, labels)
            }
        }
        // Asked in `Chain::run`.
        Check::Remote(_) => Finding::Nothing,
        Check::Unsupported(kind) => Finding::Failed(format!(
            "guardrail kind '{kind}' is not supported by this agent"
        )),
    }
}

/// `text` with `spans` replaced; overlapping spans become one (the earliest's token).
fn masked(text: &str, spans: &[&(usize, Range<usize>, String)]) -> String {
    let mut spans: Vec<_> = spans
        .iter()
        .map(|(_, r, token)| (r.clone(), token))
        .collect();
    spans.sort_by_key(|(r, _)| (r.start, std::cmp::Reverse(r.end)));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (range, token) in spans {
        if range.start < at {
            // Overlapping a span already masked: mask its rest with it.
            at = at.max(range.end);
            continue;
        }
        out.push_str(&text[at..range.start]);
        out.push_str(token);
        at = range.end;
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
mod tests;

/// What [`trial`] found: the text as the rules left it, and each rule's verdict.
#[derive(Debug, serde::Serialize)]
pub struct Trial {
    pub allowed: bool,
    /// The text after masks (the input when blocked).
    pub text: String,
    /// The rules that ran, in order.
    pub guardrails: Vec<String>,
    pub verdicts: Vec<Verdict>,
    /// The refusal a request would get, when a rule blocked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Runs `text` through the enabled rules of `stage` named `policy` (every enabled rule
/// of the stage when `None`), as a request would meet them: for operators to see what
/// a rule does before callers do. Nothing is counted in the gateway's metrics.
pub async fn trial(
    snapshot: &Snapshot,
    policy: Option<&str>,
    stage: Stage,
    text: &str,
    detectors: &Detectors,
) -> Option<Trial> {
    let rules: Vec<Arc<Guardrail>> = snapshot
        .guardrails()
        .filter(|g| g.enabled && g.runs_at(stage == Stage::Output))
        .filter(|g| policy.is_none_or(|p| *g.name == *p || *g.id == *p))
        .cloned()
        .collect();
    if policy.is_some() && rules.is_empty() {
        return None;
    }
    let record = Record::new("guardrail-trial".into(), None);
    let metrics = Metrics::default();
    let chain = Chain {
        rules: &rules,
        stage,
        request_id: "guardrail-trial",
        record: &record,
        metrics: &metrics,
        detectors,
    };
    let mut checked = text.to_owned();
    let outcome = chain.run(&mut [&mut checked]).await;
    Some(Trial {
        allowed: outcome.is_ok(),
        text: if outcome.is_ok() {
            checked
        } else {
            text.to_owned()
        },
        guardrails: rules.iter().map(|g| g.name.to_string()).collect(),
        verdicts: record.guardrails(),
        error: outcome.err().map(|e| e.to_string()),
    })
}
