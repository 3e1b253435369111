//! Guardrails and their attachments: the validated types and their conversions from
//! the wire specs (`spec.rs`). What the rules do to a request lives in
//! `policy::guardrails`; here they are only read, checked and compiled (every regex
//! once, when the document is loaded).

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::secret::Secret;

use super::spec::{AttachmentSpec, CustomPatternSpec, GuardrailSpec, PiiDetectorSpec};
use super::types::{ModelPattern, Problems};
use super::validate::required_name;

/// A guardrail rule, as the policy layer runs it.
#[derive(Debug)]
pub struct Guardrail {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub check: Check,
    pub hook_point: HookPoint,
    pub enabled: bool,
    /// `enforcement_mode: block`; `false` is `monitor` (record, change nothing).
    pub block: bool,
    /// When the rule cannot run on the input (its detector unreachable, its kind not
    /// supported here): allow and record the bypass (`true`), or block.
    pub fail_open: bool,
    /// The same for the output; by default an outage blocks rather than release
    /// unscanned text.
    pub output_fail_open: bool,
    /// A rule that cannot run blocks whatever `fail_open` says.
    pub mandatory: bool,
    /// Per detector call (remote kinds); `Some(ZERO)` times out at once.
    pub timeout: Option<Duration>,
    /// Evaluation order: oldest first, rules without it after those with it.
    pub created_at: Option<i128>,
    /// How output checks run on streams.
    pub stream: StreamCheck,
    /// Scope when no attachment names the rule: model aliases (globs) and key ids.
    pub models: Vec<ModelPattern>,
    pub api_keys: Vec<String>,
    pub unknown_fields: usize,
}

impl Guardrail {
    /// The kind, as metric labels and usage records name it.
    pub fn kind(&self) -> &'static str {
        match &self.check {
            Check::Keyword(_) => "keyword",
            Check::Pii(_) => "pii",
            Check::Remote(remote) => remote.kind(),
            Check::Unsupported(kind) => kind,
        }
    }

    /// Whether a rule that cannot run lets the text through at `output` or not.
    pub fn fails_open(&self, output: bool) -> bool {
        !self.mandatory
            && if output {
                self.output_fail_open
            } else {
                self.fail_open
            }
    }

    /// The order of the chain: `(has no created_at, created_at, id)`.
    pub fn order(&self) -> (bool, i128, Arc<str>) {
        (
            self.created_at.is_none(),
            self.created_at.unwrap_or(0),
            self.id.clone(),
        )
    }

    pub fn runs_at(&self, output: bool) -> bool {
        match self.hook_point {
            HookPoint::Both => true,
            HookPoint::Input => !output,
            HookPoint::Output => output,
        }
    }
}

