#![allow(clippy::unwrap_used, reason = "tests")]
use serde_json::json;

use super::*;
use crate::failure::Envelope;
use crate::resources::spec::{AttachmentSpec, GuardrailSpec};
use crate::resources::{Attachment, Kind, ResourceKey};
use crate::snapshot::{SnapshotStore, Source, SourceEvent};

fn guardrail(json: serde_json::Value) -> Arc<Guardrail> {
    let spec: GuardrailSpec = serde_json::from_value(json).unwrap();
    Arc::new(Guardrail::from_spec("g", spec).unwrap())
}

struct Harness {
    record: Record,
    metrics: Arc<Metrics>,
    detectors: Arc<Detectors>,
}

impl Harness {
    fn new() -> Self {
        Self {
            record: Record::new("r".into(), None),
            metrics: Arc::default(),
            detectors: Arc::new(Detectors::standalone()),
        }
    }

    fn chain<'a>(&'a self, rules: &'a [Arc<Guardrail>], stage: Stage) -> Chain<'a> {
        Chain {
            rules,
            stage,
            request_id: "r",
            record: &self.record,
            metrics: &self.metrics,
            detectors: &self.detectors,
        }
    }

    /// A stream guard of `rules` in the OpenAI format, its verdicts in this record.
    fn guard(&self, rules: Vec<Arc<Guardrail>>) -> StreamGuard {
        StreamGuard::new(
            rules,
            "r".into(),
            self.record.clone(),
            self.metrics.clone(),
            self.detectors.clone(),
            Envelope::OpenAi,
        )
    }

    fn scrape(&self) -> String {
        self.metrics
            .render(crate::observe::metrics::Readings::default())
    }

    fn outcomes(&self) -> Vec<(String, String, Vec<String>)> {
        self.record
            .guardrails()
            .into_iter()
            .map(|v| (v.guardrail, v.outcome, v.found))
            .collect()
    }
}

async fn run(h: &Harness, rules: &[Arc<Guardrail>], text: &str) -> Result<String, ProxyError> {
    let mut text = text.to_owned();
    h.chain(rules, Stage::Input).run(&mut [&mut text]).await?;
    Ok(text)
}

#[tokio::test]
async fn keywords_block_literals_ignore_case_and_monitor_only_records() {
    let h = Harness::new();
    let block = guardrail(json!({"name": "secrets", "patterns": [
        {"kind": "literal", "value": "Project X"}, {"kind": "regex", "value": "\\bsk-[a-z0-9]{8}\\b"}]}));
    let err = run(&h, std::slice::from_ref(&block), "tell me about PROJECT x")
        .await
        .unwrap_err();
    assert_eq!(err.class().status, 422);
    assert_eq!(err.class().kind, "content_filter");
    assert_eq!(
        err.to_string(),
        "the input was blocked by guardrail 'secrets'"
    );
    assert!(
        run(&h, std::slice::from_ref(&block), "key SK-ABCDEF12 here")
            .await
            .is_ok()
    );
    // A literal is text, not a pattern.
    let dots = guardrail(json!({"name": "dots", "patterns": [{"value": "a.b"}]}));
    assert!(run(&h, std::slice::from_ref(&dots), "axb").await.is_ok());
    assert!(run(&h, std::slice::from_ref(&dots), "A.B").await.is_err());
    // An empty list allows everything.
    let empty = guardrail(json!({"name": "none", "patterns": []}));
    assert!(run(&h, &[empty], "anything").await.is_ok());
    let monitor = guardrail(
        json!({"name": "watch", "enforcement_mode": "monitor", "patterns": [{"value": "project x"}]}),
    );
    assert_eq!(run(&h, &[monitor], "project x").await.unwrap(), "project x");
    assert_eq!(
        h.outcomes(),
        [
            ("secrets".into(), "blocked".into(), vec!["keyword".into()]),
            ("dots".into(), "blocked".into(), vec!["keyword".into()]),
            ("watch".into(), "monitored".into(), vec!["keyword".into()]),
        ]
    );
    let scrape = h.scrape();
    assert!(
        scrape.contains(
            r#"aisix_guardrail_blocks_total{guardrail="secrets",hook="input",kind="keyword"} 1"#
        ),
        "{scrape}"
    );
    assert!(scrape.contains(
        r#"aisix_guardrail_latency_seconds_count{guardrail="watch",hook="input",kind="keyword"} 1"#
    ));
}

