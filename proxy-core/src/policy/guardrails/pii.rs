//! The `pii` detectors: each finds candidate spans with a regex compiled once per
//! process, then checks what a regex cannot (a bank card's Luhn digit, a Chinese ID
//! card's check character, an address's octets, an SSN's reserved numbers).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;

use crate::resources::guardrail::{PiiDetector, PiiRule};

/// The spans of `text` that `rule` finds, in order.
pub fn find(rule: &PiiRule, text: &str, out: &mut Vec<Range<usize>>) {
    match &rule.detector {
        PiiDetector::Custom(re) => {
            for caps in re.captures_iter(text) {
                // The first group, when the pattern has one and it took part, is the span.
                if let Some(m) = caps.get(1).or_else(|| caps.get(0))
                    && !m.is_empty()
                {
                    out.push(m.range());
                }
            }
        }
        PiiDetector::Builtin(kind) => {
            let (re, valid) = &BUILTIN[*kind as usize];
            for m in re.find_iter(text) {
                if valid(m.as_str()) {
                    out.push(m.range());
                }
            }
        }
    }
}

type Validator = fn(&str) -> bool;

/// In the order of [`PiiType`]'s variants.
static BUILTIN: LazyLock<[(Regex, Validator); 9]> = LazyLock::new(|| {
    let re = |pattern: &str| Regex::new(pattern).unwrap_or_else(|e| unreachable!("{e}"));
    [
        (
            re(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
            any,
        ),
        (re(r"(?:\+86[- ]?|\b)1[3-9]\d{9}\b"), any),
        (
            re(r"\b\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]\b"),
            china_id_checks,
        ),
        (re(r"\b\d(?:[ -]?\d){12,18}\b"), luhn_checks),
        (re(r"\b\d{3}-\d{2}-\d{4}\b"), ssn_valid),
        (
            re(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}"),
            ip_valid,
        ),
        (
            re(concat!(
                r"\bsk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{20,}",
                r"|\bAKIA[0-9A-Z]{16}\b",
                r"|\bAIza[0-9A-Za-z_-]{35}",
                r"|\bgh[pousr]_[A-Za-z0-9]{36,}",
                r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
                r"|\bglpat-[A-Za-z0-9_-]{20,}",
            )),
            any,
        ),
        (
            re(r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
            any,
        ),
        (
            // An unterminated key (a truncated paste, a stream still arriving) is
            // masked to the end of the text.
            re(
                r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
            ),
            any,
        ),
    ]
});

fn any(_: &str) -> bool {
    true
}

/// Bank cards: 13 to 19 digits (spaces or dashes between them) with a valid Luhn digit.
fn luhn_checks(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| match (i % 2 == 1, d * 2) {
            (true, doubled) if doubled > 9 => doubled - 9,
            (true, doubled) => doubled,
            (false, _) => d,
        })
        .sum();
    sum % 10 == 0
}

/// GB 11643: the 18th character is the weighted sum of the first 17 digits, mod 11,
/// mapped through `10X98765432`.
fn china_id_checks(candidate: &str) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let bytes = candidate.as_bytes();
    if bytes.len() != 18 {
        return false;
    }
    let sum: u32 = bytes[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == bytes[17].to_ascii_uppercase()
}

/// No SSN has area 000, 666 or 900-999, group 00 or serial 0000.
fn ssn_valid(candidate: &str) -> bool {
    let mut parts = candidate.split('-');
    let (Some(area), Some(group), Some(serial)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

fn ip_valid(candidate: &str) -> bool {
    if candidate.contains(':') {
        candidate.matches(':').count() >= 2 && candidate.parse::<Ipv6Addr>().is_ok()
    } else {
        candidate.parse::<Ipv4Addr>().is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::resources::guardrail::{PiiAction, PiiType};

    fn spans(kind: PiiType, text: &str) -> Vec<&str> {
        let rule = PiiRule {
            label: String::new(),
            detector: PiiDetector::Builtin(kind),
            action: PiiAction::Mask,
            replacement: None,
        };
        let mut out = Vec::new();
        find(&rule, text, &mut out);
        out.into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn each_builtin_detector_finds_its_kind_and_checks_what_it_can() {
        use PiiType::*;
        assert_eq!(
            spans(Email, "mail a.b+c@mail.example.co.uk now"),
            ["a.b+c@mail.example.co.uk"]
        );
        assert_eq!(
            spans(ChinaMobile, "call 13812345678 or +86 13912345678"),
            ["13812345678", "+86 13912345678"]
        );
        assert!(spans(ChinaMobile, "order 123812345678901").is_empty());
        // 11010519491231002X is the standard's sample; one changed digit fails the check.
        assert_eq!(
            spans(ChinaIdCard, "id 11010519491231002X."),
            ["11010519491231002X"]
        );
        assert!(spans(ChinaIdCard, "id 110105194912310021").is_empty());
        assert_eq!(
            spans(BankCard, "card 4111 1111 1111 1111 ok"),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            spans(BankCard, "card 4012-8888-8888-1881"),
            ["4012-8888-8888-1881"]
        );
        assert!(spans(BankCard, "card 4111 1111 1111 1112").is_empty());
        assert!(spans(BankCard, "timestamp 1700000000123").is_empty());
        assert_eq!(spans(UsSsn, "ssn 078-05-1120"), ["078-05-1120"]);
        assert!(spans(UsSsn, "ssn 666-05-1120 or 123-00-4567").is_empty());
        assert_eq!(
            spans(IpAddress, "from 10.0.0.255 and 2001:db8::1"),
            ["10.0.0.255", "2001:db8::1"]
        );
        assert!(spans(IpAddress, "version 1.2.3.999 at 12:30").is_empty());
        assert_eq!(
            spans(
                ApiKey,
                "key sk-proj-abcdefghijklmnopqrstuv and AKIAIOSFODNN7EXAMPLE"
            ),
            ["sk-proj-abcdefghijklmnopqrstuv", "AKIAIOSFODNN7EXAMPLE"]
        );
        assert!(spans(ApiKey, "a task-list of sk-short").is_empty());
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        assert_eq!(spans(Jwt, &format!("token {jwt} end")), [jwt]);
        let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----";
        assert_eq!(spans(PrivateKey, &format!("here {key} done")), [key]);
        assert_eq!(
            spans(PrivateKey, "cut -----BEGIN PRIVATE KEY-----\nMIIB"),
            ["-----BEGIN PRIVATE KEY-----\nMIIB"]
        );
    }

    #[test]
    fn a_custom_pattern_masks_its_first_group() {
        let rule = PiiRule {
            label: "EMPLOYEE".into(),
            detector: PiiDetector::Custom(Regex::new(r"employee id: (E\d{5})").unwrap()),
            action: PiiAction::Mask,
            replacement: None,
        };
        let text = "my employee id: E12345, thanks";
        let mut out = Vec::new();
        find(&rule, text, &mut out);
        assert_eq!(
            out.into_iter().map(|r| &text[r]).collect::<Vec<_>>(),
            ["E12345"]
        );
        assert_eq!(rule.mask_token(), "[EMPLOYEE_REDACTED]");
    }
}
