//! Ended spans written straight into OTLP's protobuf encoding
//! (`opentelemetry/proto/trace/v1/trace.proto`), with prost's wire primitives.
//!
//! opentelemetry-otlp's exporter first converts every span into owned protobuf structs
//! (a `String` per attribute key and value, a `Vec` per id), groups them in a hash map
//! and then encodes them: that was about 60 % of the CPU tracing cost per request in
//! `scripts/bench`. Here a span is encoded once, when it ends, into the batch's buffer;
//! an export only wraps the buffer in its resource and scope. The unit tests check the
//! bytes against opentelemetry-proto's own conversion, decoded by prost.

use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{Array, Key, StringValue, Value};
use opentelemetry_sdk::trace::SpanData;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// `Span.flags`: the context-has-is-remote bit, and the is-remote bit for a remote
/// parent (`SpanFlags` in trace.proto), above the W3C trace flags.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// Appends `span` to `spans` as one `ScopeSpans.spans` entry (field 2).
pub fn push_span(spans: &mut Vec<u8>, span: &SpanData) {
    nested(spans, 2, |b| {
        let context = &span.span_context;
        bytes(b, 1, &context.trace_id().to_bytes());
        bytes(b, 2, &context.span_id().to_bytes());
        let state = context.trace_state().header();
        if !state.is_empty() {
            bytes(b, 3, state.as_bytes());
        }
        if span.parent_span_id != SpanId::INVALID {
            bytes(b, 4, &span.parent_span_id.to_bytes());
        }
        bytes(b, 5, span.name.as_bytes());
        varint(b, 6, kind(&span.span_kind));
        fixed64(b, 7, unix_nanos(span.start_time));
        fixed64(b, 8, unix_nanos(span.end_time));
        for attribute in &span.attributes {
            key_value(b, 9, &attribute.key, &attribute.value);
        }
        if span.dropped_attributes_count > 0 {
            varint(b, 10, u64::from(span.dropped_attributes_count));
        }
        // The agent's spans have no events or links.
        nested(b, 15, |b| match &span.status {
            Status::Error { description } => {
                if !description.is_empty() {
                    bytes(b, 2, description.as_bytes());
                }
                varint(b, 3, 2);
            }
            Status::Ok => varint(b, 3, 1),
            Status::Unset => {}
        });
        let mut flags = u32::from(context.trace_flags().to_u8()) | HAS_IS_REMOTE;
        if span.parent_span_is_remote {
            flags |= IS_REMOTE;
        }
        encode_key(16, WireType::ThirtyTwoBit, b);
        b.extend_from_slice(&flags.to_le_bytes());
    });
}

/// An `ExportTraceServiceRequest` of one resource and one scope whose spans are
/// `spans` (entries written by [`push_span`]); `resource` and `scope` are encoded
/// `Resource` and `InstrumentationScope` messages.
pub fn export_request(resource: &[u8], scope: &[u8], spans: &[u8]) -> Vec<u8> {
    // The lengths are known: the batch is copied once, not moved behind its prefixes.
    let field = |len: usize| 1 + encoded_len_varint(len as u64) + len;
    let scope_spans = field(scope.len()) + spans.len();
    let resource_spans = field(resource.len()) + field(scope_spans);
    let mut out = Vec::with_capacity(field(resource_spans));
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint(resource_spans as u64, &mut out);
    bytes(&mut out, 1, resource);
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(scope_spans as u64, &mut out);
    bytes(&mut out, 1, scope);
    out.extend_from_slice(spans);
    out
}

/// An encoded `Resource` of these attributes.
pub fn resource<'a>(attributes: impl IntoIterator<Item = (&'a Key, &'a Value)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in attributes {
        key_value(&mut out, 1, key, value);
    }
    out
}

/// An encoded `InstrumentationScope` named `name`, of `version`.
pub fn scope(name: &str, version: &str) -> Vec<u8> {
    let mut out = Vec::new();
    bytes(&mut out, 1, name.as_bytes());
    bytes(&mut out, 2, version.as_bytes());
    out
}

