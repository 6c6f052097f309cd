"""An HTTP proxy in front of a real S3 endpoint (moto's server) that fails some requests and
then recovers: the transient faults of object storage (throttling, 5xx, dropped connections)
that a multi-hour run meets.

Every ``every``-th request, until ``failures`` have been made, is answered with a fault
instead of being forwarded: in turn ``503 SlowDown`` (S3's throttling), ``500
InternalError``, and a connection reset (RST) with no answer at all. After that every request
is forwarded. Requests are forwarded byte for byte (the signed Host header included); moto
never sees a failed one.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import urllib.parse

FAULTS = ("503 SlowDown", "500 InternalError", "reset")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FlakyS3:
    """The proxy: ``url`` to use as the S3 endpoint; ``requests``, ``failed`` (by kind) count
    what it saw."""

    def __init__(self, upstream: str, every: int, failures: int):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.every, self.failures = every, failures
        self.requests = 0
        self.failed: dict[str, int] = {kind: 0 for kind in FAULTS}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

            def _handle(self):
                body = self._body()
                fault = proxy._next_fault()
                if fault == "reset":
                    # SO_LINGER 0: close() sends RST, the client sees a dropped connection.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault:
                    status, code = fault.split()
                    self._answer(int(status), {"Content-Type": "application/xml"},
                                 f"<Error><Code>{code}</Code><Message>{code}</Message>"
                                 "</Error>".encode())
                    return
                status, headers, answer = proxy._forward(self.command, self.path,
                                                         self.headers, body)
                self._answer(status, headers, answer)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if self.command == "HEAD":  # its Content-Length is the object's, no body
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            made = sum(self.failed.values())
            if made >= self.failures or self.requests % self.every:
                return None
            kind = FAULTS[made % len(FAULTS)]
            self.failed[kind] += 1
            return kind

    def _forward(self, method: str, path: str, headers, body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                                timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            if body or method in ("PUT", "POST"):
                sent["Content-Length"] = str(len(body))
            connection.request(method, path, body=body or None, headers=sent)
            response = connection.getresponse()
            answer = response.read()
            kept = {k: v for k, v in response.getheaders()
                    if k.lower() not in HOP_BY_HOP or (method == "HEAD"
                                                       and k.lower() == "content-length")}
            return response.status, kept, answer
        finally:
            connection.close()

    @property
    def recovered(self) -> bool:
        """Whether all its failures were made and requests were served after the last."""
        return sum(self.failed.values()) == self.failures and \
            self.requests > self.failures * self.every

    def __enter__(self) -> "FlakyS3":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