/// What a rule looks for.
#[derive(Debug)]
pub enum Check {
    /// Any pattern blocks (an empty list allows everything). Literals are compiled
    /// as case-insensitive regexes of their escaped text.
    Keyword(Vec<regex::Regex>),
    Pii(Vec<PiiRule>),
    /// A detector service, called per check.
    Remote(Remote),
    /// A kind this agent cannot run; it never passes silently (`fail_open` decides).
    Unsupported(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    Input,
    Output,
    Both,
}

/// One PII detector of a rule: what it finds, and what happens to a find.
#[derive(Debug)]
pub struct PiiRule {
    /// `EMAIL`, `BANK_CARD`, a custom pattern's name in capitals: the mask token is
    /// `[<label>_REDACTED]`.
    pub label: String,
    pub detector: PiiDetector,
    pub action: PiiAction,
    /// Replaces the span instead of the mask token (`""` removes it).
    pub replacement: Option<String>,
}

impl PiiRule {
    pub fn mask_token(&self) -> String {
        match &self.replacement {
            Some(r) => r.clone(),
            None => format!("[{}_REDACTED]", self.label),
        }
    }
}

#[derive(Debug)]
pub enum PiiDetector {
    Builtin(PiiType),
    /// A custom regex; its first capture group, when it has one, is the span.
    Custom(regex::Regex),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiType {
    Email,
    ChinaMobile,
    ChinaIdCard,
    BankCard,
    UsSsn,
    IpAddress,
    ApiKey,
    Jwt,
    PrivateKey,
}

impl PiiType {
    pub const ALL: [(&'static str, PiiType); 9] = [
        ("email", PiiType::Email),
        ("china_mobile", PiiType::ChinaMobile),
        ("china_id_card", PiiType::ChinaIdCard),
        ("bank_card", PiiType::BankCard),
        ("us_ssn", PiiType::UsSsn),
        ("ip_address", PiiType::IpAddress),
        ("api_key", PiiType::ApiKey),
        ("jwt", PiiType::Jwt),
        ("private_key", PiiType::PrivateKey),
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiAction {
    Mask,
    Block,
}

/// Output checks on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCheck {
    /// Text is released window by window, `overlap` characters held back so a span
    /// split across windows is still caught.
    Window { size: usize, overlap: usize },
    /// The whole answer is held back and checked at its end; past `max_bytes` the
    /// stream is cut (`fail_open: false`) or released unchecked from there on.
    BufferFull { max_bytes: usize, fail_open: bool },
}

impl StreamCheck {
    /// The mode that satisfies both: `buffer_full` over windows (the smaller buffer,
    /// failing open only if both do), else the smaller window with the larger overlap.
    pub fn stricter(self, other: StreamCheck) -> StreamCheck {
        use StreamCheck::{BufferFull, Window};
        match (self, other) {
            (
                BufferFull {
                    max_bytes,
                    fail_open,
                },
                BufferFull {
                    max_bytes: other_bytes,
                    fail_open: other_open,
                },
            ) => BufferFull {
                max_bytes: max_bytes.min(other_bytes),
                fail_open: fail_open && other_open,
            },
            (whole @ BufferFull { .. }, Window { .. })
            | (Window { .. }, whole @ BufferFull { .. }) => whole,
            (
                Window { size, overlap },
                Window {
                    size: other_size,
                    overlap: other_overlap,
                },
            ) => Window {
                size: size.min(other_size),
                overlap: overlap.max(other_overlap),
            },
        }
    }
}

/// Without `window_size`: about a paragraph per release.
pub const DEFAULT_WINDOW: usize = 256;
pub const DEFAULT_OVERLAP: usize = 64;
pub const DEFAULT_MAX_BUFFER: usize = 1 << 20;

/// Kinds an operator may configure that call a regional service or a local model this
/// agent does not run: accepted, reported, and never a silent pass.
const UNSUPPORTED_KINDS: [&str; 3] = ["aliyun_text_moderation", "aliyun_ai_guardrail", "semantic"];

/// The detector services guardrails call.
#[derive(Debug)]
pub enum Remote {
    Presidio(Presidio),
    OpenAiModeration {
        /// `{endpoint}/moderations`.
        base: String,
        api_key: Secret,
        model: String,
        /// Only the listed categories are enforced; none listed: the service's `flagged`.
        thresholds: BTreeMap<String, f64>,
    },
    Lakera {
        base: String,
        api_key: Secret,
        project_id: Option<String>,
    },
    /// Azure AI Content Safety's Prompt Shield.
    PromptShield {
        base: String,
        api_key: Secret,
    },
    TextModeration(TextModeration),
    Bedrock(BedrockGuardrail),
}

impl Remote {
    pub fn kind(&self) -> &'static str {
        match self {
            Remote::Presidio(_) => "presidio",
            Remote::OpenAiModeration { .. } => "openai_moderation",
            Remote::Lakera { .. } => "lakera",
            Remote::PromptShield { .. } => "azure_content_safety",
            Remote::TextModeration(_) => "azure_content_safety_text_moderation",
            Remote::Bedrock(_) => "bedrock",
        }
    }

    /// Whether a verdict may rewrite text (then the rule runs on its own, in order);
    /// the others only block, and consecutive ones are called at the same time.
    pub fn masks(&self) -> bool {
        matches!(self, Remote::Presidio(_) | Remote::Bedrock(_))
    }
}

#[derive(Debug)]
pub struct Presidio {
    pub analyzer: String,
    pub anonymizer: Option<String>,
    /// Entity types and their actions; empty: every recognizer, `default_action`.
    pub entities: Vec<(String, PiiAction)>,
    pub language: String,
    pub score_threshold: Option<f64>,
    /// The anonymizer's operator: `replace`, `mask`, `hash`, `redact`.
    pub operator: String,
    pub default_action: PiiAction,
}

#[derive(Debug)]
pub struct TextModeration {
    pub base: String,
    pub api_key: Secret,
    pub categories: Vec<String>,
    pub blocklists: Vec<String>,
    pub halt_on_blocklist_hit: bool,
    pub output_type: String,
    /// A category at this severity or above blocks (per-category overrides win).
    pub threshold: u32,
    pub by_category: BTreeMap<String, u32>,
    /// `concatenate_all_content`; else only the callers' own messages.
    pub all_content: bool,
}

#[derive(Debug)]
pub struct BedrockGuardrail {
    /// `https://bedrock-runtime.{region}.amazonaws.com`, or `endpoint`.
    pub base: String,
    pub id: String,
    pub version: String,
    pub credential: super::AwsCredential,
    /// `latency_mode: timed`: the longest wait for a verdict (else `timeout_ms`).
    pub timed: Option<Duration>,
}

impl Guardrail {
    pub fn from_spec(id: &str, mut spec: GuardrailSpec) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let stream = stream_check(&mut p, &spec);
        let name = required_name(&mut p, "name", spec.name.take());
        let kind = spec.kind.take();
        let check = match kind.as_deref() {
            None | Some("keyword") => Check::Keyword(keyword_patterns(&mut p, spec.patterns)),
            Some("pii") => Check::Pii(pii_rules(
                &mut p,
                spec.detectors,
                spec.custom_patterns,
                spec.default_action.as_deref(),
            )),
            Some(
                kind @ ("presidio"
                | "openai_moderation"
                | "lakera"
                | "azure_content_safety"
                | "azure_content_safety_text_moderation"
                | "bedrock"),
            ) => Check::Remote(remote(&mut p, kind, &mut spec)),
            Some(other) => match UNSUPPORTED_KINDS.iter().find(|k| **k == other) {
                Some(kind) => Check::Unsupported(kind),
                None => {
                    p.push(
                        "kind",
                        format!(
                            "'{other}' is not a guardrail kind (keyword, pii, {})",
                            UNSUPPORTED_KINDS.join(", ")
                        ),
                    );
                    Check::Keyword(Vec::new())
                }
            },
        };
        let hook_point = one_of(
            &mut p,
            "hook_point",
            spec.hook_point.as_deref(),
            &[
                ("input", HookPoint::Input),
                ("output", HookPoint::Output),
                ("both", HookPoint::Both),
            ],
            HookPoint::Both,
        );
        let block = one_of(
            &mut p,
            "enforcement_mode",
            spec.enforcement_mode.as_deref(),
            &[("block", true), ("monitor", false)],
            true,
        );
        let created_at = spec.created_at.as_ref().and_then(|v| created_at(&mut p, v));
        let models = spec
            .models
            .unwrap_or_default()
            .into_iter()
            .map(|m| ModelPattern::new(&m))
            .collect();
        p.into_result(Guardrail {
            id: id.into(),
            name: name.into(),
            check,
            hook_point,
            enabled: spec.enabled.unwrap_or(true),
            block,
            fail_open: spec.fail_open.unwrap_or(false),
            output_fail_open: spec.output_fail_open.unwrap_or(false),
            mandatory: spec.mandatory.unwrap_or(false),
            timeout: spec.timeout_ms.map(Duration::from_millis),
            created_at,
            stream,
            models,
            api_keys: spec.api_keys.unwrap_or_default(),
            unknown_fields: spec.unknown.len(),
        })
    }
}

/// `field`'s value among `choices`, `default` when it is absent.
fn one_of<T: Copy>(
    p: &mut Problems,
    field: &str,
    value: Option<&str>,
    choices: &[(&str, T)],
    default: T,
) -> T {
    let Some(value) = value else {
        return default;
    };
    match choices.iter().find(|(name, _)| *name == value) {
        Some((_, v)) => *v,
        None => {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            p.push(
                field,
                format!("'{value}' is not one of {}", names.join(", ")),
            );
            default
        }
    }
}

fn compile(p: &mut Problems, path: String, pattern: &str) -> Option<regex::Regex> {
    compile_with(p, path, pattern, false)
}

fn compile_with(
    p: &mut Problems,
    path: String,
    pattern: &str,
    ignore_case: bool,
) -> Option<regex::Regex> {
    match regex::RegexBuilder::new(pattern)
        .case_insensitive(ignore_case)
        .size_limit(1 << 20)
        .build()
    {
        Ok(re) => Some(re),
        Err(e) => {
            p.push(path, format!("invalid regex: {e}"));
            None
        }
    }
}

fn keyword_patterns(
    p: &mut Problems,
    specs: Option<Vec<super::spec::PatternSpec>>,
) -> Vec<regex::Regex> {
    let mut patterns = Vec::new();
    for (i, pattern) in specs.unwrap_or_default().into_iter().enumerate() {
        let value = match pattern.value {
            Some(v) if !v.is_empty() => v,
            _ => {
                p.push(format!("patterns[{i}].value"), "required");
                continue;
            }
        };
        let path = format!("patterns[{i}].value");
        let compiled = match pattern.kind.as_deref() {
            None | Some("literal") => compile_with(p, path, &regex::escape(&value), true),
            Some("regex") => compile(p, path, &value),
            Some(other) => {
                p.push(
                    format!("patterns[{i}].kind"),
                    format!("'{other}' is not one of literal, regex"),
                );
                None
            }
        };
        patterns.extend(compiled);
    }
    patterns
}

fn action(p: &mut Problems, path: String, value: Option<&str>, default: PiiAction) -> PiiAction {
    match value {
        None => default,
        Some("mask") => PiiAction::Mask,
        Some("block") => PiiAction::Block,
        Some(other) => {
            p.push(path, format!("'{other}' is not one of mask, block"));
            default
        }
    }
}

fn pii_rules(
    p: &mut Problems,
    detectors: Option<Vec<PiiDetectorSpec>>,
    custom: Option<Vec<CustomPatternSpec>>,
    default_action: Option<&str>,
) -> Vec<PiiRule> {
    let default = action(p, "default_action".into(), default_action, PiiAction::Mask);
    let mut rules = Vec::new();
    for (i, d) in detectors.unwrap_or_default().into_iter().enumerate() {
        let action = action(
            p,
            format!("detectors[{i}].action"),
            d.action.as_deref(),
            default,
        );
        let Some(kind) = d.kind else {
            p.push(format!("detectors[{i}].type"), "required");
            continue;
        };
        match PiiType::ALL.iter().find(|(name, _)| *name == kind) {
            Some((name, t)) => rules.push(PiiRule {
                label: name.to_uppercase(),
                detector: PiiDetector::Builtin(*t),
                action,
                replacement: None,
            }),
            None => {
                let names: Vec<&str> = PiiType::ALL.iter().map(|(n, _)| *n).collect();
                p.push(
                    format!("detectors[{i}].type"),
                    format!("'{kind}' is not one of {}", names.join(", ")),
                );
            }
        }
    }
    for (i, c) in custom.unwrap_or_default().into_iter().enumerate() {
        let action = action(
            p,
            format!("custom_patterns[{i}].action"),
            c.action.as_deref(),
            default,
        );
        let name = required_name(p, &format!("custom_patterns[{i}].name"), c.name);
        let Some(regex) = c.regex.filter(|r| !r.is_empty()) else {
            p.push(format!("custom_patterns[{i}].regex"), "required");
            continue;
        };
        if let Some(re) = compile(p, format!("custom_patterns[{i}].regex"), &regex) {
            rules.push(PiiRule {
                label: name
                    .chars()
                    .map(|c| {
                        if c.is_alphanumeric() {
                            c.to_ascii_uppercase()
                        } else {
                            '_'
                        }
                    })
                    .collect(),
                detector: PiiDetector::Custom(re),
                action,
                replacement: c.replacement,
            });
        }
    }
    if rules.is_empty() {
        p.push(
            "detectors",
            "a pii guardrail needs at least one detector or custom pattern",
        );
    }
    rules
}

/// An `http(s)` URL without its trailing slash.
fn base_url(p: &mut Problems, field: &str, value: Option<String>, default: Option<&str>) -> String {
    let value = value.or_else(|| default.map(str::to_owned));
    match value {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
            url.trim_end_matches('/').to_owned()
        }
        Some(_) => {
            p.push(field, "must be an http:// or https:// URL");
            String::new()
        }
        None => {
            p.push(field, "required");
            String::new()
        }
    }
}

fn secret(p: &mut Problems, field: &str, value: Option<Secret>) -> Secret {
    match value {
        Some(s) if !s.is_empty() => s,
        _ => {
            p.push(field, "required");
            Secret::new("")
        }
    }
}

fn remote(p: &mut Problems, kind: &str, spec: &mut GuardrailSpec) -> Remote {
    match kind {
        "presidio" => {
            let default_action = action(
                p,
                "default_action".into(),
                spec.default_action.as_deref(),
                PiiAction::Mask,
            );
            let mut entities = Vec::new();
            for (i, e) in spec
                .entities
                .take()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let action = action(
                    p,
                    format!("entities[{i}].action"),
                    e.action.as_deref(),
                    default_action,
                );
                match e.kind.filter(|k| !k.is_empty()) {
                    Some(kind) => entities.push((kind, action)),
                    None => p.push(format!("entities[{i}].type"), "required"),
                }
            }
            let masks = default_action == PiiAction::Mask
                || entities.iter().any(|(_, a)| *a == PiiAction::Mask);
            let anonymizer = match spec.anonymizer_url.take() {
                Some(url) => Some(base_url(p, "anonymizer_url", Some(url), None)),
                None if masks => {
                    p.push("anonymizer_url", "required when an entity's action is mask");
                    None
                }
                None => None,
            };
            let operator = spec.operator.take().unwrap_or_else(|| "replace".into());
            if !["replace", "mask", "hash", "redact"].contains(&operator.as_str()) {
                p.push(
                    "operator",
                    format!("'{operator}' is not one of replace, mask, hash, redact"),
                );
            }
            Remote::Presidio(Presidio {
                analyzer: base_url(p, "analyzer_url", spec.analyzer_url.take(), None),
                anonymizer,
                entities,
                language: spec.language.take().unwrap_or_else(|| "en".into()),
                score_threshold: spec.score_threshold,
                operator,
                default_action,
            })
        }
        "openai_moderation" => Remote::OpenAiModeration {
            base: base_url(
                p,
                "endpoint",
                spec.endpoint.take(),
                Some("https://api.openai.com/v1"),
            ),
            api_key: secret(p, "api_key", spec.api_key.take()),
            model: spec
                .model
                .take()
                .unwrap_or_else(|| "omni-moderation-latest".into()),
            thresholds: spec.category_thresholds.take().unwrap_or_default(),
        },
        "lakera" => Remote::Lakera {
            base: base_url(
                p,
                "endpoint",
                spec.endpoint.take(),
                Some("https://api.lakera.ai"),
            ),
            api_key: secret(p, "api_key", spec.api_key.take()),
            project_id: spec.project_id.take(),
        },
        "azure_content_safety" => Remote::PromptShield {
            base: base_url(p, "endpoint", spec.endpoint.take(), None),
            api_key: secret(p, "api_key", spec.api_key.take()),
        },
        "azure_content_safety_text_moderation" => {
            let output_type = spec
                .output_type
                .take()
                .unwrap_or_else(|| "FourSeverityLevels".into());
            if !["FourSeverityLevels", "EightSeverityLevels"].contains(&output_type.as_str()) {
                p.push(
                    "output_type",
                    format!(
                        "'{output_type}' is not one of FourSeverityLevels, EightSeverityLevels"
                    ),
                );
            }
            let all_content = one_of(
                p,
                "text_source",
                spec.text_source.as_deref(),
                &[
                    ("concatenate_user_content", false),
                    ("concatenate_all_content", true),
                ],
                false,
            );
            Remote::TextModeration(TextModeration {
                base: base_url(p, "endpoint", spec.endpoint.take(), None),
                api_key: secret(p, "api_key", spec.api_key.take()),
                categories: spec.categories.take().unwrap_or_default(),
                blocklists: spec.blocklist_names.take().unwrap_or_default(),
                halt_on_blocklist_hit: spec.halt_on_blocklist_hit.unwrap_or(false),
                output_type,
                threshold: spec.severity_threshold.unwrap_or(4),
                by_category: spec
                    .severity_threshold_by_category
                    .take()
                    .unwrap_or_default(),
                all_content,
            })
        }
        _ => {
            let region = spec.region.take().filter(|r| !r.is_empty());
            if region.is_none() {
                p.push("region", "required");
            }
            let region = region.unwrap_or_default();
            let credential = match spec.aws_credentials.take() {
                Some(c) => {
                    if c.kind.as_deref().is_some_and(|k| k != "static") {
                        p.push(
                            "aws_credentials.kind",
                            "only static credentials are supported",
                        );
                    }
                    let access_key_id =
                        c.access_key_id
                            .filter(|k| !k.is_empty())
                            .unwrap_or_else(|| {
                                p.push("aws_credentials.access_key_id", "required");
                                String::new()
                            });
                    super::AwsCredential {
                        access_key_id,
                        secret_access_key: secret(
                            p,
                            "aws_credentials.secret_access_key",
                            c.secret_access_key,
                        ),
                        session_token: c.session_token,
                        region: region.clone(),
                    }
                }
                None => {
                    p.push(
                        "aws_credentials",
                        "required ({kind: static, access_key_id, secret_access_key})",
                    );
                    super::AwsCredential {
                        access_key_id: String::new(),
                        secret_access_key: Secret::new(""),
                        session_token: None,
                        region: region.clone(),
                    }
                }
            };
            let timed = match spec.latency_mode.take() {
                None => None,
                Some(m) => match m.kind.as_deref() {
                    None | Some("serial") => None,
                    Some("timed") => Some(Duration::from_millis(m.timeout_ms.unwrap_or(1000))),
                    Some(other) => {
                        p.push(
                            "latency_mode.kind",
                            format!("'{other}' is not one of serial, timed"),
                        );
                        None
                    }
                },
            };
            let required = |p: &mut Problems, field: &str, v: Option<String>| {
                v.filter(|s| !s.is_empty()).unwrap_or_else(|| {
                    p.push(field, "required");
                    String::new()
                })
            };
            Remote::Bedrock(BedrockGuardrail {
                base: base_url(
                    p,
                    "endpoint",
                    spec.endpoint.take(),
                    Some(&format!("https://bedrock-runtime.{region}.amazonaws.com")),
                ),
                id: required(p, "guardrail_id", spec.guardrail_id.take()),
                version: required(p, "guardrail_version", spec.guardrail_version.take()),
                credential,
                timed,
            })
        }
    }
}

