//! The canonical chat form: what every chat format says, in one shape. A request in
//! any caller format is read into `Request` and written out in the upstream's format;
//! answers and stream events go the other way through `Answer` and `Event`.
//!
//! Only what some format can express is kept. Prompt-cache markers (`cache_control`)
//! ride on the text, image, tool-result and tool entries they were set on, so a target
//! that understands them receives them where the caller put them.

use serde_json::{Number, Value};

/// A chat request, without its model (each target names its own).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Request {
    /// The system prompt, in parts.
    pub system: Vec<Text>,
    pub turns: Vec<Turn>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<Number>,
    pub top_p: Option<Number>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// How many alternative answers the caller asked for (OpenAI's `n`).
    pub choices: u64,
    /// `None` when the caller sent no tool list at all.
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    /// `Some(false)` when the caller wants at most one tool call per answer.
    pub parallel_tool_calls: Option<bool>,
    /// The end user the caller names, for the provider's abuse tracking.
    pub user: Option<String>,
    /// Reasoning asked for, as a budget of tokens (Anthropic's `thinking.budget_tokens`;
    /// OpenAI's `reasoning_effort` levels map to and from budgets).
    pub thinking_budget: Option<u64>,
}

/// A piece of text and the prompt-cache marker set on it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Text {
    pub text: String,
    pub cache_control: Option<Value>,
}

impl Text {
    pub fn plain(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            cache_control: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: Role,
    pub content: Vec<Block>,
}

/// One piece of a turn or of an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text(Text),
    Image {
        source: ImageSource,
        cache_control: Option<Value>,
    },
    /// The model asking for a tool to be run; `input` is a JSON object.
    ToolCall {
        id: String,
        name: String,
        input: Value,
    },
    /// What a tool run gave back, as text.
    ToolResult {
        call_id: String,
        content: String,
        cache_control: Option<Value>,
    },
    /// The model's reasoning before its answer: Anthropic's `thinking` (its
    /// `signature` lets it be sent back) or an OpenAI-compatible `reasoning_content`
    /// (no signature).
    Thinking {
        text: String,
        signature: Option<String>,
    },
    /// Reasoning the provider keeps encrypted (Anthropic's `redacted_thinking`).
    RedactedThinking {
        data: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url(String),
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the tool's input.
    pub schema: Value,
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    None,
    /// Some tool must be called.
    Any,
    /// This tool must be called.
    Named(String),
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
    ContentFilter,
}

/// Token counts. `prompt` counts every input token, those read from or written to the
/// provider's prompt cache included (OpenAI's arithmetic); each format writes its own.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    /// The part of `completion` spent reasoning, where the upstream says (OpenAI's
    /// `completion_tokens_details.reasoning_tokens`).
    pub reasoning: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;

    fn add(self, other: Usage) -> Usage {
        Usage {
            prompt: self.prompt + other.prompt,
            completion: self.completion + other.completion,
            cache_read: self.cache_read + other.cache_read,
            cache_write: self.cache_write + other.cache_write,
            reasoning: self.reasoning + other.reasoning,
        }
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub id: String,
    pub model: String,
    /// Reasoning, text and tool calls, in order.
    pub content: Vec<Block>,
    /// `None` when the upstream said nothing; each format writes its default.
    pub stop: Option<Stop>,
    pub usage: Usage,
}

/// One step of a streamed answer. Tool calls are numbered from 0 in the order they
/// start.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start {
        id: String,
        model: String,
    },
    Text(String),
    /// A piece of reasoning text.
    Thinking(String),
    /// The signature of the reasoning so far (Anthropic's `signature_delta`).
    ThinkingSignature(String),
    RedactedThinking(String),
    ToolCall {
        call: usize,
        id: String,
        name: String,
    },
    ToolArguments {
        call: usize,
        json: String,
    },
    /// The counts so far (each replaces the last).
    Usage(Usage),
    Stop(Stop),
    /// The upstream finished its answer.
    End,
}
