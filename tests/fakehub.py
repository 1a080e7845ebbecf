"""A local stand-in for the Hugging Face hub (HF_ENDPOINT): the API calls and file downloads `huggingface_hub` makes,
served from folders on disk, with every request logged, so tests can count what a job asks the hub."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """`models[repo_id] = folder`: a model repo whose files are that folder's files, at commit SHA. Every dataset id but
    ORG/missing exists (at SHA, with no files: tests only ask for its commit). `requests` lists (method, path).
    `datasets[repo_id] = folder` likewise serves a dataset repo's files (what `datasets` streams from).
    Uploads (`upload_folder`: create the repo, preupload, commit) write into a new folder under `root`."""

    def __init__(self, root: Path | None = None):
        self.root = root
        self.models: dict[str, Path] = {}
        self.datasets: dict[str, Path] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

            def do_POST(self):
                hub._post(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()

    def asked(self, pattern: str) -> list[str]:
        """The request paths (query cut) that match `pattern`."""
        return [p for _, p in self.requests if re.fullmatch(pattern, p)]

    def dataset_lookups(self) -> list[str]:
        """The dataset ids whose commit was asked for, in order."""
        return [m[1] for _, p in self.requests if (m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(/revision/[^/]+)?", p))]

    def _files(self, repo: str, kind: str = "models") -> dict[str, Path]:
        folder = getattr(self, kind)[repo]
        return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def _entries(self, repo: str, kind: str, under: str, recursive: bool) -> list[dict]:
        """The tree API's entries below `under` (files, and folders when not recursive)."""
        out, dirs = [], set()
        for f, p in self._files(repo, kind).items():
            if under and not f.startswith(under + "/"):
                continue
            rest = f[len(under) + 1:] if under else f
            if "/" in rest and not recursive:
                dirs.add((under + "/" if under else "") + rest.split("/")[0])
                continue
            out.append({"type": "file", "path": f, "size": p.stat().st_size, "oid": hashlib.sha1(p.read_bytes()).hexdigest()})
        return [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)] + out

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        import base64

        path = h.path.split("?")[0]
        self.requests.append(("POST", path))
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(h.rfile.readline().strip(), 16):
                data += h.rfile.read(size)
                h.rfile.readline()
            h.rfile.readline()
        else:
            data = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        if h.headers.get("Content-Encoding") == "gzip":
            import gzip

            data = gzip.decompress(data)
        reply: object = {}
        if path == "/api/repos/create":
            req = json.loads(data)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else f"me/{req['name']}"
            if repo not in self.models:
                self.models[repo] = self.root / repo.replace("/", "--")
                self.models[repo].mkdir(parents=True)
            reply = {"url": f"{self.url}/{repo}", "name": repo}
        elif (m := re.fullmatch(r"/api/(models|datasets)/(.+?)/paths-info/[^/]+", path)) and m[2] in getattr(self, m[1]):
            from urllib.parse import parse_qs

            form = parse_qs(data.decode()) if not data.startswith(b"{") else json.loads(data)
            files = self._files(m[2], m[1])
            reply = [e for q in form.get("paths", []) for e in self._entries(m[2], m[1], "", True) if e["path"] == q]
            reply += [{"type": "directory", "path": q, "oid": "0" * 40} for q in form.get("paths", [])
                      if q not in files and any(f.startswith(q + "/") for f in files)]
        elif m := re.fullmatch(r"/api/models/(.+?)/preupload/[^/]+", path):
            reply = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(data)["files"]]}
        elif m := re.fullmatch(r"/api/models/(.+?)/commit/[^/]+", path):
            for line in data.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = self.models[m[1]] / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            reply = {"commitUrl": f"{self.url}/{m[1]}/commit/{SHA}", "commitOid": SHA, "pullRequestUrl": None}
        body = json.dumps(reply).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        from urllib.parse import unquote

        path, _, query = h.path.partition("?")
        path = unquote(path)
        self.requests.append(("HEAD" if head else "GET", path))
        status, body, headers = 404, json.dumps({"error": "not found"}).encode(), {"Content-Type": "application/json"}
        if path == "/api/whoami-v2":
            status, body = 200, json.dumps({"type": "user", "name": "me", "auth": {"accessToken": {"role": "write"}}}).encode()
        elif (m := re.fullmatch(r"/api/(models|datasets)/(.+?)/tree/([^/]+)(?:/(.*))?", path)) and m[2] in getattr(self, m[1]):
            tree = self._entries(m[2], m[1], (m[4] or "").strip("/"), "recursive=true" in query.lower())
            status, body = 200, json.dumps(tree).encode()
        elif (m := re.fullmatch(r"/api/(models|datasets)/(.+?)(?:/revision/([^/]+))?", path)) and m[2] in getattr(self, m[1]):
            siblings = [{"rfilename": f} for f in self._files(m[2], m[1])]
            status, body = 200, json.dumps({"id": m[2], "sha": SHA, "private": False, "siblings": siblings}).encode()
        elif m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(/revision/[^/]+)?", path):
            if not m[1].endswith("/missing"):  # any other dataset exists, without files: tests only ask for its commit
                status, body = 200, json.dumps({"id": m[1], "sha": SHA, "private": False}).encode()
        elif ((m := re.fullmatch(r"/(datasets/)?(.+?)/resolve/([^/]+)/(.+)", path))
              and m[2] in getattr(self, kind := "datasets" if m[1] else "models") and m[4] in self._files(m[2], kind)):
            data = self._files(m[2], kind)[m[4]].read_bytes()
            status, body = 200, data
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            if r := re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", "")):
                start, end = int(r[1]), int(r[2]) + 1 if r[2] else len(data)
                status, body = 206, data[start:end]
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if status == 404:  # as the hub says which: huggingface_hub raises EntryNotFound (a file that is not there) on this
            known = (m := re.fullmatch(r"/(datasets/)?(.+?)/resolve/.*", path)) and m[2] in getattr(self, "datasets" if m[1] else "models")
            headers["X-Error-Code"] = "EntryNotFound" if known else "RepoNotFound"
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
