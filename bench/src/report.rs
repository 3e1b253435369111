//! The figures of one run, and the Markdown table and JSON made from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::RunArgs;
use crate::load::Run;
use crate::streaming::Timing;

/// Something the load is sent to: the mock directly, nginx, or the gateway.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: &'static str,
    pub url: String,
    pub pid: Option<u32>,
    /// The wrk script of this target, when it is not the run's (another model).
    pub script: Option<std::path::PathBuf>,
}

impl Target {
    pub fn new(name: &'static str, url: String, pid: Option<u32>) -> Self {
        Self {
            name,
            url,
            pid,
            script: None,
        }
    }

    pub fn with_script(mut self, script: std::path::PathBuf) -> Self {
        self.script = Some(script);
        self
    }
}

/// A burst of calls held in flight at once.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct InFlight {
    pub calls: usize,
    pub before_mib: f64,
    pub peak_mib: f64,
    /// Calls that were not a 200 (`usize::MAX`: not all answered in time).
    pub failed: usize,
}

impl InFlight {
    fn per_call_kib(&self) -> f64 {
        (self.peak_mib - self.before_mib) * 1024.0 / self.calls as f64
    }
}

/// The name of `target`'s fixed-rate latency rows.
pub fn fixed(target: &str) -> &'static str {
    match target {
        "direct" => "direct-fixed",
        "nginx" => "nginx-fixed",
        "gateway" => "gateway-fixed",
        "direct-static" => "direct-static-fixed",
        "nginx-static" => "nginx-static-fixed",
        "gateway-static" => "gateway-static-fixed",
        "gateway-shared-static" => "gateway-shared-static-fixed",
        _ => "other-fixed",
    }
}

