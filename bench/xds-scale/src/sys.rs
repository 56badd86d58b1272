//! What the benchmark reads from the system: memory and CPU time of a
//! process from `/proc`, and a minimal HTTP/1.1 client for the control
//! plane's resource API.
//!
//! Contract: every reader returns `None` (or an error string) rather than
//! panicking when `/proc` is missing or shaped differently; the report then
//! says "n/a". CPU times are in clock ticks of `USER_HZ`, which Linux fixes
//! at 100 on every architecture meshwork targets (10 ms resolution).
//! Non-goals: a general HTTP client (one request per connection,
//! `Connection: close`, no chunked request bodies).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Clock ticks per second of `/proc/*/stat` times.
const USER_HZ: f64 = 100.0;

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`), as bytes.
pub fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// User + system CPU seconds used so far by every thread of `pid` (the
/// dead ones too).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted
    // after the last ')'. utime and stime are fields 14 and 15 of the line,
    // so the 12th and 13th after the name.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// One HTTP/1.1 request; returns the status code and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    admin_token: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let auth = admin_token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.write_all(body.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer from {addr}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", head.lines().next()))?;
    Ok((status, body.to_string()))
}

/// POSTs `body` to `/api/v1/apply`; an answer other than 200 is an error
/// carrying the server's message.
/// `POST /api/v1/apply` with the control plane's admin token.
pub async fn apply(api: SocketAddr, admin_token: &str, body: &str) -> Result<(), String> {
    match http(api, "POST", "/api/v1/apply", body, Some(admin_token)).await? {
        (200, _) => Ok(()),
        (code, text) => Err(format!(
            "apply answered {code}: {}",
            text.chars().take(2000).collect::<String>()
        )),
    }
}
