"""A local stand-in for the Hugging Face Hub: the part of its API that `huggingface_hub` downloads use.

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}`: model info with siblings (size, LFS sha256)
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: 302 to `/blobs/{sha256}` with ETag, X-Repo-Commit, X-Linked-Size
  and X-Linked-Etag, as the Hub redirects LFS files to its CDN
- `HEAD|GET /blobs/{sha256}`: the bytes, with Range support, optionally throttled (bytes per second)
- unknown repo: 404 `X-Error-Code: RepoNotFound`; gated repo without an allowed token: 401/403 `GatedRepo`
- `GET /api/models?search=`: repos whose id contains the text

Point a process at it with `HF_ENDPOINT=hub.url`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    gated: bool = False
    tokens: frozenset[str] = frozenset()  # tokens that have access to a gated repo
    sha: str = field(default_factory=lambda: secrets.token_hex(20))


class FakeHub:
    """`host`: where it listens; the real test node's pods reach the host at its bridge address (NODE_IP)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, HubRepo] = {}
        self.blobs: dict[str, bytes] = {}
        self.bytes_per_second: float | None = None  # throttle for blob downloads; None: as fast as possible
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.host = host
        self._server = ThreadingHTTPServer((host, 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], *, gated: bool = False,
                 tokens: tuple[str, ...] = ()) -> HubRepo:
        data = {name: (f.read_bytes() if isinstance(f, Path) else f) for name, f in files.items()}
        for content in data.values():
            self.blobs[hashlib.sha256(content).hexdigest()] = content
        repo = self.repos[repo_id.lower()] = HubRepo(repo_id, data, gated, frozenset(tokens))
        return repo

    def blob_requests(self) -> list[tuple[str, str | None]]:
        return [(path, rng) for method, path, rng in self.requests if method == "GET" and path.startswith("/blobs/")]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            parsed = urlparse(self.path)
            path = unquote(parsed.path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            try:
                if path == "/api/models":
                    text = parse_qs(parsed.query).get("search", [""])[0].lower()
                    found = [{"id": r.repo_id, "modelId": r.repo_id} for k, r in hub.repos.items() if text in k]
                    return self._json(200, found, head)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    return self._model_info(m[1], head)
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._resolve(m[1], m[3], head)
                if m := re.fullmatch(r"/blobs/([0-9a-f]{64})", path):
                    return self._blob(m[1], head)
                self._error(404, "EntryNotFound", "not found", head)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _repo(self, repo_id: str, head: bool) -> HubRepo | None:
            repo = hub.repos.get(repo_id.lower())
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
            return repo

        def _model_info(self, repo_id: str, head: bool) -> None:
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            siblings = [
                {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
                 "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                for name, data in sorted(repo.files.items())
            ]
            info = {"_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
                    "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
                    "tags": ["gguf"], "downloads": 0, "likes": 0, "library_name": "gguf", "siblings": siblings}
            self._json(200, info, head)

        def _resolve(self, repo_id: str, filename: str, head: bool) -> None:
            repo = self._repo(repo_id, head)
            if repo is None:
                return
            if repo.gated:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ").strip()
                if not token:
                    return self._error(401, "GatedRepo", "Access to this gated repo requires a token.", head)
                if token not in repo.tokens:
                    return self._error(403, "GatedRepo", "This token has no access to this gated repo.", head)
            data = repo.files.get(filename)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", head)
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"{hub.url}/blobs/{sha}")
            self.send_header("ETag", f'"{sha}"')
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _blob(self, sha: str, head: bool) -> None:
            data = hub.blobs.get(sha)
            if data is None:
                return self._error(404, "EntryNotFound", "blob not found", head)
            start, end, status = 0, len(data) - 1, 200
            if rng := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start = int(rng[1])
                end = min(int(rng[2]), end) if rng[2] else end
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{sha}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if head:
                return
            pos, chunk = start, 16384
            began = time.monotonic()
            while pos <= end:
                piece = data[pos: min(pos + chunk, end + 1)]
                self.wfile.write(piece)
                pos += len(piece)
                rate = hub.bytes_per_second
                if rate:
                    ahead = (pos - start) / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

        def _json(self, status: int, body: object, head: bool) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if not head:
                self.wfile.write(raw)

        def _error(self, status: int, code: str, message: str, head: bool) -> None:
            raw = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if not head:
                self.wfile.write(raw)

    return Handler