/// Per target, one entry per round, in round order.
#[derive(Default)]
pub struct Figures {
    latency: BTreeMap<&'static str, Vec<Run>>,
    throughput: BTreeMap<&'static str, Vec<(Run, Option<Duration>)>>,
    /// Median first-chunk time and median per-gap time of a round's streams.
    streaming: BTreeMap<&'static str, Vec<(f64, f64)>>,
    pub rss_idle_mib: f64,
    pub rss_rounds: Vec<f64>,
    /// (seconds into the steady run, MiB)
    pub rss_steady: Vec<(u64, f64)>,
    pub steady: Option<Run>,
    pub rss_after_mib: f64,
    pub propagation_etcd: Vec<Duration>,
    pub propagation_cloud: Vec<Duration>,
    pub cold_start: Vec<Duration>,
    pub scale: Value,
    /// A `pii` chain of every detector on a 2 KB prompt: clean, and with three masks.
    pub guardrail_chain: Option<(Duration, Duration)>,
    pub inflight: Vec<InFlight>,
    /// Streams at scale: target, what its burst saw, the gateway's resident memory
    /// before and at the peak (MiB).
    pub stream_bursts: Vec<(&'static str, crate::streams::Burst, f64, f64)>,
    /// Resident memory a minute (`--after-secs`) after the last in-flight burst.
    pub rss_after_burst_mib: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of durations, in milliseconds.
fn percentile_ms(v: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * ms.len() as f64).ceil().max(1.0) as usize;
    ms[rank.min(ms.len()) - 1]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Figures {
    pub fn latency(&mut self, target: &'static str, run: Run) {
        self.latency.entry(target).or_default().push(run);
    }

    pub fn throughput(&mut self, target: &'static str, run: Run, cpu: Option<Duration>) {
        self.throughput.entry(target).or_default().push((run, cpu));
    }

    pub fn streaming(&mut self, target: &'static str, runs: &[Timing], intervals: u32) {
        let first = median(runs.iter().map(|t| us(t.first_chunk)).collect());
        let gap = median(
            runs.iter()
                .map(|t| us(t.span) / f64::from(intervals))
                .collect(),
        );
        self.streaming.entry(target).or_default().push((first, gap));
    }

    /// Median over rounds of `f(target's round) - f(direct's round)`.
    fn added<T>(rounds: &BTreeMap<&str, Vec<T>>, target: &str, f: impl Fn(&T) -> f64) -> f64 {
        let (Some(t), Some(d)) = (rounds.get(target), rounds.get("direct")) else {
            return f64::NAN;
        };
        median(t.iter().zip(d).map(|(t, d)| f(t) - f(d)).collect())
    }

    /// Median over rounds of `f(a's round) - f(b's round)`.
    fn over<T>(rounds: &BTreeMap<&str, Vec<T>>, a: &str, b: &str, f: impl Fn(&T) -> f64) -> f64 {
        let (Some(a), Some(b)) = (rounds.get(a), rounds.get(b)) else {
            return f64::NAN;
        };
        median(a.iter().zip(b).map(|(a, b)| f(a) - f(b)).collect())
    }

    fn rps(&self, target: &str) -> f64 {
        median(
            self.throughput
                .get(target)
                .into_iter()
                .flatten()
                .map(|(r, _)| r.rps)
                .collect(),
        )
    }

    fn errors(&self, target: &str) -> u64 {
        self.throughput
            .get(target)
            .into_iter()
            .flatten()
            .map(|(r, _)| r.errors)
            .sum::<u64>()
            + self
                .latency
                .get(target)
                .into_iter()
                .flatten()
                .map(|r| r.errors)
                .sum::<u64>()
    }

    fn cpu_us(&self, target: &str) -> f64 {
        median(
            self.throughput
                .get(target)
                .into_iter()
                .flatten()
                .filter_map(|(r, cpu)| Some(us((*cpu)?) / r.requests.max(1) as f64))
                .collect(),
        )
    }

    /// Peak of the last third of the steady run minus the peak of its middle third.
    fn rss_growth(&self) -> f64 {
        let v: Vec<f64> = self.rss_steady.iter().map(|(_, m)| *m).collect();
        let third = v.len() / 3;
        if third == 0 {
            return f64::NAN;
        }
        let peak = |s: &[f64]| s.iter().copied().fold(0.0, f64::max);
        peak(&v[2 * third..]) - peak(&v[third..2 * third])
    }

    /// The fixed-rate latency row of one topology: `gateway` and `nginx` over `direct`.
    fn fixed_row(
        &self,
        topology: &str,
        gateway: &str,
        nginx: &str,
        direct: &str,
        args: &RunArgs,
    ) -> (String, String, String, String, Option<bool>) {
        let over =
            |t: &str, f: fn(&Run) -> f64| Self::over(&self.latency, fixed(t), fixed(direct), f);
        let (g50, g99) = (over(gateway, |r| r.p50_us), over(gateway, |r| r.p99_us));
        let (n50, n99) = (over(nginx, |r| r.p50_us), over(nginx, |r| r.p99_us));
        (
            format!(
                "{topology}added latency at a fixed {} req/s (from due time)",
                args.fixed_rate
            ),
            format!("p50 {g50:.0} µs, p99 {g99:.0} µs"),
            format!("nginx p50 {n50:.0} µs, p99 {n99:.0} µs"),
            "≤ nginx + 30 µs (p50), + 100 µs (p99)".into(),
            Some(g50 <= n50 + 30.0 && g99 <= n99 + 100.0),
        )
    }

    pub fn report(&self, args: &RunArgs, machine: &Value) -> (String, Value) {
        let p50 = |t| Self::added(&self.latency, t, |r: &Run| r.p50_us);
        let p99 = |t| Self::added(&self.latency, t, |r: &Run| r.p99_us);
        let first = |t| Self::added(&self.streaming, t, |s: &(f64, f64)| s.0);
        let gap = |t| Self::added(&self.streaming, t, |s: &(f64, f64)| s.1);
        let ratio = self.rps("gateway") / self.rps("nginx");
        let steady_peak = self
            .rss_steady
            .iter()
            .map(|(_, m)| *m)
            .chain(self.rss_rounds.iter().copied())
            .fold(0.0, f64::max);
        let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let scale = &self.scale;
        let change_max =
            ms(&scale["model_change"]["max_ms"]).max(ms(&scale["key_change"]["max_ms"]));
        let etcd = (
            percentile_ms(&self.propagation_etcd, 50.0),
            percentile_ms(&self.propagation_etcd, 99.0),
        );
        let cloud = (
            percentile_ms(&self.propagation_cloud, 50.0),
            percentile_ms(&self.propagation_cloud, 99.0),
        );
        let cold = (
            percentile_ms(&self.cold_start, 50.0),
            percentile_ms(&self.cold_start, 100.0),
        );
        let gateway_errors = self.errors("gateway") + self.steady.map_or(0, |r| r.errors);

        // (figure, gateway, nginx or note, target, met)
        let mut rows: Vec<(String, String, String, String, Option<bool>)> = vec![
            (
                "added latency p50, c=1".into(),
                format!("{:.0} µs", p50("gateway")),
                format!("{:.0} µs", p50("nginx")),
                "≤ nginx + 30 µs".into(),
                Some(p50("gateway") <= p50("nginx") + 30.0),
            ),
            (
                "added latency p99, c=1".into(),
                format!("{:.0} µs", p99("gateway")),
                format!("{:.0} µs", p99("nginx")),
                "≤ nginx + 60 µs".into(),
                Some(p99("gateway") <= p99("nginx") + 60.0),
            ),
            (
                format!("throughput, c={}", args.connections),
                format!(
                    "{:.0} req/s ({:.2} × nginx), {} errors",
                    self.rps("gateway"),
                    ratio,
                    gateway_errors
                ),
                format!(
                    "{:.0} req/s, {} errors",
                    self.rps("nginx"),
                    self.errors("nginx")
                ),
                "≥ 0.3 × nginx, 0 errors".into(),
                Some(ratio >= 0.3 && gateway_errors == 0),
            ),
            (
                "CPU per request".into(),
                format!("{:.1} µs", self.cpu_us("gateway")),
                format!("{:.1} µs", self.cpu_us("nginx")),
                "≤ 40 µs".into(),
                Some(self.cpu_us("gateway") <= 40.0),
            ),
            (
                "CPU per request over nginx's".into(),
                format!("{:.2}x", self.cpu_us("gateway") / self.cpu_us("nginx")),
                "gateway and nginx on the gateway core, load and mock on the other".into(),
                "≤ 2.0x".into(),
                Some(self.cpu_us("gateway") <= 2.0 * self.cpu_us("nginx")),
            ),
            {
                let (g, n) = (
                    Self::over(
                        &self.latency,
                        "gateway-static",
                        "direct-static",
                        |r: &Run| r.p50_us,
                    ),
                    Self::over(&self.latency, "nginx-static", "direct-static", |r: &Run| {
                        r.p50_us
                    }),
                );
                (
                    "static upstream: added latency p50, c=1".into(),
                    format!("{g:.0} µs"),
                    format!("nginx {n:.0} µs (nginx static upstream beside the load)"),
                    "≤ nginx + 30 µs".into(),
                    Some(g <= n + 30.0),
                )
            },
            {
                let (g, n) = (
                    Self::over(
                        &self.latency,
                        "gateway-static",
                        "direct-static",
                        |r: &Run| r.p99_us,
                    ),
                    Self::over(&self.latency, "nginx-static", "direct-static", |r: &Run| {
                        r.p99_us
                    }),
                );
                (
                    "static upstream: added latency p99, c=1".into(),
                    format!("{g:.0} µs"),
                    format!("nginx {n:.0} µs"),
                    "≤ nginx + 100 µs".into(),
                    Some(g <= n + 100.0),
                )
            },
            {
                let ratio = self.rps("gateway-static") / self.rps("nginx-static");
                (
                    format!("static upstream: throughput, c={}", args.connections),
                    format!(
                        "{:.0} req/s ({ratio:.2} × nginx), {} errors",
                        self.rps("gateway-static"),
                        self.errors("gateway-static")
                    ),
                    format!(
                        "nginx {:.0} req/s, direct {:.0} req/s",
                        self.rps("nginx-static"),
                        self.rps("direct-static")
                    ),
                    "≥ 0.5 × nginx".into(),
                    Some(ratio >= 0.5 && self.errors("gateway-static") == 0),
                )
            },
            {
                let (g, n) = (self.cpu_us("gateway-static"), self.cpu_us("nginx-static"));
                (
                    "static upstream: CPU per request over nginx's".into(),
                    format!("{:.2}x ({g:.1} / {n:.1} µs)", g / n),
                    "gateway alone on its core".into(),
                    "≤ 2.0x".into(),
                    Some(g <= 2.0 * n),
                )
            },
            {
                let (g, n) = (
                    self.cpu_us("gateway-shared-static"),
                    self.cpu_us("nginx-static"),
                );
                let ratio = self.rps("gateway-shared-static") / self.rps("nginx-static");
                (
                    "static upstream, shared runtime (1 worker): CPU per request over nginx's, throughput".into(),
                    format!("{:.2}x ({g:.1} µs), {ratio:.2} × nginx", g / n),
                    format!(
                        "the default on one core, a thread per core: {:.1} µs",
                        self.cpu_us("gateway-static")
                    ),
                    "(reported)".into(),
                    None,
                )
            },
            self.fixed_row("", "gateway", "nginx", "direct", args),
            self.fixed_row(
                "static upstream, ",
                "gateway-static",
                "nginx-static",
                "direct-static",
                args,
            ),
            {
                let ratio = self.rps("tpc-2cores") / self.rps("tpc-1core");
                (
                    format!("2 cores over 1, thread per core, c={}", args.connections),
                    format!(
                        "{ratio:.2}x ({:.0} / {:.0} req/s)",
                        self.rps("tpc-2cores"),
                        self.rps("tpc-1core")
                    ),
                    format!(
                        "shared runtime {:.2}x ({:.0} / {:.0} req/s); on 2 cores the gateway shares the load core with wrk and the static upstream",
                        self.rps("shared-2cores") / self.rps("shared-1core"),
                        self.rps("shared-2cores"),
                        self.rps("shared-1core")
                    ),
                    "≥ 1.8x".into(),
                    Some(ratio >= 1.8),
                )
            },
            {
                let (t, p) = (self.cpu_us("tls"), self.cpu_us("plain"));
                (
                    format!(
                        "TLS listener: CPU per request over plain, keep-alive, c={}",
                        args.connections
                    ),
                    format!("{:.2}x ({t:.1} / {p:.1} µs)", t / p),
                    format!(
                        "{:.0} req/s over TLS, {:.0} plain; {:.0} handshakes/s (a connection per request, {:.1} µs CPU each), {} errors",
                        self.rps("tls"),
                        self.rps("plain"),
                        self.rps("tls-handshakes"),
                        self.cpu_us("tls-handshakes"),
                        self.errors("tls") + self.errors("tls-handshakes")
                    ),
                    "≤ 1.5x".into(),
                    Some(t <= 1.5 * p && self.errors("tls") == 0),
                )
            },
            (
                "rate limits on Redis: added latency over local, c=1".into(),
                format!(
                    "p50 {:+.0} µs, p99 {:+.0} µs",
                    Self::over(&self.latency, "limit-redis", "limit-local", |r: &Run| r
                        .p50_us),
                    Self::over(&self.latency, "limit-redis", "limit-local", |r: &Run| r
                        .p99_us),
                ),
                "Redis on the load core".into(),
                "p50 ≤ +100 µs".into(),
                Some(
                    Self::over(&self.latency, "limit-redis", "limit-local", |r: &Run| {
                        r.p50_us
                    }) <= 100.0,
                ),
            ),
            (
                "rate limits: CPU per request, local / Redis".into(),
                format!(
                    "{:.1} µs / {:.1} µs",
                    self.cpu_us("limit-local"),
                    self.cpu_us("limit-redis")
                ),
                format!(
                    "{:.0} / {:.0} req/s, {} errors",
                    self.rps("limit-local"),
                    self.rps("limit-redis"),
                    self.errors("limit-local") + self.errors("limit-redis")
                ),
                "(reported)".into(),
                None,
            ),
            (
                "tracing on (OTLP, ratio 1.0): CPU per request over off".into(),
                format!(
                    "{:+.1} % ({:.1} / {:.1} µs)",
                    (self.cpu_us("traced") / self.cpu_us("untraced") - 1.0) * 100.0,
                    self.cpu_us("traced"),
                    self.cpu_us("untraced")
                ),
                format!(
                    "c=1 p50 {:+.0} µs; {:.0} / {:.0} req/s, {} errors",
                    Self::over(&self.latency, "traced", "untraced", |r: &Run| r.p50_us),
                    self.rps("traced"),
                    self.rps("untraced"),
                    self.errors("traced") + self.errors("untraced")
                ),
                "≤ +15 %".into(),
                Some(self.cpu_us("traced") <= self.cpu_us("untraced") * 1.15),
            ),
            {
                let (clean, found) = self.guardrail_chain.unwrap_or_default();
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                (
                    "guardrails: a pii chain of every detector, 2 KB prompt".into(),
                    format!(
                        "{:.1} µs clean / {:.1} µs with 3 masks",
                        us(clean),
                        us(found)
                    ),
                    "in-process, median of 21 × 200 checks".into(),
                    "≤ 50 µs".into(),
                    Some(self.guardrail_chain.is_some() && us(clean).max(us(found)) <= 50.0),
                )
            },
            (
                "translated call (Bedrock Converse / Gemini): CPU per request over native".into(),
                format!(
                    "{:.2}x / {:.2}x ({:.1} / {:.1} / {:.1} µs)",
                    self.cpu_us("bedrock") / self.cpu_us("native"),
                    self.cpu_us("gemini") / self.cpu_us("native"),
                    self.cpu_us("bedrock"),
                    self.cpu_us("gemini"),
                    self.cpu_us("native")
                ),
                format!(
                    "c=1 p50 {:+.0} / {:+.0} µs; {} errors",
                    Self::over(&self.latency, "bedrock", "native", |r: &Run| r.p50_us),
                    Self::over(&self.latency, "gemini", "native", |r: &Run| r.p50_us),
                    self.errors("bedrock") + self.errors("gemini") + self.errors("native")
                ),
                "≤ 2x".into(),
                Some(
                    self.cpu_us("bedrock") <= self.cpu_us("native") * 2.0
                        && self.cpu_us("gemini") <= self.cpu_us("native") * 2.0,
                ),
            ),
            (
                "resident memory, idle".into(),
                format!("{:.1} MiB", self.rss_idle_mib),
                String::new(),
                "≤ 12 MiB".into(),
                Some(self.rss_idle_mib <= 12.0),
            ),
            (
                "resident memory, under load (peak)".into(),
                format!("{steady_peak:.1} MiB"),
                String::new(),
                "≤ 50 MB".into(),
                Some(steady_peak * 1.048_576 <= 50.0),
            ),
            (
                format!("memory growth over {} s of load", args.steady_secs),
                format!("{:+.1} MiB", self.rss_growth()),
                "last third's peak − middle third's".into(),
                "≤ 2 MiB".into(),
                Some(self.rss_growth() <= 2.0),
            ),
            (
                format!("resident memory, {} s after load", args.after_secs),
                format!("{:.1} MiB", self.rss_after_mib),
                String::new(),
                "(reported)".into(),
                None,
            ),
        ];
        for burst in &self.inflight {
            rows.push((
                format!("memory per call in flight, {} calls at once", burst.calls),
                format!("{:.1} KiB", burst.per_call_kib()),
                format!(
                    "{:.1} -> {:.1} MiB resident, {} failed",
                    burst.before_mib,
                    burst.peak_mib,
                    if burst.failed == usize::MAX {
                        "not all answered in time: some".to_owned()
                    } else {
                        burst.failed.to_string()
                    }
                ),
                "≤ 16 KiB".into(),
                Some(burst.per_call_kib() <= 16.0 && burst.failed == 0),
            ));
        }
        let burst_of = |name: &str| self.stream_bursts.iter().find(|b| b.0 == name);
        if let (Some(direct), Some(gateway)) = (burst_of("direct"), burst_of("gateway")) {
            let added = gateway.1.gap_p99_us - direct.1.gap_p99_us;
            // A baseline that cannot keep its own pace (the client and the mock share
            // the load core) leaves nothing to compare against: no verdict then.
            let interval_us = args.scale_interval_ms as f64 * 1000.0;
            let baseline_keeps_pace = direct.1.gap_p99_us <= 2.0 * interval_us;
            let verdict = baseline_keeps_pace.then_some(added <= 1000.0 && gateway.1.stalled == 0);
            rows.push((
                format!(
                    "{} streams at once, an event every {} ms: added gap p99",
                    gateway.1.streams, args.scale_interval_ms
                ),
                format!(
                    "{added:.0} µs (p99 {:.0} µs, max {:.0} µs); {} stalled",
                    gateway.1.gap_p99_us, gateway.1.gap_max_us, gateway.1.stalled
                ),
                format!(
                    "direct p99 {:.0} µs, {} stalled{}; gateway {:.1} -> {:.1} MiB resident",
                    direct.1.gap_p99_us,
                    direct.1.stalled,
                    if baseline_keeps_pace {
                        ""
                    } else {
                        " (the direct run misses its own pace: not comparable)"
                    },
                    gateway.2,
                    gateway.3
                ),
                "≤ 1 ms, none stalled".into(),
                verdict,
            ));
        }
        if let (Some(after), Some(first)) = (self.rss_after_burst_mib, self.inflight.first()) {
            rows.push((
                format!("resident memory {} s after the bursts", args.after_secs),
                format!("{after:.1} MiB"),
                format!("{:.1} MiB before them", first.before_mib),
                "within 10 % of before".into(),
                Some(after <= first.before_mib * 1.1),
            ));
        }
        rows.extend([
            (
                "cold start (cache, control plane down)".into(),
                format!("p50 {:.1} ms, max {:.1} ms", cold.0, cold.1),
                format!("{} starts", self.cold_start.len()),
                "≤ 150 ms".into(),
                Some(cold.1 <= 150.0),
            ),
            (
                "propagation from etcd".into(),
                format!("p50 {:.1} ms, p99 {:.1} ms", etcd.0, etcd.1),
                format!("{} writes", self.propagation_etcd.len()),
                "p99 ≤ 50 ms".into(),
                Some(etcd.1 <= 50.0),
            ),
            (
                "propagation from cloud-mock".into(),
                format!("p50 {:.1} ms, p99 {:.1} ms", cloud.0, cloud.1),
                format!("{} writes", self.propagation_cloud.len()),
                "p99 ≤ 100 ms".into(),
                Some(cloud.1 <= 100.0),
            ),
            (
                "streaming: added time to first chunk".into(),
                format!("{:.0} µs", first("gateway")),
                format!("{:.0} µs", first("nginx")),
                "≤ 500 µs".into(),
                Some(first("gateway") <= 500.0),
            ),
            (
                "streaming: added gap per chunk".into(),
                format!("{:.1} µs", gap("gateway")),
                format!("{:.1} µs", gap("nginx")),
                "≤ 20 µs".into(),
                Some(gap("gateway") <= 20.0),
            ),
            (
                format!(
                    "config scale: build {} models + {} keys",
                    scale["models"], scale["keys"]
                ),
                format!("{:.0} ms", ms(&scale["build_ms"])),
                format!("{:.0} MiB resident after", ms(&scale["rss_mib"])),
                "(reported)".into(),
                None,
            ),
            (
                "config scale: one change".into(),
                format!(
                    "model p50 {:.2} ms, key p50 {:.2} ms, max {:.2} ms",
                    ms(&scale["model_change"]["p50_ms"]),
                    ms(&scale["key_change"]["p50_ms"]),
                    change_max
                ),
                String::new(),
                "≤ 5 ms".into(),
                Some(change_max <= 5.0),
            ),
        ]);

        let mut md = String::new();
        let _ = writeln!(md, "## aisix-bench results\n");
        let _ = writeln!(
            md,
            "{} · {} · {} cores · Linux {} · commit {}\n",
            machine["date"].as_str().unwrap_or("?"),
            machine["cpu"].as_str().unwrap_or("?"),
            machine["cores"].as_str().unwrap_or("?"),
            machine["kernel"].as_str().unwrap_or("?"),
            machine["commit"].as_str().unwrap_or("?"),
        );
        let _ = writeln!(
            md,
            "Gateway and nginx on core {}, wrk, mock upstream, etcd and cloud-mock on core {}; {} rounds of {} s (c=1) and {} s (c={}); access log {}. The `static upstream` rows (and the `-static` rows below) are the second topology: an nginx static upstream beside wrk on core {}, and on core {} a gateway and an nginx proxy in front of it, each alone while measured.\n",
            args.gateway_core,
            args.load_core,
            args.rounds,
            args.latency_secs,
            args.throughput_secs,
            args.connections,
            if args.access_log { "on" } else { "off" },
            args.load_core,
            args.gateway_core,
        );
        let _ = writeln!(md, "| figure | gateway | nginx / note | target | met |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for (figure, gateway, other, target, met) in &rows {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(md, "| {figure} | {gateway} | {other} | {target} | {met} |");
        }
        let _ = writeln!(
            md,
            "\n| row | c=1 p50 | c=1 p99 | added p50 | added p99 | c={} req/s | errors | CPU/request | first chunk | gap per chunk |",
            args.connections
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
        for t in [
            "direct",
            "nginx",
            "gateway",
            "direct-fixed",
            "nginx-fixed",
            "gateway-fixed",
            "direct-static",
            "nginx-static",
            "gateway-static",
            "gateway-shared-static",
            "direct-static-fixed",
            "nginx-static-fixed",
            "gateway-static-fixed",
            "gateway-shared-static-fixed",
            "tpc-1core",
            "tpc-2cores",
            "shared-1core",
            "shared-2cores",
            "plain",
            "tls",
            "tls-handshakes",
        ] {
            let base = match (t.contains("-static"), t.ends_with("-fixed")) {
                (true, true) => "direct-static-fixed",
                (true, false) => "direct-static",
                (false, true) => "direct-fixed",
                (false, false) => "direct",
            };
            let p50 = |t| Self::over(&self.latency, t, base, |r: &Run| r.p50_us);
            let p99 = |t| Self::over(&self.latency, t, base, |r: &Run| r.p99_us);
            let lat = |f: fn(&Run) -> f64| {
                median(self.latency.get(t).into_iter().flatten().map(f).collect())
            };
            let stream = |f: fn(&(f64, f64)) -> f64| {
                median(self.streaming.get(t).into_iter().flatten().map(f).collect())
            };
            let added = |v: f64| {
                if t == base {
                    "—".to_owned()
                } else {
                    format!("{v:.0} µs")
                }
            };
            let cpu = self.cpu_us(t);
            let _ = writeln!(
                md,
                "| {t} | {:.0} µs | {:.0} µs | {} | {} | {:.0} | {} | {} | {:.0} µs | {:.0} µs |",
                lat(|r| r.p50_us),
                lat(|r| r.p99_us),
                added(p50(t)),
                added(p99(t)),
                self.rps(t),
                self.errors(t),
                if cpu.is_nan() {
                    "—".to_owned()
                } else {
                    format!("{cpu:.1} µs")
                },
                stream(|s| s.0),
                stream(|s| s.1),
            );
        }
        let missed: Vec<&str> = rows
            .iter()
            .filter(|r| r.4 == Some(false))
            .map(|r| r.0.as_str())
            .collect();
        let _ = writeln!(
            md,
            "\nTargets missed: {}",
            if missed.is_empty() {
                "none".to_owned()
            } else {
                missed.join("; ")
            }
        );

        let ms_list = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
        let json = json!({
            "machine": machine,
            "settings": args,
            "figures": rows.iter().map(|(figure, gateway, other, target, met)| json!({
                "figure": figure, "gateway": gateway, "reference": other, "target": target, "met": met,
            })).collect::<Vec<_>>(),
            "rounds": {
                "latency": self.latency,
                "throughput": self.throughput.iter().map(|(t, v)| (*t, v.iter().map(|(r, cpu)| json!({
                    "run": r, "cpu_us": cpu.map(us),
                })).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
                "streaming_first_chunk_and_gap_us": self.streaming,
            },
            "rss_mib": {
                "idle": self.rss_idle_mib,
                "rounds": self.rss_rounds,
                "steady": self.rss_steady,
                "after": self.rss_after_mib,
                "in_flight_bursts": self.inflight,
                "stream_bursts": self.stream_bursts,
                "after_bursts": self.rss_after_burst_mib,
            },
            "steady_run": self.steady,
            "propagation_ms": {"etcd": ms_list(&self.propagation_etcd), "cloud_mock": ms_list(&self.propagation_cloud)},
            "cold_start_ms": ms_list(&self.cold_start),
            "scale": self.scale,
        });
        (md, json)
    }
}

/// Date, CPU, core count, kernel and commit, for the report's heading.
pub fn machine() -> Value {
    let run = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    json!({
        "date": run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "cpu": cpu,
        "cores": run("nproc", &["--all"]),
        "kernel": run("uname", &["-r"]),
        "commit": run("git", &["rev-parse", "--short", "HEAD"]),
    })
}
