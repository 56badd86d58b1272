"""WebSocket peer for the proxy tests (the `websockets` library).

    python ws_peer.py server
        An echo server on 127.0.0.1:<free port>: every message comes back
        unchanged, prefixed "echo:" for text. After the first message it also
        pushes one unsolicited "hello from server" (server-to-client traffic
        that is not an answer). Prints the port, runs until stdin closes.

    python ws_peer.py client HOST:PORT HOSTNAME
        Opens a TCP connection to HOST:PORT (the proxy) and performs the
        upgrade for ws://HOSTNAME/chat (so the Host header names the
        service), exchanges several text and binary messages, and prints one
        JSON object with what came back.
"""

import json
import socket
import sys
import threading

from websockets.sync.client import connect
from websockets.sync.server import serve


def echo(ws):
    first = True
    for message in ws:
        if isinstance(message, str):
            ws.send("echo:" + message)
        else:
            ws.send(message)
        if first:
            ws.send("hello from server")
            first = False


def server():
    with serve(echo, "127.0.0.1", 0) as srv:
        print(srv.socket.getsockname()[1], flush=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        sys.stdin.read()
        srv.shutdown()


def client(target, hostname):
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    out = {"received": []}
    with connect(f"ws://{hostname}/chat", sock=sock, open_timeout=10) as ws:
        sent = ["one", "two", b"\x00\x01binary\xff", "three"]
        for m in sent:
            ws.send(m)
        # Four echoes plus the server's own message.
        for _ in range(len(sent) + 1):
            m = ws.recv(timeout=10)
            out["received"].append(m if isinstance(m, str) else "bytes:" + m.hex())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    else:
        client(sys.argv[2], sys.argv[3])
