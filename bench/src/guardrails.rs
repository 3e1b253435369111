//! What in-process guardrails cost a request: a `pii` rule with every built-in
//! detector and a custom pattern, run over a 2 KB chat prompt the way admission runs
//! it (the body read, its text lent out, checked and, when a mask changed it,
//! rewritten). Timed in-process: a gateway round trip's noise here is larger than the
//! chain itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use proxy_core::formats::body::RequestBody;
use proxy_core::observe::metrics::Metrics;
use proxy_core::observe::record::Record;
use proxy_core::policy::guardrails::{Chain, Detectors, Stage};
use proxy_core::resources::Guardrail;

/// Median time per check of a clean prompt and of one with three finds to mask.
pub fn measure() -> (Duration, Duration) {
    let spec = serde_json::json!({"name": "pii", "kind": "pii", "detectors": [
        {"type": "email"}, {"type": "china_mobile"}, {"type": "china_id_card"},
        {"type": "bank_card"}, {"type": "us_ssn"}, {"type": "ip_address"},
        {"type": "api_key"}, {"type": "jwt"}, {"type": "private_key"}],
        "custom_patterns": [{"name": "employee", "regex": "employee id: (E\\d{5})"}]});
    let rule = serde_json::from_value(spec)
        .ok()
        .and_then(|spec| Guardrail::from_spec("bench", spec).ok())
        .expect("the bench guardrail is valid");
    let rules = [Arc::new(rule)];
    let record = Record::new("bench".into(), None);
    let metrics = Metrics::default();
    let detectors = Detectors::standalone();
    let chain = Chain {
        rules: &rules,
        stage: Stage::Input,
        request_id: "bench",
        record: &record,
        metrics: &metrics,
        detectors: &detectors,
    };
    let sentence = "Please summarise the quarterly report for the board, keeping the numbers, \
                    the risks and the next steps in the order they appear. ";
    let clean = prompt(&sentence.repeat(14));
    let found = prompt(&format!(
        "{}Reach me at ann.lee@corp.example or on 4111 1111 1111 1111; employee id: E12345.",
        sentence.repeat(13)
    ));
    (time(&chain, &clean), time(&chain, &found))
}

fn prompt(text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": "bench", "messages": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": text}]}))
    .unwrap_or_default()
}

fn time(chain: &Chain<'_>, body: &[u8]) -> Duration {
    // The gateway parses the body anyway: only the chain is timed.
    let request = RequestBody::parse(body).expect("the bench body parses");
    let check = || {
        let checked = chain.request(&request).now_or_never();
        assert!(
            matches!(checked, Some(Ok(_))),
            "in-process rules answer at once"
        );
    };
    for _ in 0..200 {
        check();
    }
    let mut rounds: Vec<Duration> = (0..21)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..200 {
                check();
            }
            started.elapsed() / 200
        })
        .collect();
    rounds.sort();
    rounds[rounds.len() / 2]
}
