"""A real HTTP server on 127.0.0.1 in a thread, serving a folder with Range requests (as object stores
and nginx do; http.server alone ignores them), that can drop connections in the middle of a file."""
import http.server
import os
import re
import threading
from functools import partial


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET with `Range: bytes=N-`. The first `drops[name]` responses for a file stop after half of
    their body and close the connection, as a flaky network or a restarted proxy does."""

    drops: dict  # file name -> responses still to cut short (shared by all requests)

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        size = os.path.getsize(path)
        start = int(m[1]) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read()
        name = os.path.basename(path)
        if self.drops.get(name, 0) > 0 and len(body) > 1:
            self.drops[name] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


def serve(folder, drops: dict | None = None) -> tuple[http.server.ThreadingHTTPServer, str]:
    """-> (the running server: call .shutdown(), its base URL)."""
    handler = type("Handler", (RangeHandler,), {"drops": drops if drops is not None else {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