fn kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn unix_nanos(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A `KeyValue` message as field `tag`. A scalar's length is known beforehand, so it
/// is written in one go; an array is written and then prefixed ([`nested`]).
fn key_value(b: &mut Vec<u8>, tag: u32, key: &Key, value: &Value) {
    let key = key.as_str().as_bytes();
    let Some(value_len) = scalar_len(value) else {
        return nested(b, tag, |b| {
            bytes(b, 1, key);
            nested(b, 2, |b| any_value(b, value));
        });
    };
    let field = |len: usize| 1 + encoded_len_varint(len as u64) + len;
    encode_key(tag, WireType::LengthDelimited, b);
    encode_varint((field(key.len()) + field(value_len)) as u64, b);
    bytes(b, 1, key);
    encode_key(2, WireType::LengthDelimited, b);
    encode_varint(value_len as u64, b);
    any_value(b, value);
}

/// The encoded length of a scalar's `AnyValue` (`None` for an array).
fn scalar_len(value: &Value) -> Option<usize> {
    Some(match value {
        Value::String(s) => 1 + encoded_len_varint(s.as_str().len() as u64) + s.as_str().len(),
        Value::Bool(_) => 2,
        Value::I64(v) => 1 + encoded_len_varint(*v as u64),
        Value::F64(_) => 9,
        _ => return None,
    })
}

/// The fields of an `AnyValue` (its `value` oneof).
fn any_value(b: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => bytes(b, 1, s.as_str().as_bytes()),
        Value::Bool(v) => varint(b, 2, u64::from(*v)),
        // int64 on the wire: two's complement.
        Value::I64(v) => varint(b, 3, *v as u64),
        Value::F64(v) => fixed64(b, 4, v.to_bits()),
        Value::Array(array) => nested(b, 5, |b| array_values(b, array)),
        other => bytes(b, 1, other.as_str().as_bytes()),
    }
}

/// The `values` of an `ArrayValue`.
fn array_values(b: &mut Vec<u8>, array: &Array) {
    fn each<T>(b: &mut Vec<u8>, values: &[T], write: impl Fn(&mut Vec<u8>, &T)) {
        for v in values {
            nested(b, 1, |b| write(b, v));
        }
    }
    match array {
        Array::Bool(values) => each(b, values, |b, v| varint(b, 2, u64::from(*v))),
        Array::I64(values) => each(b, values, |b, v| varint(b, 3, *v as u64)),
        Array::F64(values) => each(b, values, |b, v| fixed64(b, 4, v.to_bits())),
        Array::String(values) => each(b, values, |b, v: &StringValue| {
            bytes(b, 1, v.as_str().as_bytes());
        }),
        other => each(b, &[other.to_string()], |b, v| bytes(b, 1, v.as_bytes())),
    }
}

/// A length-delimited field (bytes, a string or a message already encoded).
fn bytes(b: &mut Vec<u8>, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, b);
    encode_varint(value.len() as u64, b);
    b.extend_from_slice(value);
}

fn varint(b: &mut Vec<u8>, tag: u32, value: u64) {
    encode_key(tag, WireType::Varint, b);
    encode_varint(value, b);
}

fn fixed64(b: &mut Vec<u8>, tag: u32, value: u64) {
    encode_key(tag, WireType::SixtyFourBit, b);
    b.extend_from_slice(&value.to_le_bytes());
}

