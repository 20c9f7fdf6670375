//! Metrics as bytes and arithmetic: the Prometheus text exposition format that both
//! servers' `/metrics` endpoints answer with, the HTTP/1.1 exchange of a scrape, and the
//! sliding-window rate behind every throughput figure. No sockets here: the binaries
//! read the request bytes, call [`route`], and write what [`response`] returns.
//!
//! # Text exposition format (version 0.0.4)
//!
//! One family per metric name: a `# HELP` line, a `# TYPE` line, then its samples, all
//! together (the format forbids spreading a family's samples out; [`Family`] makes that
//! structural). A sample is `name{label="value",...} value`.
//!
//! | where         | escaped                                      |
//! |---------------|----------------------------------------------|
//! | `# HELP` text | `\` as `\\`, newline as `\n`                 |
//! | label value   | `\` as `\\`, `"` as `\"`, newline as `\n`    |
//! | sample value  | integers as digits; floats as Rust prints them, `NaN`, `+Inf`, `-Inf` |
//!
//! Metric names match `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names `[a-zA-Z_][a-zA-Z0-9_]*`;
//! both come from the program, never from input, and are checked in debug builds.
//!
//! # A scrape over HTTP/1.1
//!
//! The request head (request line and headers, up to the empty line) is read up to
//! [`REQUEST_HEAD_BYTES_MAX`] bytes; a body is never read. `GET /metrics` (or `HEAD`,
//! query string ignored) is answered 200 with the exposition; another path 404; another
//! method 405; anything that is not an HTTP/1.x request head, is truncated, or is
//! longer than the bound gets 400 with the reason. Every response has a
//! `Content-Length` and `Connection: close`: one request per connection.

use std::collections::VecDeque;
use std::fmt::Write as _;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The path the exposition is served at.
pub const METRICS_PATH: &str = "/metrics";
/// Bound on a request head; a longer one is refused (400) without reading further.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8192;

/// The kind of a metric family (`# TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    /// Only rises (restarts from zero when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl MetricType {
    fn name(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
        }
    }
}

/// A sample's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SampleValue {
    Int(u64),
    Float(f64),
}

impl From<u64> for SampleValue {
    fn from(v: u64) -> Self {
        SampleValue::Int(v)
    }
}

impl From<f64> for SampleValue {
    fn from(v: f64) -> Self {
        SampleValue::Float(v)
    }
}

impl From<bool> for SampleValue {
    fn from(v: bool) -> Self {
        SampleValue::Int(u64::from(v))
    }
}

/// Builds one exposition, family after family.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

/// One family being written: its samples follow its `# HELP` and `# TYPE` lines.
#[derive(Debug)]
pub struct Family<'a> {
    text: &'a mut String,
    name: &'static str,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the family `name`: writes its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &'static str, kind: MetricType, help: &str) -> Family<'_> {
        debug_assert!(valid_metric_name(name), "metric name {name:?}");
        let _ = writeln!(
            self.text,
            "# HELP {name} {}\n# TYPE {name} {}",
            escape_help(help),
            kind.name()
        );
        Family {
            text: &mut self.text,
            name,
        }
    }

    /// The whole exposition text.
    pub fn finish(self) -> String {
        self.text
    }
}

impl Family<'_> {
    /// Writes one sample of the family.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<SampleValue>) -> &mut Self {
        self.text.push_str(self.name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_label_name(k), "label name {k:?}");
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape_label_value_into(v, self.text);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        match value.into() {
            SampleValue::Int(v) => {
                let _ = write!(self.text, "{v}");
            }
            SampleValue::Float(v) if v.is_nan() => self.text.push_str("NaN"),
            SampleValue::Float(v) if v.is_infinite() => {
                self.text.push_str(if v > 0.0 { "+Inf" } else { "-Inf" })
            }
            SampleValue::Float(v) => {
                let _ = write!(self.text, "{v}");
            }
        }
        self.text.push('\n');
        self
    }
}

/// Whether `s` is a valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// Whether `s` is a valid label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn valid_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `# HELP` text with `\` and newlines escaped.
pub fn escape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_label_value_into(s, &mut out);
    out
}

