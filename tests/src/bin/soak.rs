//! Soak test (not in the default suite; `bash scripts/soak [MINUTES] [FRACTION]`): the
//! agent in managed mode against `cloud-mock serve` (its control plane and console) and
//! `cloud-mock provider` (the mock provider, in a process of its own) for MINUTES
//! (default 10) at FRACTION (default 0.5; 0.9 for 90 %) of the measured saturation,
//! with a console write every second and a control-plane flap (connections refused and
//! watches cut for 10 s) every minute. Prints errors by cause, the agent's resident
//! memory over time and, per 10 s, the slowest call through the gateway and the
//! slowest answer of the mock provider asked directly (so a pile-up can be placed);
//! fails when the gateway answered anything but 200, its memory kept growing (the
//! last third's peak more than 10 % + 2 MiB over the middle third's) or the rate was
//! not held (a call not sent because 1,024 were in flight: the run was at saturation,
//! not at FRACTION of it). Saturation is what the soak's own open loop carries, beside
//! the same side load, when offered the rate 64 closed-loop callers reach in 10 s.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test tool: a failure should stop it loudly"
)]

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tests::cloud::CloudMockProcess;
use tests::{Process, addr_in, binary, key_hash};
use tokio::sync::{Mutex, Semaphore};

const CALLER: &str = "soak-caller-key";
const ENV: &str = "demo";
/// The cause counted for a call the open loop could not send: the run was at saturation.
const NOT_SENT: &str = "call not sent: 1024 already in flight (answers slower than 1024 / rate)";

type Errors = Arc<Mutex<BTreeMap<String, u64>>>;