/// RFC 3339 text, or Unix seconds.
fn created_at(p: &mut Problems, value: &Value) -> Option<i128> {
    use time::format_description::well_known::Rfc3339;
    let parsed = match value {
        Value::String(s) => time::OffsetDateTime::parse(s, &Rfc3339)
            .map(|t| t.unix_timestamp_nanos())
            .map_err(|e| format!("not an RFC 3339 timestamp: {e}")),
        Value::Number(n) => n
            .as_f64()
            .map(|secs| (secs * 1e9) as i128)
            .ok_or_else(|| "not a number of seconds".to_owned()),
        _ => Err("must be an RFC 3339 timestamp or Unix seconds".to_owned()),
    };
    parsed.map_err(|e| p.push("created_at", e)).ok()
}

fn stream_check(p: &mut Problems, spec: &GuardrailSpec) -> StreamCheck {
    let size = |v: Option<u64>, default: usize| v.map_or(default, |n| n as usize);
    match spec.stream_processing_mode.as_deref() {
        None | Some("window") => {
            let size_ = size(spec.window_size, DEFAULT_WINDOW);
            let overlap = size(spec.window_overlap_size, DEFAULT_OVERLAP.min(size_ / 2));
            if size_ == 0 {
                p.push("window_size", "must be at least 1");
            }
            if overlap >= size_.max(1) {
                p.push("window_overlap_size", "must be smaller than window_size");
            }
            StreamCheck::Window {
                size: size_,
                overlap,
            }
        }
        Some("buffer_full") => StreamCheck::BufferFull {
            max_bytes: size(spec.max_buffer_bytes, DEFAULT_MAX_BUFFER),
            fail_open: one_of(
                p,
                "on_buffer_exceeded",
                spec.on_buffer_exceeded.as_deref(),
                &[("fail_closed", false), ("fail_open", true)],
                false,
            ),
        },
        Some(other) => {
            p.push(
                "stream_processing_mode",
                format!("'{other}' is not one of window, buffer_full"),
            );
            StreamCheck::Window {
                size: DEFAULT_WINDOW,
                overlap: DEFAULT_OVERLAP,
            }
        }
    }
}

