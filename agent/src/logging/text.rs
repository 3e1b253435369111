//! The text log line. The access line, written once per request, is formatted here
//! directly: byte for byte what tracing-subscriber's `Full` format writes without
//! colours, at a fraction of its cost (that format paints every field name, even
//! with colours off, and goes through `core::fmt` for every piece). Every other
//! event, and the access line whenever it would look different (inside a span, with
//! colours), goes to tracing-subscriber's own formatter.

use std::fmt::{self, Write as _};

use proxy_core::observe::record::ACCESS_TARGET;
use time::OffsetDateTime;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::SystemTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Default)]
pub(super) struct Text(Format<Full, SystemTime>);

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let plain = meta.target() == ACCESS_TARGET
            && !writer.has_ansi_escapes()
            && ctx.event_scope().is_none();
        let Some(stamp) = plain
            .then(|| timestamp(OffsetDateTime::now_utc()))
            .flatten()
        else {
            return self.0.format_event(ctx, writer, event);
        };
        writer.write_str(stamp.as_str())?;
        writer.write_str(level(meta.level()))?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = Fields {
            sanitize: writer.sanitizes_ansi_escapes(),
            out: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// `Full`'s level column: five wide, then the space before the target.
fn level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE ",
        Level::DEBUG => "DEBUG ",
        Level::INFO => " INFO ",
        Level::WARN => " WARN ",
        Level::ERROR => "ERROR ",
    }
}

/// `2026-12-04T01:53:33.123456Z `, as `Full` writes it; `None` for a year it
/// writes another way (before 0 or after 9999).
struct Stamp([u8; 28]);

impl Stamp {
    fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or("<unknown time> ")
    }
}

fn timestamp(now: OffsetDateTime) -> Option<Stamp> {
    let year = u32::try_from(now.year()).ok().filter(|y| *y <= 9999)?;
    let (hour, minute, second, micros) = now.to_hms_micro();
    let mut out = *b"0000-00-00T00:00:00.000000Z ";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, u8::from(now.month()).into());
    put(8, 2, now.day().into());
    put(11, 2, hour.into());
    put(14, 2, minute.into());
    put(17, 2, second.into());
    put(20, 6, micros);
    Some(Stamp(out))
}

/// Writes an event's fields as `DefaultFields` does without colours: `name=value`
/// separated by spaces, the message without its name, `r#` taken off raw names.
struct Fields<'w, 'a> {
    out: &'w mut Writer<'a>,
    sanitize: bool,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn pad(&mut self) -> fmt::Result {
        if self.first {
            self.first = false;
            Ok(())
        } else {
            self.out.write_char(' ')
        }
    }

    fn name(&mut self, field: &Field) -> fmt::Result {
        self.pad()?;
        let name = field.name();
        self.out
            .write_str(name.strip_prefix("r#").unwrap_or(name))?;
        self.out.write_char('=')
    }

    fn message(&mut self, value: &dyn fmt::Debug) -> fmt::Result {
        self.pad()?;
        if self.sanitize {
            write!(Sanitized(self.out), "{value:?}")
        } else {
            write!(self.out, "{value:?}")
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = if field.name() == "message" {
                self.message(value)
            } else {
                self.name(field)
                    .and_then(|()| write!(self.out, "{value:?}"))
            };
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.record_debug(field, &format_args!("{value}"));
        }
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| {
                // What `{:?}` writes for a string that needs no escape, without it.
                let plain = |b: u8| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\';
                if value.bytes().all(plain) {
                    self.out.write_char('"')?;
                    self.out.write_str(value)?;
                    self.out.write_char('"')
                } else {
                    write!(self.out, "{value:?}")
                }
            });
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() {
            self.result = self
                .name(field)
                .and_then(|()| self.out.write_str(itoa::Buffer::new().format(value)));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_ok() {
            self.result = self
                .name(field)
                .and_then(|()| self.out.write_str(itoa::Buffer::new().format(value)));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            self.result = self
                .name(field)
                .and_then(|()| self.out.write_str(if value { "true" } else { "false" }));
        }
    }
}