fn escape_label_value_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// What a request head asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (`head_only` for `HEAD`): 200 with the exposition.
    Metrics { head_only: bool },
    /// A well-formed request for another path: 404.
    NotFound { head_only: bool },
    /// A well-formed request with another method: 405.
    MethodNotAllowed,
    /// Not an HTTP/1.x request head, truncated, or over the bound: 400, with the reason.
    Bad(String),
}

/// Decides what the request in `buf` (the bytes read so far) asks for; `None` while the
/// head is incomplete and more bytes may come. `eof`: the peer sent everything it will.
pub fn route(buf: &[u8], eof: bool) -> Option<Route> {
    let end = match find_head_end(buf) {
        Some(end) => end,
        None if buf.len() >= REQUEST_HEAD_BYTES_MAX => {
            return Some(Route::Bad(format!(
                "request head over {REQUEST_HEAD_BYTES_MAX} bytes"
            )));
        }
        None if eof => {
            return Some(Route::Bad(format!(
                "truncated request head: the connection ended after {} bytes without an empty line",
                buf.len()
            )));
        }
        None => return None,
    };
    if end > REQUEST_HEAD_BYTES_MAX {
        return Some(Route::Bad(format!(
            "request head over {REQUEST_HEAD_BYTES_MAX} bytes"
        )));
    }
    Some(parse_head(&buf[..end]).unwrap_or_else(Route::Bad))
}

/// The end of the head (after its empty line), `\r\n\r\n` or a bare `\n\n`.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

fn parse_head(head: &[u8]) -> Result<Route, String> {
    let head = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "request line {:?} is not `METHOD TARGET HTTP/1.x`",
            shorten(request_line)
        ));
    };
    if method.is_empty() || !method.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err(format!("method {:?} is not a token", shorten(method)));
    }
    if !target.starts_with('/') || target.bytes().any(|c| c.is_ascii_control()) {
        return Err(format!(
            "request target {:?} is not an absolute path",
            shorten(target)
        ));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(format!(
            "version {:?} is not HTTP/1.0 or HTTP/1.1",
            shorten(version)
        ));
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, _)) = line.split_once(':') else {
            return Err(format!("header line {:?} has no colon", shorten(line)));
        };
        if name.is_empty() || name.bytes().any(|c| c <= b' ' || c == 0x7f) {
            return Err(format!("header name {:?} is not a token", shorten(name)));
        }
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let head_only = method == "HEAD";
    Ok(match method {
        "GET" | "HEAD" if path == METRICS_PATH => Route::Metrics { head_only },
        "GET" | "HEAD" => Route::NotFound { head_only },
        _ => Route::MethodNotAllowed,
    })
}

/// At most 64 characters of `s`, for messages.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A whole HTTP/1.1 response with `Content-Length` and `Connection: close`; the body is
/// left out for a `HEAD` request (`head_only`) but still measured.
pub fn response(status: u16, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// The response to a route; `exposition` is called only for [`Route::Metrics`].
pub fn answer(route: &Route, exposition: impl FnOnce() -> Result<String, String>) -> Vec<u8> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match route {
        Route::Metrics { head_only } => match exposition() {
            Ok(body) => response(200, CONTENT_TYPE, &body, *head_only),
            Err(e) => response(500, TEXT, &format!("{e}\n"), *head_only),
        },
        Route::NotFound { head_only } => response(
            404,
            TEXT,
            &format!("not found: the metrics are at {METRICS_PATH}\n"),
            *head_only,
        ),
        Route::MethodNotAllowed => response(405, TEXT, "only GET and HEAD\n", false),
        Route::Bad(why) => response(400, TEXT, &format!("bad request: {why}\n"), false),
    }
}

/// A rate over a sliding window of samples of a rising total (a counter), taken at a
/// regular interval: (newest total - oldest total) / time between them. Holds at most
/// `samples_max` samples, so a window of N seconds at one sample a second takes N + 1.
#[derive(Clone, Debug)]
pub struct RateWindow {
    /// (monotonic time in ms, total), oldest first.
    samples: VecDeque<(u64, u64)>,
    samples_max: usize,
}

