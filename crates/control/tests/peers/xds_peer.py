"""Proxyless gRPC peer for the xDS server tests (grpcio, C-core xDS client).

    python xds_peer.py server NAME
        Serves grpc.health.v1.Health on 127.0.0.1:<free port> with service
        NAME reported SERVING (every other name: NOT_FOUND), prints the port
        on the first line of stdout, and runs until stdin closes.

    python xds_peer.py client TARGET NAME[,NAME...]
        Opens one channel to TARGET (an xds:/// target; GRPC_XDS_BOOTSTRAP
        names the bootstrap) and, every 50 ms until stdin closes, asks
        Check(service=NAME) for each NAME, printing one JSON line per round:
        {"serving": "<first NAME answered SERVING>" or null, "errors": [...]}.
        The NAME that answers SERVING identifies the backend that served.
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def server(name):
    servicer = health.HealthServicer()
    servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    print(port, flush=True)
    sys.stdin.read()
    srv.stop(0)


def client(target, names):
    done = threading.Event()

    def wait_stdin():
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    channel = grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    while not done.is_set():
        serving, errors = None, []
        for name in names:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    serving = name
                    break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    errors.append(f"{name}: {e.code().name}: {e.details()}")
        try:
            print(json.dumps({"serving": serving, "errors": errors}), flush=True)
        except BrokenPipeError:
            return
        time.sleep(0.05)
    channel.close()


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        client(sys.argv[2], sys.argv[3].split(","))