#[tokio::test]
async fn pii_masks_in_place_blocks_per_detector_and_later_rules_see_the_mask() {
    let h = Harness::new();
    let pii = guardrail(json!({"name": "pii", "kind": "pii",
        "detectors": [{"type": "email"}, {"type": "bank_card"}, {"type": "private_key", "action": "block"}],
        "custom_patterns": [
            {"name": "employee", "regex": "employee (E\\d{4})"},
            {"name": "codename", "regex": "Bluebird", "replacement": ""}]}));
    // A keyword rule after it would block on the address: it sees the mask instead.
    let later = guardrail(json!({"name": "no-mail", "patterns": [{"value": "@example.com"}]}));
    let rules = [pii.clone(), later];
    let masked = run(
        &h,
        &rules,
        "mail ann@example.com, card 4111-1111-1111-1111, employee E1234, Bluebird.",
    )
    .await
    .unwrap();
    assert_eq!(
        masked,
        "mail [EMAIL_REDACTED], card [BANK_CARD_REDACTED], employee [EMPLOYEE_REDACTED], ."
    );
    let err = run(&h, &rules, "-----BEGIN PRIVATE KEY-----\nMIIE")
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "the input was blocked by guardrail 'pii'");
    assert!(!err.to_string().contains("MIIE"));
    assert_eq!(
        h.outcomes()[0],
        (
            "pii".into(),
            "masked".into(),
            vec![
                "EMAIL".into(),
                "BANK_CARD".into(),
                "EMPLOYEE".into(),
                "CODENAME".into()
            ]
        )
    );
    // `default_action: block` makes every detector block unless it says otherwise.
    let strict = guardrail(
        json!({"name": "strict", "kind": "pii", "default_action": "block",
        "detectors": [{"type": "email"}, {"type": "ip_address", "action": "mask"}]}),
    );
    assert_eq!(
        run(&h, std::slice::from_ref(&strict), "from 10.1.2.3")
            .await
            .unwrap(),
        "from [IP_ADDRESS_REDACTED]"
    );
    assert!(run(&h, &[strict], "to a@b.io").await.is_err());
    // In monitor mode nothing changes.
    let watch = guardrail(
        json!({"name": "watch", "kind": "pii", "enforcement_mode": "monitor",
        "detectors": [{"type": "email"}]}),
    );
    assert_eq!(run(&h, &[watch], "a@b.io").await.unwrap(), "a@b.io");
}

