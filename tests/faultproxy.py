"""A small fault-injecting HTTP proxy for the S3 test server.

Each request from the client is read whole, then either forwarded to the
upstream server (and its answer relayed) or failed on purpose: a `503
SlowDown` S3 error, the connection dropped without an answer, or (for a GET)
an answer cut off half-way through its body. Faults come
from an outage window (every request fails while it lasts) and from a list
of request numbers; every request and fault is counted, with the body bytes
sent per key prefix, so tests can show that faults really happened.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.lock = threading.Lock()
        self.requests = 0
        self.faults = {"503": 0, "drop": 0, "cut": 0}
        self.cuts: dict[str, int] = {}
        self.outage_until = 0.0
        self.outage_kind = "503"
        self.scheduled: dict[int, str] = {}  # request number -> "503" | "drop"
        self.body_bytes: dict[str, int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                body = self._read_body()
                with proxy.lock:
                    proxy.requests += 1
                    n = proxy.requests
                    fault = proxy.scheduled.pop(n, None)
                    path = self.path.split("?", 1)[0]
                    if fault is None and self.command == "GET" and proxy.cuts.get(path, 0) > 0:
                        proxy.cuts[path] -= 1
                        fault = "cut"
                    if fault is None and time.monotonic() < proxy.outage_until:
                        fault = proxy.outage_kind
                    if fault:
                        proxy.faults[fault] += 1
                    if fault in (None, "cut"):
                        key = self.path.split("?", 1)[0]
                        proxy.body_bytes[key] = proxy.body_bytes.get(key, 0) + len(body)
                if fault == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                self._forward(body, cut=fault == "cut")

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _forward(self, body: bytes, cut: bool = False) -> None:
                """Send the request on and its answer back; with cut, the
                answer stops half-way through its body (the connection is
                closed after the full Content-Length was promised)."""
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                                 headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                finally:
                    conn.close()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD: the size of what a GET would return
                self.send_header("Content-Length", r.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if cut:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def outage(self, seconds: float, kind: str = "503") -> None:
        """Fail every request for the next `seconds`."""
        with self.lock:
            self.outage_kind = kind
            self.outage_until = time.monotonic() + seconds

    def fail_requests(self, kinds: dict[int, str]) -> None:
        """Fail the requests that will be number n (counted from now) as kinds[n]."""
        with self.lock:
            self.scheduled.update({self.requests + n: k for n, k in kinds.items()})

    def cut_gets(self, path: str, times: int = 1) -> None:
        """The next `times` GETs of `path` (the URL path) get their answer's
        headers and half its body, then the connection is closed."""
        with self.lock:
            self.cuts[path] = self.cuts.get(path, 0) + times

    def sent_to(self, fragment: str) -> int:
        """Body bytes forwarded in requests whose path contains fragment."""
        with self.lock:
            return sum(n for k, n in self.body_bytes.items() if fragment in k)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