impl RateWindow {
    /// A window of at most `samples_max` samples (at least 2).
    pub fn new(samples_max: usize) -> Self {
        let samples_max = samples_max.max(2);
        Self {
            samples: VecDeque::with_capacity(samples_max),
            samples_max,
        }
    }

    /// Adds the total at monotonic time `at_ms`. A time that does not advance past the
    /// newest sample, or a total below it (the counter was reset), restarts the window.
    pub fn push(&mut self, at_ms: u64, total: u64) {
        if let Some(&(t, v)) = self.samples.back()
            && (at_ms <= t || total < v)
        {
            self.samples.clear();
        }
        if self.samples.len() == self.samples_max {
            self.samples.pop_front();
        }
        self.samples.push_back((at_ms, total));
    }

    /// Units per second over the window; 0 with fewer than two samples.
    pub fn per_second(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, v0)), Some(&(t1, v1))) if t1 > t0 => {
                (v1 - v0) as f64 * 1000.0 / (t1 - t0) as f64
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proves a family writes HELP and TYPE once, then its samples with labels escaped
    /// (backslash, quote, newline), integers as digits and special floats by name.
    #[test]
    fn exposition_format_and_escaping() {
        let mut e = Exposition::new();
        e.family(
            "blockrep_captured_bytes_total",
            MetricType::Counter,
            "Bytes captured.\nBack\\slash",
        )
        .sample(&[("group", "g1"), ("disk", "d\"0\\\n")], 42u64)
        .sample(&[("group", "g1"), ("disk", "d1")], 0u64);
        e.family("blockrep_rpo_seconds", MetricType::Gauge, "Age")
            .sample(&[], 1.5)
            .sample(&[("group", "nan")], f64::NAN)
            .sample(&[("group", "inf")], f64::INFINITY)
            .sample(&[("group", "ninf")], f64::NEG_INFINITY)
            .sample(&[("group", "b")], true);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP blockrep_captured_bytes_total Bytes captured.\\nBack\\\\slash\n\
             # TYPE blockrep_captured_bytes_total counter\n\
             blockrep_captured_bytes_total{group=\"g1\",disk=\"d\\\"0\\\\\\n\"} 42\n\
             blockrep_captured_bytes_total{group=\"g1\",disk=\"d1\"} 0\n\
             # HELP blockrep_rpo_seconds Age\n\
             # TYPE blockrep_rpo_seconds gauge\n\
             blockrep_rpo_seconds 1.5\n\
             blockrep_rpo_seconds{group=\"nan\"} NaN\n\
             blockrep_rpo_seconds{group=\"inf\"} +Inf\n\
             blockrep_rpo_seconds{group=\"ninf\"} -Inf\n\
             blockrep_rpo_seconds{group=\"b\"} 1\n"
        );
        assert_eq!(escape_label_value("a\"b"), "a\\\"b");
        assert_eq!(escape_help("a\"b"), "a\"b", "quotes stay in HELP text");
    }

    /// Proves the name checks accept the format's syntax and nothing else.
    #[test]
    fn names() {
        assert!(valid_metric_name("blockrep_rpo_seconds"));
        assert!(valid_metric_name("a:b_c9"));
        assert!(!valid_metric_name("9a"));
        assert!(!valid_metric_name(""));
        assert!(!valid_metric_name("a-b"));
        assert!(valid_label_name("_group"));
        assert!(!valid_label_name("a:b"));
        assert!(!valid_label_name(""));
    }

    /// Proves good requests are routed by method and path, with or without a query
    /// string and with bare newlines.
    #[test]
    fn routes_good_requests() {
        let r = |s: &str| route(s.as_bytes(), false);
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Route::Metrics { head_only: false })
        );
        assert_eq!(
            r("HEAD /metrics?x=1 HTTP/1.0\n\n"),
            Some(Route::Metrics { head_only: true })
        );
        assert_eq!(
            r("GET / HTTP/1.1\r\n\r\n"),
            Some(Route::NotFound { head_only: false })
        );
        assert_eq!(
            r("POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Some(Route::MethodNotAllowed)
        );
        assert_eq!(r("GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(r(""), None);
    }

    /// Proves garbage, truncated and oversized heads are refused with a reason, never a
    /// panic, whatever the bytes.
    #[test]
    fn refuses_bad_requests() {
        let bad = |b: &[u8], eof: bool| match route(b, eof) {
            Some(Route::Bad(why)) => why,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(b)),
        };
        assert!(bad(b"GET /metrics HTTP/1.1\r\nHost", true).contains("truncated"));
        assert!(bad(b"", true).contains("truncated"));
        assert!(bad(&vec![b'a'; REQUEST_HEAD_BYTES_MAX], false).contains("over"));
        let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        long.resize(REQUEST_HEAD_BYTES_MAX + 10, b'a');
        long.extend_from_slice(b"\r\n\r\n");
        assert!(bad(&long, false).contains("over"));
        assert!(bad(b"\xff\xfe\r\n\r\n", false).contains("UTF-8"));
        assert!(bad(b"GET /metrics\r\n\r\n", false).contains("request line"));
        assert!(bad(b"GET  /metrics HTTP/1.1\r\n\r\n", false).contains("request line"));
        assert!(bad(b"get /metrics HTTP/1.1\r\n\r\n", false).contains("method"));
        assert!(bad(b"GET metrics HTTP/1.1\r\n\r\n", false).contains("target"));
        assert!(bad(b"GET /metrics HTTP/2\r\n\r\n", false).contains("version"));
        assert!(bad(b"GET /metrics HTTP/1.1\r\nnocolon\r\n\r\n", false).contains("colon"));
        assert!(bad(b"GET /metrics HTTP/1.1\r\n: x\r\n\r\n", false).contains("header name"));
        // Every prefix and a spread of byte soup: an answer or "need more", no panic.
        let good = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for n in 0..good.len() {
            let _ = route(&good[..n], n % 2 == 0);
        }
        let mut x: u32 = 12345;
        for len in 0..300 {
            let soup: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x % 256) as u8
                })
                .collect();
            let _ = route(&soup, true);
            let _ = route(&soup, false);
        }
    }

    /// Proves responses carry status, length and close, HEAD leaves the body out, and
    /// the 400 names the reason.
    #[test]
    fn responses() {
        let ok = String::from_utf8(answer(&Route::Metrics { head_only: false }, || {
            Ok("a 1\n".into())
        }))
        .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 4\r\n") && ok.contains("Connection: close\r\n"));
        assert!(ok.contains(CONTENT_TYPE) && ok.ends_with("\r\n\r\na 1\n"));
        let head = String::from_utf8(answer(&Route::Metrics { head_only: true }, || {
            Ok("a 1\n".into())
        }))
        .unwrap();
        assert!(head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"));
        let bad = String::from_utf8(answer(&Route::Bad("why".into()), || unreachable!())).unwrap();
        assert!(bad.starts_with("HTTP/1.1 400 Bad Request\r\n") && bad.ends_with("why\n"));
        let nf = String::from_utf8(answer(
            &Route::NotFound { head_only: false },
            || unreachable!(),
        ))
        .unwrap();
        assert!(nf.starts_with("HTTP/1.1 404 "));
        let e = String::from_utf8(answer(&Route::Metrics { head_only: false }, || {
            Err("x".into())
        }))
        .unwrap();
        assert!(e.starts_with("HTTP/1.1 500 "));
    }

    /// Proves the rate is the change over the window, the window is bounded, and a
    /// reset counter or a clock that does not advance restarts it.
    #[test]
    fn rate_window() {
        let mut r = RateWindow::new(3);
        assert_eq!(r.per_second(), 0.0);
        r.push(1000, 100);
        assert_eq!(r.per_second(), 0.0);
        r.push(2000, 300);
        assert_eq!(r.per_second(), 200.0);
        r.push(3000, 300);
        assert_eq!(r.per_second(), 100.0);
        r.push(4000, 300);
        assert_eq!(r.samples.len(), 3);
        assert_eq!(r.per_second(), 0.0);
        r.push(5000, 10);
        assert_eq!(r.per_second(), 0.0, "counter reset restarts the window");
        r.push(5500, 20);
        assert_eq!(r.per_second(), 20.0);
        r.push(5500, 30);
        assert_eq!(r.samples.len(), 1, "time did not advance");
    }
}