#[tokio::test]
async fn a_rule_that_cannot_run_fails_open_or_closed_as_configured() {
    let h = Harness::new();
    let closed = guardrail(json!({"name": "semantic", "kind": "semantic"}));
    let err = run(&h, std::slice::from_ref(&closed), "hello")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the input was blocked by guardrail 'semantic': the guardrail could not run and does not fail open"
    );
    // A detector nobody answers for: allowed with the reason recorded.
    let dead = dead_port().await;
    let open = guardrail(
        json!({"name": "lakera", "kind": "lakera", "fail_open": true,
        "api_key": "sk-lakera-secret", "endpoint": format!("http://{dead}")}),
    );
    assert_eq!(
        run(&h, std::slice::from_ref(&open), "hello").await.unwrap(),
        "hello"
    );
    // fail_open covers the input; the output has its own switch.
    let mut text = "answer".to_owned();
    let err = h
        .chain(std::slice::from_ref(&open), Stage::Output)
        .run(&mut [&mut text])
        .await
        .unwrap_err();
    assert_eq!(err.class().status, 422);
    let mandatory = guardrail(json!({"name": "must", "kind": "aliyun_ai_guardrail",
        "fail_open": true, "mandatory": true}));
    assert!(run(&h, &[mandatory], "hello").await.is_err());
    // timeout_ms 0 waits for nothing.
    let instant = guardrail(
        json!({"name": "instant", "kind": "openai_moderation", "fail_open": true,
        "timeout_ms": 0, "api_key": "k", "endpoint": format!("http://{dead}")}),
    );
    assert!(run(&h, &[instant], "hello").await.is_ok());
    let outcomes = h.record.guardrails();
    let bypass = &outcomes[1];
    assert_eq!(
        (bypass.guardrail.as_str(), bypass.outcome.as_str()),
        ("lakera", "bypassed")
    );
    let reason = bypass.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("the detector could not be reached"),
        "{reason}"
    );
    assert!(!format!("{outcomes:?}").contains("sk-lakera-secret"));
    assert_eq!(
        outcomes.last().unwrap().reason.as_deref(),
        Some("timeout_ms is 0: no answer is waited for")
    );
    let scrape = h.scrape();
    assert!(
        scrape.contains(
            r#"aisix_guardrail_bypasses_total{guardrail="lakera",hook="input",kind="lakera"} 1"#
        ),
        "{scrape}"
    );
}

#[tokio::test]
async fn output_fail_open_lets_an_answer_through_when_the_rule_cannot_run() {
    let h = Harness::new();
    let rule = guardrail(json!({"name": "semantic", "kind": "semantic", "output_fail_open": true}));
    let mut text = "answer".to_owned();
    let changed = h
        .chain(std::slice::from_ref(&rule), Stage::Output)
        .run(&mut [&mut text])
        .await
        .unwrap();
    assert!(changed.is_empty());
    // The input has its own switch (fail_open, off).
    assert!(run(&h, &[rule], "question").await.is_err());
    let outcomes = h.outcomes();
    assert_eq!(outcomes[0].1, "bypassed");
    assert_eq!(outcomes[1].1, "blocked");
}

#[tokio::test]
async fn a_full_buffer_that_fails_open_releases_the_rest_unchecked_and_says_so() {
    let h = Harness::new();
    let whole = guardrail(
        json!({"name": "whole", "kind": "pii", "detectors": [{"type": "email"}],
        "stream_processing_mode": "buffer_full", "max_buffer_bytes": 20, "on_buffer_exceeded": "fail_open"}),
    );
    let mut guard = h.guard(vec![whole]);
    assert_eq!(
        deltas(&sent(guard.check(chat_event("held back, ")).await)),
        ""
    );
    let released = deltas(&sent(guard.check(chat_event("then a@b.io and more")).await));
    assert_eq!(released, "held back, then a@b.io and more");
    let later = deltas(&sent(guard.check(chat_event(" c@d.io")).await));
    assert_eq!(later, " c@d.io", "past the buffer nothing is checked");
    let verdicts = h.record.guardrails();
    assert_eq!(verdicts[0].outcome, "bypassed");
    assert_eq!(
        verdicts[0].reason.as_deref(),
        Some("the answer outgrew max_buffer_bytes")
    );
    assert!(h.scrape().contains(
        r#"aisix_guardrail_bypasses_total{guardrail="whole",hook="output",kind="pii"} 1"#
    ));
}

