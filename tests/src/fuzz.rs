//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz), kept here so the regression
//! test (`tests/tests/fuzz_regressions.rs`) runs every committed seed and every input
//! that once crashed through exactly the same code on stable Rust.
//!
//! Each takes arbitrary bytes and must return without panicking; what a parser
//! rejects it rejects with an error. Where a result can be checked against itself
//! (a translation must produce JSON; an accepted resource must re-serialise), it is.

use std::sync::Arc;

use proxy_core::formats::chat;
use proxy_core::resources::{Kind, Resource, ResourceKey};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (as in `fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[(&str, Target)] = &[
    ("resource_json", resource_json),
    ("chat_request", chat_request),
    ("guardrail_scan", guardrail_scan),
    ("chat_answer", chat_answer),
    ("messages_request", messages_request),
    ("sse_stream", sse_stream),
    ("etcd_watch", etcd_watch),
    ("pem_bundle", pem_bundle),
    ("aws_event_stream", aws_event_stream),
];

/// A resource document of each kind: parsed and validated.
pub fn resource_json(data: &[u8]) {
    for kind in [
        Kind::ProviderKeys,
        Kind::Models,
        Kind::ApiKeys,
        Kind::Guardrails,
    ] {
        let key = ResourceKey {
            kind,
            id: Arc::from("fuzz"),
        };
        let _ = Resource::parse(&key, data);
    }
}

/// A chat-completions body: parsed as the proxy does, then translated to a messages
/// body; an accepted translation is JSON.
pub fn chat_request(data: &[u8]) {
    let _ = proxy_core::formats::body::RequestBody::parse(data);
    if let Ok(out) = chat::translate_request(
        data,
        &chat::OpenAiChat,
        &chat::AnthropicMessages,
        "upstream-model",
    ) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
            "chat_to_messages produced invalid JSON"
        );
    }
}

/// A messages body: parsed, then translated to a chat-completions body.
pub fn messages_request(data: &[u8]) {
    let _ = proxy_core::formats::body::RequestBody::parse(data);
    if let Ok(out) = chat::translate_request(
        data,
        &chat::AnthropicMessages,
        &chat::OpenAiChat,
        "upstream-model",
    ) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
            "messages_to_chat produced invalid JSON"
        );
    }
}

/// A whole upstream answer, translated both ways (Anthropic message to chat completion
/// and back): an accepted answer comes out as a JSON object.
pub fn chat_answer(data: &[u8]) {
    let (openai, anthropic): (&'static chat::OpenAiChat, &'static chat::AnthropicMessages) =
        (&chat::OpenAiChat, &chat::AnthropicMessages);
    for conversion in [
        chat::Conversion::Translate {
            upstream: anthropic,
            caller: openai,
        },
        chat::Conversion::Translate {
            upstream: openai,
            caller: anthropic,
        },
        chat::Conversion::Translate {
            upstream: &chat::GeminiContent,
            caller: openai,
        },
        chat::Conversion::Translate {
            upstream: &chat::GeminiContent,
            caller: anthropic,
        },
        chat::Conversion::Translate {
            upstream: &chat::BedrockConverse,
            caller: openai,
        },
        chat::Conversion::Translate {
            upstream: &chat::BedrockConverse,
            caller: anthropic,
        },
    ] {
        if let Ok(out) = conversion.answer(bytes::Bytes::copy_from_slice(data), "m") {
            assert!(
                serde_json::from_slice::<serde_json::Value>(&out).is_ok_and(|v| v.is_object()),
                "a translated answer is not a JSON object"
            );
        }
    }
}

/// An SSE byte stream, cut at an arbitrary point (the first byte chooses it): event
/// splitting, data lines, the usage filter and the stream translators (a Gemini one
/// continued on another upstream at the cut, as a resumed stream is).
pub fn sse_stream(data: &[u8]) {
    let Some((&cut, run)) = data.split_first() else {
        return;
    };
    let _ = proxy_core::formats::sse::events(run).count();
    let _ = proxy_core::formats::sse::data_lines(run).count();
    let _ = proxy_core::formats::sse::without_usage_chunk(bytes::Bytes::copy_from_slice(run));
    let at = usize::from(cut).min(run.len());
    let (first, second) = run.split_at(at);
    let mut to_openai = chat::StreamTranslator::new(&chat::AnthropicMessages, &chat::OpenAiChat);
    let _ = to_openai.translate(first);
    let _ = to_openai.translate(second);
    let mut to_anthropic = chat::StreamTranslator::new(&chat::OpenAiChat, &chat::AnthropicMessages);
    let _ = to_anthropic.translate(first);
    let _ = to_anthropic.translate(second);
    let mut from_gemini =
        chat::StreamTranslator::following(&chat::GeminiContent, &chat::OpenAiChat);
    let _ = from_gemini.translate(first);
    from_gemini.continue_with(&chat::OpenAiChat, first.len());
    let _ = from_gemini.translate(second);
}

/// Lines of an etcd v3 JSON watch stream.
pub fn etcd_watch(data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        let _ = agent::etcd::decode_watch("fuzz", line);
    }
}

/// A certificate bundle from PEM text: the input is split into certificate, key and
/// CA at the first two NUL bytes.
pub fn pem_bundle(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let mut next = || certs::PemSource::Inline(parts.next().unwrap_or_default().to_owned());
    let (cert, key, ca) = (next(), next(), next());
    let _ = certs::Bundle::load(&cert, &key, &ca, time::OffsetDateTime::now_utc());
    let _ = certs::inspect_pem("fuzz", &text);
}

/// The guardrail property: a forbidden word in a message's content is seen by the
/// input scan whatever else the body carries, or the body is refused. The input picks
/// the shape: the first byte a nesting depth, each following byte an array or an
/// object level (its low bit) and where the word goes (its second bit: the message's
/// content, a text part, a nested field).
pub fn guardrail_scan(data: &[u8]) {
    const WORD: &str = "forbidden-fuzz-word";
    let Some((&depth, shape)) = data.split_first() else {
        return;
    };
    let mut nested = String::new();
    let levels: Vec<u8> = (0..usize::from(depth))
        .map(|i| shape.get(i).copied().unwrap_or(0))
        .collect();
    for level in &levels {
        nested.push_str(if level & 1 == 0 { "[" } else { "{\"k\":" });
    }
    nested.push('1');
    for level in levels.iter().rev() {
        nested.push(if level & 1 == 0 { ']' } else { '}' });
    }
    let content = match shape.first().map_or(0, |b| (b >> 1) & 3) {
        0 => format!("\"{WORD}\""),
        1 => format!("[{{\"type\":\"text\",\"text\":\"{WORD}\"}}]"),
        _ => format!(
            "[{{\"type\":\"text\",\"text\":\"x\",\"deep\":{nested}}},{{\"type\":\"text\",\"text\":\"{WORD}\"}}]"
        ),
    };
    let body = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":{content},\"extra\":{nested}}}]}}"
    );
    let Ok(request) = proxy_core::formats::body::RequestBody::parse(body.as_bytes()) else {
        return;
    };
    for conversational in [true, false] {
        let text = proxy_core::policy::guardrails::request_text(&request, conversational);
        assert!(
            text.contains(WORD),
            "a body nested {depth} deep was accepted but its text was not scanned"
        );
    }
}

/// An AWS event stream (Bedrock's `converse-stream`), cut at an arbitrary point (the
/// first byte chooses it): framed into server-sent events as it arrives and translated
/// to both caller formats. A frame that does not decode stops the conversion.
pub fn aws_event_stream(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let at = usize::from(cut).min(stream.len());
    let mut frames = proxy_core::formats::eventstream::EventStreamToSse::default();
    let mut to_openai = chat::StreamTranslator::new(&chat::BedrockConverse, &chat::OpenAiChat);
    let mut to_anthropic =
        chat::StreamTranslator::new(&chat::BedrockConverse, &chat::AnthropicMessages);
    for part in [&stream[..at], &stream[at..]] {
        let Ok(events) = frames.push(part) else {
            return;
        };
        let _ = to_openai.translate(&events);
        let _ = to_anthropic.translate(&events);
    }
}
