"""A Hugging Face Hub on 127.0.0.1 that serves one model repo from a folder: the few routes
huggingface_hub's `snapshot_download` calls (repo info, the recursive tree, HEAD and GET of a
file at a commit). Tests point HF_ENDPOINT at it, so the cache they read was laid out by
huggingface_hub itself."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send(self, handler, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in {"Content-Length": str(len(payload)), **headers}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(payload)

    def _answer(self, handler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append(f"{handler.command} {path}")
        api = f"/api/models/{self.repo_id}/"
        resolve = f"/{self.repo_id}/resolve/"
        if path.startswith(api + "revision/"):
            info = {"id": self.repo_id, "sha": COMMIT, "siblings": [{"rfilename": name} for name in self.files]}
            return self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if path.startswith(api + "tree/"):
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in self.files.items()]
            return self._send(handler, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if path.startswith(resolve):
            _, _, name = path[len(resolve):].partition("/")
            if name in self.files:
                data = self.files[name]
                return self._send(handler, 200, data, {"X-Repo-Commit": COMMIT,
                                                      "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, body)
            return self._send(handler, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
        self._send(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