#[tokio::main]
async fn main() -> ExitCode {
    let minutes: u64 = std::env::args()
        .nth(1)
        .map_or(10, |m| m.parse().expect("MINUTES is a whole number"));
    let fraction: f64 = std::env::args().nth(2).map_or(0.5, |f| {
        f.parse()
            .ok()
            .filter(|f| (0.01..=1.0).contains(f))
            .expect("FRACTION is a number from 0.01 to 1")
    });
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudMockProcess::start(&dir.path().join("cloud-mock"), None).await;
    // The mock provider in a process of its own: the control plane takes an outage's
    // usage backlog on its runtime, which slowed a provider beside it (the gateway's
    // calls and the direct probes alike).
    let (_provider, provider_url) = tests::cloud::start_provider().await;
    let resources = format!("/console/v1/environments/{ENV}/resources");
    cloud
        .console
        .ok(
            "PUT",
            &format!("{resources}/provider_keys/pk"),
            Some(json!({"display_name": "mock", "provider": "openai", "api_base": format!("{}/v1", provider_url), "api_key": "sk-soak"})),
        )
        .await;
    cloud
        .console
        .ok(
            "PUT",
            &format!("{resources}/models/gpt"),
            Some(json!({"display_name": "gpt", "model_name": "up-gpt", "provider_key_id": "pk"})),
        )
        .await;
    cloud
        .console
        .ok(
            "PUT",
            &format!("{resources}/api_keys/k"),
            Some(json!({"display_name": "soak", "key_hash": key_hash(CALLER), "allowed_models": ["*"]})),
        )
        .await;
    let config = dir.path().join("agent.yaml");
    let bundle = &cloud.bundle_dir;
    std::fs::write(
        &config,
        format!(
            "managed:\n  enabled: true\n  cp_base_url: {}\n  cp_cert_file: {}\n  cp_key_file: {}\n  cp_ca_file: {}\n  state_dir: {}\n  heartbeat_interval_secs: 5\n  connect_timeout_ms: 1000\nproxy:\n  addr: 127.0.0.1:0\nobservability:\n  access_log: false\nshutdown:\n  min_drain_secs: 0\n",
            cloud.dp_url,
            bundle.join("cert.pem").display(),
            bundle.join("key.pem").display(),
            bundle.join("ca.pem").display(),
            dir.path().join("agent-state").display()
        ),
    )
    .unwrap();
    let mut agent = Process::start(
        &binary("aisix-agent"),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let line = agent
        .wait_for_line("proxy listener ready", Duration::from_secs(30))
        .await;
    let url = format!("http://{}/v1/chat/completions", addr_in(&line));
    let http = tests::http_client();
    // The slowest answer in each 10 s window, through the gateway and from the mock
    // provider directly (probed 20 times a second): says who was slow when calls pile up.
    let slowest = Arc::new(AtomicU64::new(0));
    let provider_slowest = Arc::new(AtomicU64::new(0));
    let call = {
        let (http, url, slowest) = (http.clone(), url.clone(), slowest.clone());
        move || {
            let (http, url, slowest) = (http.clone(), url.clone(), slowest.clone());
            async move {
                let _timer = Slowest::start(&slowest);
                match http
                    .post(url)
                    .bearer_auth(CALLER)
                    .timeout(Duration::from_secs(30))
                    .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => None,
                        Err(e) => Some(format!("body: {e}")),
                    },
                    Ok(r) => Some(format!("status {}", r.status().as_u16())),
                    Err(e) => Some(format!("transport: {e}")),
                }
            }
        }
    };
    let errors: Errors = Arc::default();
    let probe = {
        let (http, slowest, errors) = (http.clone(), provider_slowest.clone(), errors.clone());
        let url = format!("{}/v1/chat/completions", provider_url);
        move || {
            let (http, url, slowest, errors) =
                (http.clone(), url.clone(), slowest.clone(), errors.clone());
            async move {
                let timer = Slowest::start(&slowest);
                let answer = http
                    .post(url)
                    .bearer_auth("sk-soak")
                    .timeout(Duration::from_secs(30))
                    .json(&json!({"model": "up-gpt", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await;
                let ok = match answer {
                    Ok(answer) if answer.status() == 200 => answer.bytes().await.is_ok(),
                    _ => false,
                };
                drop(timer);
                if !ok {
                    *errors
                        .lock()
                        .await
                        .entry("mock provider probe failed (not the gateway)".into())
                        .or_default() += 1;
                }
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while call().await.is_some() {
        assert!(Instant::now() < deadline, "the agent never served gpt");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Saturation: 64 callers in a closed loop for 10 s.
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(10);
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (call, done) = (call.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    if call().await.is_none() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let closed = done.load(Ordering::Relaxed) as f64 / 10.0;
    // A closed loop of 64 callers carries more than the soak's own load can: an open
    // loop (a task per call, up to 1024 in flight) beside the mock probes and a
    // console write every second. Saturation is what that load carries when offered
    // the closed loop's rate for 20 s.
    let calibrated = Instant::now() + Duration::from_secs(20);
    let (calibration_errors, carried): (Errors, _) = (Arc::default(), Arc::new(AtomicU64::new(0)));
    let calibration = open_loop(
        closed,
        calibrated,
        call.clone(),
        calibration_errors,
        carried.clone(),
    );
    let calibration_side = side_load(calibrated, probe.clone(), cloud.console.clone(), None);
    tokio::time::sleep_until(calibrated.into()).await;
    let saturation = carried.load(Ordering::Relaxed) as f64 / 20.0;
    calibration.await.unwrap();
    calibration_side.await.unwrap();
    let rate = (saturation * fraction).max(1.0);
    println!(
        "closed loop {closed:.0} req/s; open loop offered that carried {saturation:.0} req/s (the saturation); soaking {minutes} min at {rate:.0} req/s ({:.0} %)",
        fraction * 100.0
    );

    slowest.store(0, Ordering::Relaxed);
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(minutes * 60);
    let churn = side_load(stop, probe, cloud.console.clone(), Some(errors.clone()));
    let load = open_loop(rate, stop, call, errors.clone(), ok.clone());
    // Resident memory and the slowest answers every 10 s.
    let pid = agent.pid();
    let mut rss = Vec::new();
    let started = Instant::now();
    println!(
        "{:>6}  {:>9}  {:>10}  {:>7}  {:>17}  {:>18}",
        "t (s)", "RSS (MiB)", "ok", "errors", "slowest call (ms)", "slowest mock (ms)"
    );
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or_else(|| panic!("the agent is gone:\n{}", agent.output()));
        rss.push(kib);
        let failed: u64 = errors.lock().await.values().sum();
        println!(
            "{:>6}  {:>9.1}  {:>10}  {:>7}  {:>17.1}  {:>18.1}",
            started.elapsed().as_secs(),
            kib as f64 / 1024.0,
            ok.load(Ordering::Relaxed),
            failed,
            slowest.swap(0, Ordering::Relaxed) as f64 / 1000.0,
            provider_slowest.swap(0, Ordering::Relaxed) as f64 / 1000.0,
        );
    }
    load.await.unwrap();
    churn.await.unwrap();
    let errors = errors.lock().await.clone();
    println!("\nerrors by cause:");
    if errors.is_empty() {
        println!("  none");
    }
    for (cause, n) in &errors {
        println!("  {n:>8}  {cause}");
    }
    let gateway: u64 = errors
        .iter()
        .filter(|(c, _)| c.starts_with("gateway:"))
        .map(|(_, n)| n)
        .sum();
    let third = rss.len() / 3;
    let peak = |s: &[u64]| s.iter().copied().max().unwrap_or(0);
    let (middle, last) = (peak(&rss[third..2 * third]), peak(&rss[2 * third..]));
    let grows = last > middle + middle / 10 + 2048;
    println!(
        "\nserved {} at {rate:.0} req/s; gateway errors {gateway}; RSS peak middle third {:.1} MiB, last third {:.1} MiB{}",
        ok.load(Ordering::Relaxed),
        middle as f64 / 1024.0,
        last as f64 / 1024.0,
        if grows {
            " (still growing)"
        } else {
            " (plateau)"
        }
    );
    let not_sent = errors
        .iter()
        .filter(|(c, _)| c.as_str() == NOT_SENT)
        .map(|(_, n)| n)
        .sum::<u64>();
    if not_sent > 0 {
        println!(
            "the soak did not hold its rate ({not_sent} calls not sent): it ran at saturation, not at {:.0} % of it",
            fraction * 100.0
        );
    }
    if gateway > 0 || grows || not_sent > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Calls `call` at `rate` a second until `stop` (open loop, at most 1024 in flight),
/// counting answers in `ok` and failures by cause in `errors`; ends when every call
/// has ended.
fn open_loop<C, F>(
    rate: f64,
    stop: Instant,
    call: C,
    errors: Errors,
    ok: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()>
where
    C: Fn() -> F + Send + Sync + Clone + 'static,
    F: std::future::Future<Output = Option<String>> + Send + 'static,
{
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(1024));
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while Instant::now() < stop {
            ticker.tick().await;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                *errors.lock().await.entry(NOT_SENT.into()).or_default() += 1;
                continue;
            };
            let (call, errors, ok) = (call.clone(), errors.clone(), ok.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match call().await {
                    None => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(cause) => {
                        *errors
                            .lock()
                            .await
                            .entry(format!("gateway: {cause}"))
                            .or_default() += 1;
                    }
                }
            });
        }
        let _ = slots.acquire_many(1024).await;
    })
}

/// Until `stop`: the mock provider probed 20 times a second, a console write every
/// second and, when `errors` are kept (the soak itself), a control-plane flap
/// (connections refused and watches cut for 10 s) every minute.
fn side_load<P, F>(
    stop: Instant,
    probe: P,
    console: tests::cloud::Console,
    errors: Option<Errors>,
) -> tokio::task::JoinHandle<()>
where
    P: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let prober = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(50));
        while Instant::now() < stop {
            ticker.tick().await;
            tokio::spawn(probe());
        }
    });
    tokio::spawn(async move {
        let mut n = 0u64;
        while Instant::now() < stop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            n += 1;
            let path = format!(
                "/console/v1/environments/{ENV}/resources/models/churn-{}",
                n % 50
            );
            let body = json!({"display_name": format!("churn-{}", n % 50), "model_name": format!("up-{n}"), "provider_key_id": "pk"});
            let written = console.call("PUT", &path, Some(body)).await.0 == 200;
            let Some(errors) = &errors else { continue };
            if !written {
                *errors
                    .lock()
                    .await
                    .entry("console write (not the gateway)".into())
                    .or_default() += 1;
            }
            if n % 60 == 30 {
                console
                    .call(
                        "PUT",
                        "/console/v1/faults",
                        Some(json!({"refuse_connections": true})),
                    )
                    .await;
                console
                    .call("POST", "/console/v1/faults/cut-watches", None)
                    .await;
            } else if n % 60 == 40 {
                console
                    .call("PUT", "/console/v1/faults", Some(json!({})))
                    .await;
            }
        }
        prober.await.unwrap();
    })
}

/// Raises `slowest` (µs) to this call's duration when dropped.
struct Slowest<'a> {
    slowest: &'a AtomicU64,
    started: Instant,
}

impl<'a> Slowest<'a> {
    fn start(slowest: &'a AtomicU64) -> Self {
        Self {
            slowest,
            started: Instant::now(),
        }
    }
}

impl Drop for Slowest<'_> {
    fn drop(&mut self) {
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.slowest.fetch_max(micros, Ordering::Relaxed);
    }
}