/// A message as `Full` writes it: terminal escapes and C1 controls spelled out.
/// (The line's writer escapes the other control characters.)
struct Sanitized<'w, 'a>(&'w mut Writer<'a>);

impl fmt::Write for Sanitized<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(|c: char| {
            matches!(
                c,
                '\x07' | '\x08' | '\x0c' | '\x1b' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        }) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            if c.is_ascii() {
                write!(self.0, "\\x{:02x}", u32::from(c))?;
            } else {
                write!(self.0, "\\u{{{:x}}}", u32::from(c))?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing::info;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut lines = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            lines.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    impl Lines {
        fn text(&self) -> String {
            let lines = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&lines).into_owned()
        }
    }

    /// The access lines `emit` writes, through `Full` and through [`Text`], each
    /// with its timestamp.
    fn both(emit: fn()) -> (String, String) {
        let general = Lines::default();
        let fast = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(general.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(Text::default())
            .with_writer(fast.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        (general.text(), fast.text())
    }

    /// The lines without their timestamps (which differ by the time between them).
    fn untimed(lines: &str) -> Vec<&str> {
        lines
            .lines()
            .map(|line| line.split_once(' ').map_or(line, |(_, rest)| rest))
            .collect()
    }

    #[test]
    fn the_access_line_is_what_the_general_format_writes() {
        fn emit() {
            let absent: Option<&str> = None;
            info!(
                target: ACCESS_TARGET,
                request_id = %"req-1",
                method = %http::Method::POST,
                path = "/v1/chat/completions",
                status = 200u16,
                api_key_id = Some("key \"quoted\" \\ back"),
                client_ip = Some(tracing::field::display("10.0.0.1")),
                model = "caf\u{e9} \u{1f600} tab\there line\nbreak",
                served_by = absent,
                error_type = Some("rate_limit"),
                latency_ms = 1.0f64,
                ttft_ms = 0.125f64,
                input_tokens = 12u64,
                output_tokens = 0u64,
                cache_read_tokens = u64::MAX,
                negative = -3i64,
                streamed = true,
                r#type = "raw",
                "request"
            );
            info!(target: ACCESS_TARGET, "bell \x07 esc \x1b[31m c1 \u{85} del \x7f {}", 5);
            info!(target: ACCESS_TARGET, status = 404u16);
            info!(target: "aisix::other", status = 1u16, "not the access line");
        }
        let (general, fast) = both(emit);
        assert_eq!(untimed(&general).len(), 4, "{general}");
        assert_eq!(untimed(&fast), untimed(&general), "{general}\n{fast}");
        assert!(
            fast.contains("api_key_id=\"key \\\"quoted\\\" \\\\ back\""),
            "{fast}"
        );
        assert!(
            fast.contains("esc \\x1b[31m c1 \\u{85} del \\x7f 5"),
            "{fast}"
        );
        assert!(!fast.contains("served_by"), "{fast}");
    }

    #[test]
    fn an_access_line_inside_a_span_names_it_as_the_general_format_does() {
        fn emit() {
            let span = tracing::info_span!("drain", worker = 1u64);
            let _inside = span.enter();
            info!(target: ACCESS_TARGET, status = 200u16, "request");
        }
        let (general, fast) = both(emit);
        assert!(
            general.contains("drain{worker=1}: aisix::access: request status=200"),
            "{general}"
        );
        assert_eq!(untimed(&fast), untimed(&general));
    }

    #[test]
    fn the_timestamp_is_the_general_formats() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_764_813_213_004_567_891)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let stamp = timestamp(at).map(|s| s.as_str().to_owned());
        assert_eq!(stamp.as_deref(), Some("2025-12-04T01:53:33.004567Z "));
        let far = OffsetDateTime::UNIX_EPOCH.replace_year(-1).ok();
        assert!(far.and_then(timestamp).is_none());
    }
}
