"""gRPC peer for the proxy tests: the standard health service (grpcio).

    python health_peer.py server
        Serves grpc.health.v1.Health on 127.0.0.1:<free port>, prints the port
        on the first line of stdout, and runs until stdin closes (so it dies
        with the test that started it). Statuses:
          ""               SERVING
          "meshwork.test"  SERVING
          "toggle"         flips SERVING <-> NOT_SERVING every 100 ms, so a
                           Watch sees a stream of updates
          anything else    unknown: Check answers NOT_FOUND

    python health_peer.py client HOST:PORT AUTHORITY
        Dials HOST:PORT (the proxy) with :authority AUTHORITY (the service
        name the proxy routes on), runs the checks below and prints one JSON
        object with what it saw. Exits 0 even when a call fails: the test
        asserts on the JSON.
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

NAME = health_pb2.HealthCheckResponse.ServingStatus.Name


def server():
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("meshwork.test", health_pb2.HealthCheckResponse.SERVING)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()

    def toggle():
        serving = True
        while True:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            servicer.set("toggle", status)
            serving = not serving
            time.sleep(0.1)

    threading.Thread(target=toggle, daemon=True).start()
    print(port, flush=True)
    # Stay up until the test closes our stdin (or exits).
    sys.stdin.read()
    srv.stop(0)


def client(target, authority):
    out = {}
    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    stub = health_pb2_grpc.HealthStub(channel)

    # Unary calls.
    for name in ["", "meshwork.test", "no.such.Service"]:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            out["check:" + name] = NAME(resp.status)
        except grpc.RpcError as e:
            out["check:" + name] = "error:" + e.code().name

    # Server streaming: the first message is the current status, then one
    # per change; three messages prove at least two updates streamed through.
    statuses = []
    try:
        stream = stub.Watch(health_pb2.HealthCheckRequest(service="toggle"), timeout=10)
        for resp in stream:
            statuses.append(NAME(resp.status))
            if len(statuses) >= 3:
                stream.cancel()
                break
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            out["watch_error"] = e.code().name
    out["watch"] = statuses
    channel.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    else:
        client(sys.argv[2], sys.argv[3])
