//! Process logging: a `tracing` subscriber writing to stderr, with a filter
//! that can be changed while running (the admin port's `/logging`).
//!
//! Contract:
//! - [`init`] installs the global subscriber once and returns a [`LogHandle`];
//!   `RUST_LOG`, when set and valid, overrides the `default` directives.
//! - [`LogHandle::set`] replaces the whole `EnvFilter` (directives like
//!   `info,proxy=debug`); invalid directives are refused with the parser's
//!   reason and the old filter stays.
//! - Text output (ANSI colours only on a terminal) or, with `json`, one JSON
//!   object per line: `timestamp`, `level`, `target`, the event's fields
//!   (`message` among them) and `spans` (root first, each `name` + `fields`
//!   as text).
//!
//! Non-goals: log files and rotation (stderr is collected by whatever runs
//! the proxy), OTLP log export, per-span filters beyond what `EnvFilter` does.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Changes the log filter at runtime. Cheap to clone.
#[derive(Clone)]
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
}

/// A subscriber built by [`build`], not yet installed.
pub type BoxedSubscriber = Box<dyn Subscriber + Send + Sync + 'static>;

/// Event formatter for `json` output.
struct JsonLines;

/// Collects an event's fields into a JSON object.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

/// Installs the global subscriber (stderr) and returns the handle that
/// changes its filter. `default` is used unless `RUST_LOG` holds valid
/// directives; an invalid `default` falls back to `info` with a warning. If a
/// global subscriber is already installed (tests), the returned handle works
/// but filters nothing that is printed.
pub fn init(default: &str, json: bool) -> LogHandle {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut problems = Vec::new();
    let mut built = None;
    for directives in from_env.iter().map(String::as_str).chain([default, "info"]) {
        match build(directives, json) {
            Ok(b) => {
                built = Some(b);
                break;
            }
            Err(e) => problems.push(format!("ignoring log filter {directives:?}: {e}")),
        }
    }
    let (subscriber, handle) = match built {
        Some(b) => b,
        // "info" always parses; this arm only keeps the code panic-free.
        None => {
            let (layer, reload) = reload::Layer::new(EnvFilter::default());
            let subscriber: BoxedSubscriber = Box::new(Registry::default().with(layer));
            (subscriber, LogHandle { reload })
        }
    };
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        problems.push("a global tracing subscriber was already installed".to_owned());
    }
    for problem in problems {
        tracing::warn!("{problem}");
    }
    handle
}

/// Builds the subscriber without installing it (tests, or callers that
/// install it themselves). Errors if `directives` do not parse.
pub fn build(directives: &str, json: bool) -> Result<(BoxedSubscriber, LogHandle), String> {
    let filter = parse(directives)?;
    let (filter, reload) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let output = if json {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(JsonLines)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed()
    };
    let subscriber = Registry::default().with(filter).with(output);
    Ok((Box::new(subscriber), LogHandle { reload }))
}

impl LogHandle {
    /// Replaces the filter with `directives` (e.g. `info,proxy::admin=debug`).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = parse(directives)?;
        self.reload
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        tracing::info!(filter = %self.current(), "log filter changed");
        Ok(())
    }

    /// Sets one level for everything: `trace`, `debug`, `info`, `warn`,
    /// `error` or `off`.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let level = level.trim().to_ascii_lowercase();
        match level.as_str() {
            "trace" | "debug" | "info" | "warn" | "error" | "off" => self.set(&level),
            _ => Err(format!(
                "unknown level {level:?}: expected trace, debug, info, warn, error or off"
            )),
        }
    }

    /// The filter in effect, as directives.
    pub fn current(&self) -> String {
        self.reload
            .with_current(|f| f.to_string())
            .unwrap_or_else(|e| format!("<unavailable: {e}>"))
    }
}

impl fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogHandle")
            .field("current", &self.current())
            .finish()
    }
}

fn parse(directives: &str) -> Result<EnvFilter, String> {
    let directives = directives.trim();
    if directives.is_empty() {
        return Err("empty log filter: give directives like `info` or `info,proxy=debug`".into());
    }
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| format!("invalid log filter {directives:?}: {e}"))
}

impl<S, N> FormatEvent<S, N> for JsonLines
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
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(crate::accesslog::rfc3339(std::time::SystemTime::now())),
        );
        line.insert("level".into(), Value::String(meta.level().as_str().into()));
        line.insert("target".into(), Value::String(meta.target().into()));
        event.record(&mut JsonVisitor(&mut line));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let mut obj = Map::new();
                    obj.insert("name".into(), Value::String(span.name().into()));
                    let ext = span.extensions();
                    if let Some(fields) = ext.get::<FormattedFields<N>>() {
                        if !fields.is_empty() {
                            obj.insert("fields".into(), Value::String(fields.fields.clone()));
                        }
                    }
                    Value::Object(obj)
                })
                .collect();
            if !spans.is_empty() {
                line.insert("spans".into(), Value::Array(spans));
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, v);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn set_changes_the_filter_and_refuses_garbage() {
        let (subscriber, handle) = build("info", false).unwrap();
        assert_eq!(handle.current(), "info");

        handle.set("proxy=debug,warn").unwrap();
        let current = handle.current();
        assert!(current.contains("proxy=debug"), "{current}");
        assert!(current.contains("warn"), "{current}");

        let err = handle.set("proxy=loud").unwrap_err();
        assert!(err.contains("invalid log filter"), "{err}");
        let err = handle.set("  ").unwrap_err();
        assert!(err.contains("empty"), "{err}");
        // A refused filter leaves the old one in place.
        assert!(handle.current().contains("proxy=debug"));

        handle.set_level("DEBUG").unwrap();
        assert_eq!(handle.current(), "debug");
        let err = handle.set_level("verbose").unwrap_err();
        assert!(err.contains("unknown level"), "{err}");
        drop(subscriber);
    }

    #[test]
    fn filter_applies_to_events() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        // Count the events that pass the reloadable filter.
        struct Count(Arc<AtomicUsize>);
        impl<S: Subscriber> Layer<S> for Count {
            fn on_event(&self, _: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let seen = Arc::new(AtomicUsize::new(0));
        let filter = parse("warn").unwrap();
        let (filter, reload) = reload::Layer::new(filter);
        let handle = LogHandle { reload };
        let subscriber = Registry::default()
            .with(filter)
            .with(Count(Arc::clone(&seen)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("hidden");
            assert_eq!(seen.load(Ordering::SeqCst), 0);
            handle.set_level("info").unwrap();
            tracing::info!("shown");
            assert_eq!(
                seen.load(Ordering::SeqCst),
                2,
                "the change itself is logged too"
            );
        });
    }

    #[test]
    fn json_lines_are_json() {
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = Registry::default().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .event_format(JsonLines),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", peer = "10.0.0.1:5");
            let _g = span.enter();
            tracing::warn!(code = 503u64, ok = false, "upstream \"failed\"");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["message"], "upstream \"failed\"");
        assert_eq!(line["code"], 503);
        assert_eq!(line["ok"], false);
        assert_eq!(line["spans"][0]["name"], "conn");
        assert!(line["spans"][0]["fields"]
            .as_str()
            .unwrap()
            .contains("10.0.0.1:5"));
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
