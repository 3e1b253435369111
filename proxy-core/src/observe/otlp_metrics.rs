//! The metrics pushed over OTLP/HTTP (`observability.metrics.otlp`): the very families
//! the Prometheus endpoint serves, converted from its OpenMetrics exposition, so the
//! two can never disagree. Counters become monotonic cumulative sums (named without
//! `_total`, which OTLP-to-Prometheus translation adds back), gauges and info families
//! gauges, histograms cumulative histograms with the same bucket bounds.
//!
//! The exposition is the agent's own output, so the reading below covers what
//! [`super::metrics::Metrics::render`] writes (`# TYPE`/`# HELP`/`# UNIT` lines, samples
//! with quoted, escaped label values, `# EOF`); a line it does not understand is skipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// `observability.metrics.otlp`, resolved.
#[derive(Debug, Clone)]
pub struct MetricsPushOptions {
    /// The collector's OTLP/HTTP metrics URL (`.../v1/metrics`).
    pub endpoint: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub service_name: String,
}

/// Pushes done and failed, for the metrics themselves.
#[derive(Debug, Default)]
pub struct PushStats {
    pub pushed: AtomicU64,
    pub failed: AtomicU64,
}

/// Pushes `render()` (an OpenMetrics exposition) every interval until `stop`, and once
/// more when stopped. A failed push is counted and logged (once until one succeeds);
/// the next interval sends the cumulative values again, so nothing is lost but
/// resolution.
pub async fn push_every(
    options: MetricsPushOptions,
    render: impl Fn() -> String + Send,
    stats: Arc<PushStats>,
    stop: CancellationToken,
) {
    let client = match super::trace::otlp_client(options.timeout) {
        Ok(client) => client,
        Err(e) => {
            warn!(error = %e, "OTLP metrics: no HTTP client; nothing is pushed");
            return;
        }
    };
    let started = unix_nanos(SystemTime::now());
    let mut failing = false;
    loop {
        let stopped = tokio::select! {
            () = tokio::time::sleep(options.interval) => false,
            () = stop.cancelled() => true,
        };
        let body = export_request(
            &render(),
            &options.service_name,
            started,
            unix_nanos(SystemTime::now()),
        );
        let sent = client
            .post(&options.endpoint)
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| {
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("the collector answered {}", r.status()))
                }
            });
        match sent {
            Ok(()) => {
                stats.pushed.fetch_add(1, Ordering::Relaxed);
                failing = false;
            }
            Err(error) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    warn!(endpoint = %options.endpoint, error, "OTLP metrics push failed; retrying every interval");
                    failing = true;
                }
            }
        }
        if stopped {
            return;
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One family of the exposition.
#[derive(Debug, Default)]
struct Family {
    name: String,
    kind: String,
    help: String,
    unit: String,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// The protobuf `ExportMetricsServiceRequest` of an OpenMetrics exposition.
pub fn export_request(text: &str, service_name: &str, start_ns: u64, now_ns: u64) -> Vec<u8> {
    let metrics = families(text)
        .into_iter()
        .filter_map(|family| metric(family, start_ns, now_ns))
        .collect();
    let string = |key: &str, value: &str| KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", service_name),
                    string("service.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Resource::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "aisix-agent".to_owned(),
                    ..InstrumentationScope::default()
                }),
                metrics,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
    .encode_to_vec()
}

fn families(text: &str) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    for line in text.lines() {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (Some(what), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            let rest = parts.next().unwrap_or("").to_owned();
            if out.last().is_none_or(|f| f.name != name) {
                out.push(Family {
                    name: name.to_owned(),
                    ..Family::default()
                });
            }
            let Some(family) = out.last_mut() else {
                continue;
            };
            match what {
                "TYPE" => family.kind = rest,
                "HELP" => family.help = rest.replace("\\n", "\n").replace("\\\\", "\\"),
                "UNIT" => family.unit = rest,
                _ => {}
            }
        } else if let (Some(sample), Some(family)) = (sample(line), out.last_mut()) {
            family.samples.push(sample);
        }
    }
    out
}

/// `name{label="value",...} value [timestamp]`.
fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        (labels, rest) = label_set(inner)?;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The labels after a sample's `{`, and what follows the closing `}`.
fn label_set(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        };
        labels.push((key.to_owned(), value));
        s = &rest[end + 1..];
    }
}

fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.clone())),
            }),
            ..KeyValue::default()
        })
        .collect()
}

fn number(value: f64) -> number_data_point::Value {
    if value.fract() == 0.0 && value.abs() < 9_007_199_254_740_992.0 {
        number_data_point::Value::AsInt(value as i64)
    } else {
        number_data_point::Value::AsDouble(value)
    }
}