/// A message as field `tag`, written by `body`: encoded in place, then its length
/// moved in front of it (the length is known only once it is written).
fn nested(b: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, b);
    let start = b.len();
    body(b);
    let len = (b.len() - start) as u64;
    let n = encoded_len_varint(len);
    encode_varint(len, b);
    b[start..].rotate_right(n);
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::{Duration, UNIX_EPOCH};

    use opentelemetry::trace::{SpanContext, TraceFlags, TraceId, TraceState};
    use opentelemetry::{InstrumentationScope, KeyValue};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope as ProtoScope;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
    use opentelemetry_proto::transform::common::tonic::Attributes;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;

    use super::*;

    fn span(kind: SpanKind, status: Status, parent: u64, remote: bool) -> SpanData {
        let state = TraceState::from_key_value([("vendor", "abc")]).expect("a trace state");
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c),
                SpanId::from(0xb7ad_6b71_6920_3331),
                TraceFlags::SAMPLED,
                false,
                state,
            ),
            parent_span_id: SpanId::from(parent),
            parent_span_is_remote: remote,
            span_kind: kind,
            name: Cow::Borrowed("chat up-model"),
            start_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            end_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_223_456_789),
            attributes: vec![
                KeyValue::new("gen_ai.operation.name", "chat"),
                KeyValue::new("gen_ai.request.model", "up-model".to_owned()),
                KeyValue::new("aisix.attempt", 2),
                KeyValue::new("aisix.negative", -7),
                KeyValue::new("aisix.stream", true),
                KeyValue::new("gen_ai.request.temperature", 0.25),
                KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    Value::Array(vec![StringValue::from("stop"), "length".into()].into()),
                ),
                KeyValue::new("aisix.flags", Value::Array(vec![true, false].into())),
                KeyValue::new("aisix.counts", Value::Array(vec![1_i64, -2].into())),
                KeyValue::new("aisix.ratios", Value::Array(vec![0.5, 1.5].into())),
                KeyValue::new("aisix.text", "a\u{e9}\u{1f600}".repeat(50)),
            ],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: InstrumentationScope::builder("aisix-agent").build(),
        }
    }

    #[test]
    fn spans_decode_as_opentelemetry_protos_own_conversion() {
        let spans = [
            span(SpanKind::Server, Status::Unset, 0xfeed, true),
            span(SpanKind::Client, Status::error("timeout"), 0xbeef, false),
            span(SpanKind::Internal, Status::Ok, 0, false),
            span(SpanKind::Producer, Status::error(""), 1, false),
            span(SpanKind::Consumer, Status::Unset, 1, false),
        ];
        let mut encoded = Vec::new();
        for s in &spans {
            push_span(&mut encoded, s);
        }
        let service = [KeyValue::new("service.name", "orders-gateway")];
        let body = export_request(
            &resource(service.iter().map(|kv| (&kv.key, &kv.value))),
            &scope("aisix-agent", "1.2.3"),
            &encoded,
        );
        let request = ExportTraceServiceRequest::decode(&body[..]).expect("a valid request");
        assert_eq!(request.resource_spans.len(), 1);
        let resource_spans = &request.resource_spans[0];
        assert_eq!(
            resource_spans.resource,
            Some(Resource {
                attributes: Attributes::from(service.to_vec()).0,
                ..Resource::default()
            })
        );
        let scope_spans = &resource_spans.scope_spans[0];
        assert_eq!(
            scope_spans.scope,
            Some(ProtoScope {
                name: "aisix-agent".to_owned(),
                version: "1.2.3".to_owned(),
                ..ProtoScope::default()
            })
        );
        let expected: Vec<ProtoSpan> = spans.into_iter().map(ProtoSpan::from).collect();
        assert_eq!(scope_spans.spans, expected);
    }

    #[test]
    fn lengths_past_one_varint_byte_are_prefixed_right() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let mut b = vec![7];
            nested(&mut b, 3, |b| b.extend(std::iter::repeat_n(0xab, len)));
            let mut rest = &b[1..];
            let key = prost::encoding::decode_varint(&mut rest).expect("a key");
            assert_eq!(key, (3 << 3) | 2);
            let decoded = prost::encoding::decode_varint(&mut rest).expect("a length");
            assert_eq!((decoded as usize, rest.len()), (len, len));
            assert!(rest.iter().all(|&x| x == 0xab));
        }
    }
}
