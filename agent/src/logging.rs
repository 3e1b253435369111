//! Tracing setup: human-readable by default, JSON on request; `RUST_LOG` overrides
//! `observability.log_level`. Every line is written with its control characters
//! escaped, so a value carrying a line break (a model name in a request, a header) cannot
//! forge a log line.

use std::io::{self, Write};

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, ObservabilitySection};

pub fn init(o: &ObservabilitySection) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&o.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Escaping(io::stderr()));
    // A subscriber may already be set (tests running in-process): keep that one.
    let _ = match o.log_format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Writes each log line (one `write` per event) with every control character but the
/// line's own end and tabs escaped: `\n` as `\\n`, `\r` as `\\r`, others as `\\xNN`.
pub struct Escaping<W>(pub W);

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let clean = |b: &u8| !b.is_ascii_control() || *b == b'\t';
        if body.iter().all(clean) {
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
