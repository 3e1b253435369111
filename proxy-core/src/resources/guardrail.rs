//! Guardrails and their attachments: the validated types and their conversions from
//! the wire specs (`spec.rs`). What the rules do to a request lives in
//! `policy::guardrails`; here they are only read, checked and compiled (every regex
//! once, when the document is loaded).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

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

/// Without `window_size`: about a paragraph per release.
pub const DEFAULT_WINDOW: usize = 256;
pub const DEFAULT_OVERLAP: usize = 64;
pub const DEFAULT_MAX_BUFFER: usize = 1 << 20;

/// Kinds an operator may configure that call a service or a model this agent does not
/// run (yet): accepted, reported, and never a silent pass.
const UNSUPPORTED_KINDS: [&str; 9] = [
    "presidio",
    "openai_moderation",
    "lakera",
    "azure_content_safety",
    "azure_content_safety_text_moderation",
    "bedrock",
    "aliyun_text_moderation",
    "aliyun_ai_guardrail",
    "semantic",
];

impl Guardrail {
    pub fn from_spec(id: &str, spec: GuardrailSpec) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let stream = stream_check(&mut p, &spec);
        let name = required_name(&mut p, "name", spec.name);
        let check = match spec.kind.as_deref() {
            None | Some("keyword") => Check::Keyword(keyword_patterns(&mut p, spec.patterns)),
            Some("pii") => Check::Pii(pii_rules(
                &mut p,
                spec.detectors,
                spec.custom_patterns,
                spec.default_action.as_deref(),
            )),
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