/// A `guardrail_attachments` resource: the requests a guardrail applies to.
#[derive(Debug)]
pub struct Attachment {
    pub id: Arc<str>,
    pub guardrail_id: Arc<str>,
    pub scope: Scope,
    pub priority: i64,
    pub enabled: bool,
    pub unknown_fields: usize,
}

/// What an attachment matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every request.
    Env,
    /// A model, by id or alias.
    Model(String),
    /// A caller key, by id.
    ApiKey(String),
    /// Caller keys of a team (their `team_id`).
    Team(String),
    /// `/passthrough/{provider}/...` calls, by the provider segment.
    PassthroughRoute(String),
    /// MCP servers: this agent serves none, so it never matches.
    McpServer(String),
}

impl Scope {
    /// More specific scopes win ties of priority.
    pub fn specificity(&self) -> u8 {
        match self {
            Scope::Env => 0,
            Scope::PassthroughRoute(_) | Scope::McpServer(_) => 1,
            Scope::Model(_) => 2,
            Scope::Team(_) => 3,
            Scope::ApiKey(_) => 4,
        }
    }
}

impl Attachment {
    pub fn from_spec(id: &str, spec: AttachmentSpec) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let guardrail_id = required_name(&mut p, "guardrail_id", spec.guardrail_id);
        let scope_id = spec.scope_id.filter(|s| !s.is_empty());
        let scope = match (spec.scope_type.as_deref(), scope_id) {
            (Some("env"), _) => Scope::Env,
            (Some(kind), Some(sid)) => match kind {
                "model" => Scope::Model(sid),
                "api_key" => Scope::ApiKey(sid),
                "team" => Scope::Team(sid),
                "passthrough_route" => Scope::PassthroughRoute(sid),
                "mcp_server" => Scope::McpServer(sid),
                other => {
                    p.push("scope_type", format!("'{other}' is not one of env, model, api_key, team, passthrough_route, mcp_server"));
                    Scope::Env
                }
            },
            (Some(_), None) => {
                p.push("scope_id", "required unless scope_type is env");
                Scope::Env
            }
            (None, _) => {
                p.push(
                    "scope_type",
                    "required (env, model, api_key, team, passthrough_route, mcp_server)",
                );
                Scope::Env
            }
        };
        p.into_result(Attachment {
            id: id.into(),
            guardrail_id: guardrail_id.into(),
            scope,
            priority: spec.priority.unwrap_or(0),
            enabled: spec.enabled.unwrap_or(true),
            unknown_fields: spec.unknown.len(),
        })
    }
}