/// A local port nothing listens on.
async fn dead_port() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn a_detector_that_keeps_failing_is_not_called_until_its_circuit_closes() {
    let h = Harness::new();
    let dead = dead_port().await;
    let rule = guardrail(
        json!({"name": "moderation", "kind": "openai_moderation", "fail_open": true,
        "api_key": "k", "endpoint": format!("http://{dead}")}),
    );
    for _ in 0..remote::TRIP_AFTER + 1 {
        assert!(run(&h, std::slice::from_ref(&rule), "hello").await.is_ok());
    }
    let outcomes = h.record.guardrails();
    let last = outcomes.last().unwrap().reason.as_deref().unwrap();
    assert_eq!(
        last,
        "the detector failed 5 times in a row; not called for 30 s"
    );
}

#[tokio::test]
async fn a_request_is_rewritten_only_where_a_mask_changed_it() {
    let h = Harness::new();
    let pii = [guardrail(
        json!({"name": "pii", "kind": "pii", "detectors": [{"type": "email"}]}),
    )];
    let chat = br#"{"model":"m","temperature":0.70,"messages":[{"role":"user","content":[{"type":"text","text":"I am bob@corp.io"}]},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"to\":\"eve@corp.io\"}"}}]}],"metadata":{"a":"b"}}"#;
    let body = RequestBody::parse(chat).unwrap();
    let rewritten = h
        .chain(&pii, Stage::Input)
        .request(&body)
        .await
        .unwrap()
        .unwrap();
    let text = std::str::from_utf8(&rewritten).unwrap();
    // Fields the mask did not touch are copied byte for byte.
    assert!(
        text.starts_with(r#"{"model":"m","temperature":0.70,"messages":"#),
        "{text}"
    );
    assert!(text.ends_with(r#","metadata":{"a":"b"}}"#), "{text}");
    let expected = json!({"model":"m","temperature":0.70,"messages":[
        {"role":"user","content":[{"type":"text","text":"I am [EMAIL_REDACTED]"}]},
        {"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"to\":\"[EMAIL_REDACTED]\"}"}}]}],
        "metadata":{"a":"b"}});
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(text).unwrap(),
        expected
    );
    let clean = RequestBody::parse(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#)
        .unwrap();
    assert!(
        h.chain(&pii, Stage::Input)
            .request(&clean)
            .await
            .unwrap()
            .is_none()
    );
    // A passthrough body that is not JSON is text.
    let raw = h
        .chain(&pii, Stage::Input)
        .raw(b"to: x@y.org")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&raw[..], b"to: [EMAIL_REDACTED]");
}

