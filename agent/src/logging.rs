//! Tracing setup: human-readable by default, JSON on request; `RUST_LOG` overrides
//! `observability.log_level`. Every line is written with its control characters
//! escaped, so a value carrying a line break (a model name in a request, a header) cannot
//! forge a log line. JSON lines carry `observability.service_name` as `service`.

use std::io::{self, Write};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, ObservabilitySection};

mod text;

/// Lines wait at most this long to be written: one `write` carries every line of
/// the interval (an access-log line per request would otherwise cost a system call).
const FLUSH_AFTER: Duration = Duration::from_millis(10);
/// A batch this large is written at once, by the thread that filled it.
const MAX_BATCH: usize = 64 * 1024;

/// Lines not yet written to standard error, and what wakes the flushing thread.
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static WAKE: Condvar = Condvar::new();

/// Standard error, in batches: a line is copied into [`PENDING`]; the first line
/// of a batch wakes the flushing thread, which writes the batch [`FLUSH_AFTER`]
/// later. Idle, nothing runs. [`flush`] writes what is pending (at exit).
struct Batched;

impl Write for Batched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.is_empty() {
            WAKE.notify_one();
        }
        pending.extend_from_slice(buf);
        if pending.len() >= MAX_BATCH {
            write_out(&mut pending);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the batch while holding its lock, so lines keep their order.
fn write_out(pending: &mut Vec<u8>) {
    // Nowhere to report a failed write of the log itself.
    let _ = io::stderr().write_all(pending);
    pending.clear();
    if pending.capacity() > MAX_BATCH {
        pending.shrink_to(MAX_BATCH);
    }
}

/// Writes every pending log line now: before exiting, and before printing to
/// standard error directly.
pub fn flush() {
    write_out(&mut PENDING.lock().unwrap_or_else(PoisonError::into_inner));
}

fn start_flushing() {
    let spawned = std::thread::Builder::new()
        .name("aisix-log".to_owned())
        .spawn(|| {
            loop {
                {
                    let pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
                    let _woken = WAKE
                        .wait_while(pending, |p| p.is_empty())
                        .unwrap_or_else(PoisonError::into_inner);
                }
                std::thread::sleep(FLUSH_AFTER);
                flush();
            }
        });
    if spawned.is_err() {
        eprintln!("aisix-agent: cannot start the log thread; log lines wait for exit");
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        default(info);
    }));
}

pub fn init(o: &ObservabilitySection) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&o.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A subscriber may already be set (tests running in-process): keep that one.
    let set = match o.log_format {
        LogFormat::Text => builder
            .with_ansi(false)
            .event_format(text::Text::default())
            .with_writer(|| Escaping(Batched))
            .try_init(),
        LogFormat::Json => {
            let service: &'static str = Box::leak(service_field(&o.service_name).into_boxed_str());
            builder
                .with_writer(move || Escaping(WithService(service, Batched)))
                .json()
                .try_init()
        }
    };
    if set.is_ok() {
        start_flushing();
    }
}

/// `"service":"<name>",` (JSON-escaped), put first in every JSON line.
fn service_field(name: &str) -> String {
    format!("\"service\":{},", serde_json::Value::from(name))
}

/// Writes each JSON log line (one `write` per event) with the service field first.
struct WithService<W>(&'static str, W);

impl<W: Write> Write for WithService<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match buf.strip_prefix(b"{") {
            Some(rest) => {
                let mut line = Vec::with_capacity(buf.len() + self.0.len());
                line.push(b'{');
                line.extend_from_slice(self.0.as_bytes());
                line.extend_from_slice(rest);
                self.1.write_all(&line)?;
            }
            None => self.1.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.1.flush()
    }
}

/// Writes each log line (one `write` per event) with every control character but the
/// line's own end and tabs escaped: `\n` as `\\n`, `\r` as `\\r`, others as `\\xNN`.
pub struct Escaping<W>(pub W);

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let clean = |b: &u8| !b.is_ascii_control() || *b == b'\t';
        // Every byte looked at, without stopping early, so the check runs on
        // whole vectors: nearly every line is clean.
        let dirty = body.iter().fold(false, |dirty, b| dirty | !clean(b));
        if !dirty {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b if clean(&b) => out.push(b),
                b => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            }
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(line: &[u8]) -> String {
        let mut out = Escaping(Vec::new());
        out.write_all(line).unwrap_or_default();
        String::from_utf8(out.0).unwrap_or_default()
    }

    #[test]
    fn json_lines_carry_the_service_name_first() {
        let mut out = WithService("\"service\":\"orders \\\"gw\\\"\",", Vec::new());
        out.write_all(b"{\"level\":\"INFO\"}\n").unwrap_or_default();
        let line = String::from_utf8(out.1).unwrap_or_default();
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(parsed["service"], "orders \"gw\"");
        assert_eq!(parsed["level"], "INFO");
        assert_eq!(service_field("a\"b"), "\"service\":\"a\\\"b\",");
    }

    #[test]
    fn a_value_with_a_line_break_stays_on_its_line() {
        assert_eq!(
            escaped(b"WARN model 'x\n2026-01-01 INFO forged' not found\n"),
            "WARN model 'x\\n2026-01-01 INFO forged' not found\n"
        );
        assert_eq!(escaped(b"a\r\x1b[31mred\tb\n"), "a\\r\\x1b[31mred\tb\n");
        assert_eq!(escaped("caf\u{e9} plain\n".as_bytes()), "caf\u{e9} plain\n");
        assert_eq!(escaped(b"no end"), "no end");
    }
}