fn metric(family: Family, start_ns: u64, now_ns: u64) -> Option<Metric> {
    let point = |s: &Sample| NumberDataPoint {
        attributes: attributes(&s.labels),
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        value: Some(number(s.value)),
        ..NumberDataPoint::default()
    };
    let cumulative = AggregationTemporality::Cumulative as i32;
    let (name, data) = match family.kind.as_str() {
        "counter" => (
            family.name.clone(),
            metric::Data::Sum(Sum {
                data_points: family
                    .samples
                    .iter()
                    .filter(|s| s.name.ends_with("_total"))
                    .map(point)
                    .collect(),
                aggregation_temporality: cumulative,
                is_monotonic: true,
            }),
        ),
        "gauge" | "unknown" => (
            family.name.clone(),
            metric::Data::Gauge(Gauge {
                data_points: family.samples.iter().map(point).collect(),
            }),
        ),
        "info" => (
            format!("{}_info", family.name),
            metric::Data::Gauge(Gauge {
                data_points: family.samples.iter().map(point).collect(),
            }),
        ),
        "histogram" => (
            family.name.clone(),
            metric::Data::Histogram(Histogram {
                data_points: histogram_points(&family, start_ns, now_ns),
                aggregation_temporality: cumulative,
            }),
        ),
        _ => return None,
    };
    Some(Metric {
        name,
        description: family.help,
        unit: family.unit,
        data: Some(data),
        ..Metric::default()
    })
}

/// One point per label set: `_bucket` counts (cumulative in the exposition, per bucket
/// in OTLP), `_sum` and `_count`.
fn histogram_points(family: &Family, start_ns: u64, now_ns: u64) -> Vec<HistogramDataPoint> {
    /// A label set's point, and its cumulative buckets (bound, count) as read.
    struct Point {
        labels: Vec<(String, String)>,
        point: HistogramDataPoint,
        buckets: Vec<(f64, u64)>,
    }
    let mut points: Vec<Point> = Vec::new();
    for sample in &family.samples {
        let labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        let at = match points.iter().position(|p| p.labels == labels) {
            Some(at) => at,
            None => {
                points.push(Point {
                    point: HistogramDataPoint {
                        attributes: attributes(&labels),
                        start_time_unix_nano: start_ns,
                        time_unix_nano: now_ns,
                        ..HistogramDataPoint::default()
                    },
                    labels,
                    buckets: Vec::new(),
                });
                points.len() - 1
            }
        };
        let Point { point, buckets, .. } = &mut points[at];
        let suffix = &sample.name[family.name.len().min(sample.name.len())..];
        match suffix {
            "_sum" => point.sum = Some(sample.value),
            "_count" => point.count = sample.value as u64,
            "_bucket" => {
                let le = sample
                    .labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .and_then(|(_, v)| v.parse::<f64>().ok());
                if let Some(le) = le {
                    buckets.push((le, sample.value as u64));
                }
            }
            _ => {}
        }
    }
    points
        .into_iter()
        .map(
            |Point {
                 mut point, buckets, ..
             }| {
                let mut below = 0;
                for (le, cumulative) in buckets {
                    if le.is_finite() {
                        point.explicit_bounds.push(le);
                    }
                    point.bucket_counts.push(cumulative.saturating_sub(below));
                    below = cumulative;
                }
                point
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

    const TEXT: &str = "# HELP aisix_requests Answered requests.\n# TYPE aisix_requests counter\naisix_requests_total{route=\"/v1/chat/completions\",model=\"a \\\"b\\\"\",status=\"200\"} 3\n# HELP aisix_request_duration_seconds Time.\n# TYPE aisix_request_duration_seconds histogram\n# UNIT aisix_request_duration_seconds seconds\naisix_request_duration_seconds_sum{route=\"r\"} 0.5\naisix_request_duration_seconds_count{route=\"r\"} 3\naisix_request_duration_seconds_bucket{le=\"0.1\",route=\"r\"} 1\naisix_request_duration_seconds_bucket{le=\"1.0\",route=\"r\"} 3\naisix_request_duration_seconds_bucket{le=\"+Inf\",route=\"r\"} 3\n# TYPE aisix_snapshot_revision gauge\naisix_snapshot_revision 42\n# TYPE aisix_build info\naisix_build_info{version=\"0.1.0\"} 1\n# EOF\n";

    #[test]
    fn the_exposition_becomes_one_otlp_metric_per_family() {
        let bytes = export_request(TEXT, "edge", 1, 2);
        let request = ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap();
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "aisix_requests",
                "aisix_request_duration_seconds",
                "aisix_snapshot_revision",
                "aisix_build_info"
            ]
        );
        let Some(metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("a sum");
        };
        assert!(sum.is_monotonic);
        let point = &sum.data_points[0];
        assert_eq!(point.value, Some(number_data_point::Value::AsInt(3)));
        let model = point
            .attributes
            .iter()
            .find(|kv| kv.key == "model")
            .unwrap();
        assert_eq!(
            model.value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("a \"b\"".to_owned()))
        );
        let Some(metric::Data::Histogram(histogram)) = &metrics[1].data else {
            panic!("a histogram");
        };
        assert_eq!(metrics[1].unit, "seconds");
        let point = &histogram.data_points[0];
        assert_eq!(point.explicit_bounds, [0.1, 1.0]);
        assert_eq!(point.bucket_counts, [1, 2, 0]);
        assert_eq!((point.count, point.sum), (3, Some(0.5)));
        assert_eq!(point.attributes.len(), 1, "le is not an attribute");
    }

    #[test]
    fn a_line_it_cannot_read_is_skipped() {
        let text = "# TYPE g gauge\ng{broken 1\ng 2\n";
        let request =
            ExportMetricsServiceRequest::decode(export_request(text, "s", 0, 0).as_slice())
                .unwrap();
        let Some(metric::Data::Gauge(gauge)) =
            &request.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("a gauge");
        };
        assert_eq!(gauge.data_points.len(), 1);
    }
}