#[tokio::test]
async fn answers_of_every_format_are_masked() {
    let h = Harness::new();
    let pii = [guardrail(
        json!({"name": "pii", "kind": "pii", "detectors": [{"type": "us_ssn"}]}),
    )];
    let answers = [
        json!({"choices":[{"index":0,"message":{"role":"assistant","content":"ssn 078-05-1120"},"finish_reason":"stop"}]}),
        json!({"choices":[{"index":0,"text":"ssn 078-05-1120"}]}),
        json!({"type":"message","role":"assistant","content":[{"type":"text","text":"ssn 078-05-1120"}]}),
        json!({"object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"ssn 078-05-1120"}]}]}),
    ];
    for answer in answers {
        let bytes = serde_json::to_vec(&answer).unwrap();
        let masked = h
            .chain(&pii, Stage::Output)
            .answer(&bytes)
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8(masked.to_vec()).unwrap();
        assert!(
            text.contains("ssn [US_SSN_REDACTED]") && !text.contains("1120"),
            "{text}"
        );
    }
}

fn chat_event(text: &str) -> Bytes {
    let event = json!({"choices":[{"index":0,"delta":{"content":text}}]});
    Bytes::from(format!("data: {event}\n\n"))
}

fn sent(checked: Result<Bytes, Bytes>) -> String {
    String::from_utf8(checked.expect("not sent").to_vec()).unwrap()
}

/// The text the caller's client puts together from the deltas.
fn deltas(stream: &str) -> String {
    stream
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn a_stream_masks_a_span_split_across_events_and_releases_the_rest_at_the_end() {
    let h = Harness::new();
    let pii = guardrail(
        json!({"name": "pii", "kind": "pii", "detectors": [{"type": "email"}],
        "window_size": 16, "window_overlap_size": 12}),
    );
    let mut guard = h.guard(vec![pii]);
    let mut out = String::new();
    for piece in [
        "Write to ann.lee@exa",
        "mple.com today, or to bo",
        "b@example.org. ",
        "That is all.",
    ] {
        out.push_str(&sent(guard.check(chat_event(piece)).await));
    }
    out.push_str(&sent(guard.check(Bytes::from(
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
    )).await));
    assert_eq!(
        deltas(&out),
        "Write to [EMAIL_REDACTED] today, or to [EMAIL_REDACTED]. That is all."
    );
    assert!(!out.contains("example"), "{out}");
    assert!(out.trim_end().ends_with("data: [DONE]"), "{out}");
    let finish = out.find("finish_reason").unwrap();
    assert!(
        out[..finish].contains("That is all."),
        "held text goes out before the finish chunk"
    );
}

#[tokio::test]
async fn a_stream_is_blocked_on_text_split_across_events_and_buffer_full_holds_everything() {
    let h = Harness::new();
    let words = guardrail(
        json!({"name": "words", "patterns": [{"kind": "regex", "value": "mock\\s+provider"}]}),
    );
    let mut guard = h.guard(vec![words]);
    let first = sent(guard.check(chat_event("Hello from the mock")).await);
    assert!(
        !first.contains("mock"),
        "held back within the overlap: {first}"
    );
    // The window is not full yet: the text is checked when the answer ends.
    assert_eq!(
        deltas(&sent(guard.check(chat_event(" provider.")).await)),
        ""
    );
    let finish = Bytes::from(
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    );
    let Err(error) = guard.check(finish).await else {
        panic!("not blocked")
    };
    let error = String::from_utf8(error.to_vec()).unwrap();
    assert!(error.starts_with("data: {\"error\""), "{error}");
    assert!(error.contains("content_filter") && error.contains("words"));
    assert!(
        !error.contains("provider."),
        "the matched text is not echoed"
    );

    let whole = guardrail(
        json!({"name": "whole", "kind": "pii", "detectors": [{"type": "email"}],
        "stream_processing_mode": "buffer_full", "max_buffer_bytes": 40}),
    );
    let mut guard = h.guard(vec![whole]);
    assert_eq!(
        deltas(&sent(guard.check(chat_event("a long answer, ")).await)),
        ""
    );
    let Err(error) = guard
        .check(chat_event("longer than the forty bytes allowed"))
        .await
    else {
        panic!("a full buffer fails closed by default")
    };
    assert!(String::from_utf8_lossy(&error).contains("max_buffer_bytes"));
}

fn attachment(id: &str, json: serde_json::Value) -> (String, Bytes) {
    let _: Attachment = Attachment::from_spec(
        id,
        serde_json::from_value::<AttachmentSpec>(json.clone()).unwrap(),
    )
    .unwrap();
    (
        ResourceKey::new(Kind::GuardrailAttachments, id).full("/aisix"),
        Bytes::from(json.to_string()),
    )
}

#[tokio::test]
async fn attachments_scope_rules_by_priority_and_rules_run_oldest_first() {
    let store = SnapshotStore::new("/aisix");
    let doc = |kind: Kind, id: &str, json: serde_json::Value| {
        (
            ResourceKey::new(kind, id).full("/aisix"),
            Bytes::from(json.to_string()),
        )
    };
    let mut entries = vec![
        doc(
            Kind::Guardrails,
            "new",
            json!({"name": "new", "created_at": "2026-02-01T00:00:00Z", "patterns": [{"value": "x"}]}),
        ),
        doc(
            Kind::Guardrails,
            "old",
            json!({"name": "old", "created_at": 1700000000, "patterns": [{"value": "x"}]}),
        ),
        doc(
            Kind::Guardrails,
            "undated",
            json!({"name": "undated", "hook_point": "output", "patterns": [{"value": "x"}]}),
        ),
        doc(
            Kind::Guardrails,
            "scoped",
            json!({"name": "scoped", "models": ["gpt-*"], "patterns": [{"value": "x"}]}),
        ),
    ];
    // "new" applies everywhere but to model m2 (a disabled attachment of higher priority)
    // and to team t1's keys.
    entries.push(attachment(
        "a1",
        json!({"guardrail_id": "new", "scope_type": "env", "priority": 1}),
    ));
    entries.push(attachment("a2", json!({"guardrail_id": "new", "scope_type": "model", "scope_id": "m2", "priority": 5, "enabled": false})));
    entries.push(attachment("a3", json!({"guardrail_id": "new", "scope_type": "team", "scope_id": "t1", "priority": 1, "enabled": false})));
    // "old" applies to key k9 only.
    entries.push(attachment(
        "a4",
        json!({"guardrail_id": "old", "scope_type": "api_key", "scope_id": "k9"}),
    ));
    // "pass" applies to passthrough calls to acme only; "mcp" to MCP servers: never here.
    for (id, name) in [("pass", "pass"), ("mcp", "mcp")] {
        entries.push(doc(
            Kind::Guardrails,
            id,
            json!({"name": name, "hook_point": "input", "patterns": [{"value": "x"}]}),
        ));
    }
    entries.push(attachment(
        "a5",
        json!({"guardrail_id": "pass", "scope_type": "passthrough_route", "scope_id": "acme"}),
    ));
    entries.push(attachment(
        "a6",
        json!({"guardrail_id": "mcp", "scope_type": "mcp_server", "scope_id": "tools"}),
    ));
    store.apply(
        Source::File,
        [SourceEvent::Reset {
            entries,
            revision: 1,
        }],
    );
    let snapshot = store.load();
    let names = |subject: Subject<'_>| -> (Vec<String>, Vec<String>) {
        let found = applicable(&snapshot, &subject);
        let names = |v: &[Arc<Guardrail>]| v.iter().map(|g| g.name.to_string()).collect();
        (names(&found.input), names(&found.output))
    };
    let base = Subject {
        model_id: "id1",
        model: "gpt-4o",
        api_key_id: "k9",
        team_id: None,
        passthrough: None,
    };
    assert_eq!(
        names(base),
        (
            vec!["old".into(), "new".into(), "scoped".into()],
            vec![
                "old".into(),
                "new".into(),
                "scoped".into(),
                "undated".into()
            ]
        )
    );
    assert_eq!(
        names(Subject {
            model: "m2",
            api_key_id: "k1",
            ..base
        })
        .0,
        Vec::<String>::new()
    );
    assert_eq!(
        names(Subject {
            api_key_id: "k1",
            team_id: Some("t1"),
            ..base
        })
        .0,
        ["scoped"]
    );
    assert_eq!(
        names(Subject {
            api_key_id: "k1",
            ..base
        })
        .0,
        ["new", "scoped"]
    );
    assert_eq!(
        names(Subject {
            passthrough: Some("acme"),
            ..base
        })
        .0,
        ["old", "new", "pass", "scoped"]
    );
    assert_eq!(
        names(Subject {
            passthrough: Some("other"),
            ..base
        })
        .0,
        ["old", "new", "scoped"]
    );
}

#[tokio::test]
async fn bad_guardrails_are_rejected_naming_the_field() {
    let problems = |json: serde_json::Value| -> Vec<String> {
        let spec: GuardrailSpec = serde_json::from_value(json).unwrap();
        Guardrail::from_spec("g", spec)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.path)
            .collect()
    };
    assert_eq!(
        problems(json!({"name": "p", "kind": "pii", "detectors": [{"type": "passport"}]})),
        ["detectors[0].type", "detectors"]
    );
    assert_eq!(
        problems(
            json!({"name": "p", "kind": "pii", "custom_patterns": [{"name": "c", "regex": "("}]})
        ),
        ["custom_patterns[0].regex", "detectors"]
    );
    assert_eq!(
        problems(json!({"name": "k", "kind": "telepathy"})),
        ["kind"]
    );
    assert_eq!(
        problems(json!({"name": "k", "created_at": "yesterday"})),
        ["created_at"]
    );
    assert_eq!(
        problems(json!({"name": "k", "window_size": 10, "window_overlap_size": 10})),
        ["window_overlap_size"]
    );
    let spec: AttachmentSpec =
        serde_json::from_value(json!({"guardrail_id": "g", "scope_type": "model"})).unwrap();
    let paths: Vec<String> = Attachment::from_spec("a", spec)
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(paths, ["scope_id"]);
}

/// The stream property: whatever the chunking and the window, no text a blocking rule
/// matches reaches the caller (the window's overlap at least as long as the match).
#[tokio::test]
async fn no_blocked_word_reaches_the_caller_whatever_the_chunking() {
    const WORD: &str = "forbidden";
    let h = Harness::new();
    let mut rng = fastrand::Rng::with_seed(31);
    for _ in 0..300 {
        let overlap = rng.usize(WORD.len()..WORD.len() + 8);
        let size = rng.usize(overlap + 1..overlap + 40);
        let buffer_full = rng.u8(0..4) == 0;
        let mut rule = json!({"name": "w", "hook_point": "output", "patterns": [{"value": WORD}],
            "window_size": size, "window_overlap_size": overlap});
        if buffer_full {
            rule["stream_processing_mode"] = json!("buffer_full");
        }
        let g = guardrail(rule);
        let before = "x".repeat(rng.usize(0..60));
        let text = format!("{before}{WORD} and after {}", "y".repeat(rng.usize(0..30)));
        let mut cuts: Vec<usize> = (0..rng.usize(1..8))
            .map(|_| rng.usize(0..=text.len()))
            .collect();
        cuts.sort_unstable();
        cuts.push(text.len());
        let mut guard = h.guard(vec![g]);
        let (mut shown, mut at, mut blocked) = (String::new(), 0, false);
        let finish = Bytes::from(
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        );
        let runs = cuts
            .iter()
            .map(|&cut| {
                let piece = chat_event(&text[at..cut]);
                at = cut;
                piece
            })
            .collect::<Vec<_>>()
            .into_iter()
            .chain([finish]);
        for run in runs {
            match guard.check(run).await {
                Ok(out) => shown.push_str(&deltas(std::str::from_utf8(&out).unwrap())),
                Err(_) => {
                    blocked = true;
                    break;
                }
            }
        }
        assert!(
            blocked,
            "size {size} overlap {overlap} cuts {cuts:?}: not blocked"
        );
        assert!(
            !shown.contains(WORD),
            "size {size} overlap {overlap} cuts {cuts:?}: {shown:?}"
        );
    }
}

#[tokio::test]
async fn a_completions_stream_gets_its_held_text_before_its_finish() {
    let h = Harness::new();
    let pii = guardrail(json!({"name": "pii", "kind": "pii", "detectors": [{"type": "email"}]}));
    let mut guard = h.guard(vec![pii]);
    let event = |text: &str, finish: serde_json::Value| {
        let event = json!({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]});
        Bytes::from(format!("data: {event}\n\n"))
    };
    let mut out = sent(guard.check(event("write to ann@", json!(null))).await);
    out.push_str(&sent(
        guard.check(event("corp.example", json!("stop"))).await,
    ));
    out.push_str(&sent(guard.check(Bytes::from("data: [DONE]\n\n")).await));
    let texts: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .map(|v| {
            v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(texts, ["", "write to [EMAIL_REDACTED]"], "{out}");
    assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
}
