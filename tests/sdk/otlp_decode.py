"""Decodes OTLP/HTTP export bodies with the OpenTelemetry project's own protobuf
definitions (`opentelemetry-proto`). Reads a JSON list of {"content_type", "body"
(base64)} from stdin and the signal (`traces` or `metrics`) as the argument; prints
JSON. Traces: one object per span (ids in hex, attributes as a dict, the resource's
attributes beside them). Metrics: one object per metric (name, kind, data points with
attributes). A body that is not a valid export request raises and exits non-zero."""

import base64
import json
import sys

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    if kind == "bytes_value":
        return any_value.bytes_value.hex()
    return getattr(any_value, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


def traces(exports):
    spans = []
    for export in exports:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(
            base64.b64decode(export["body"])
        )
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        {
                            "content_type": export["content_type"],
                            "resource": resource,
                            "scope": scope_spans.scope.name,
                            "scope_version": scope_spans.scope.version,
                            "flags": span.flags,
                            "name": span.name,
                            "kind": trace_pb2.Span.SpanKind.Name(span.kind),
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "trace_state": span.trace_state,
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "attributes": attributes(span.attributes),
                            "status": trace_pb2.Status.StatusCode.Name(span.status.code),
                            "status_message": span.status.message,
                        }
                    )
    return spans


def metrics(exports):
    out = []
    for export in exports:
        request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(
            base64.b64decode(export["body"])
        )
        for resource_metrics in request.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    data = getattr(metric, kind)
                    points = []
                    for point in data.data_points:
                        d = MessageToDict(point, preserving_proto_field_name=True)
                        d["attributes"] = attributes(point.attributes)
                        points.append(d)
                    entry = {
                        "resource": resource,
                        "name": metric.name,
                        "description": metric.description,
                        "unit": metric.unit,
                        "kind": kind,
                        "points": points,
                    }
                    if kind == "sum":
                        entry["monotonic"] = data.is_monotonic
                        entry["temporality"] = data.aggregation_temporality
                    if kind == "histogram":
                        entry["temporality"] = data.aggregation_temporality
                    out.append(entry)
    return out


exports = json.load(sys.stdin)
signal = sys.argv[1]
json.dump(traces(exports) if signal == "traces" else metrics(exports), sys.stdout)
