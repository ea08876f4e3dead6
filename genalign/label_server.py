"""A local web page for labelling a round's comparisons (``genalign label serve DIR``).

Standard library only: a threaded HTTP server over the labels folder's store. Each request
opens its own store connection and every answer is one SQLite transaction, so several
annotators can label at once. The page (``label_page.html``) needs no network.

API (JSON):

- ``GET  /api/state?annotator=NAME``: the round, the annotator's progress and their next
  comparison (``null`` when done), with the prompt and the two outputs (``left``/``right``:
  an image or clip URL, or a text). Which sample shows on the left is fixed per
  (annotator, comparison) by a hash, so position bias averages out over annotators.
- ``POST /api/answer`` ``{"annotator", "id", "choice": "left" | "right" | "tie" | "skip"}``
- ``POST /api/undo`` ``{"annotator"}``: take back the annotator's last answer.
- ``GET  /api/stats[?round=N]``: per round counts, annotators and agreement.
- ``GET  /files/round-NNN/<name>``: a round's images, only from the round folders.

Bad ids or names get 400, unknown comparisons 404, paths outside the round folders 403.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from genalign.labelling import STORE_NAME, status
from genalign.preference_store import PreferenceStore, UnknownComparisonError

FILE_PATTERN = re.compile(r"^round-\d{3}/[A-Za-z0-9._-]+\.(png|gif)$")
NAME_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
MAX_BODY = 16 * 1024
CONTENT_TYPES = {"png": "image/png", "gif": "image/gif"}


class BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def swapped(annotator: str, queue_id: int) -> bool:
    """Whether sample b shows on the left for this annotator and comparison."""
    return hashlib.sha256(f"{annotator}\0{queue_id}".encode()).digest()[0] & 1 == 1


def _annotator(value: Any) -> str:
    name = value.strip() if isinstance(value, str) else ""
    if not NAME_PATTERN.match(name):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "'annotator' must be a name of 1 to 64 printable characters")
    return name


def _number(value: Any, what: str = "id") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"\d{1,12}", str(value)):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"'{what}' must be a number, got {value!r}")
    return int(value)


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str, host: str = "127.0.0.1", port: int = 8765):
        self.root = os.path.realpath(root)
        self.store_path = os.path.join(self.root, STORE_NAME)
        if not os.path.isfile(self.store_path):
            raise FileNotFoundError(f"no labelling rounds in {root} (no {STORE_NAME}): start one with genalign label new CONFIG")
        PreferenceStore(self.store_path).close()  # a broken file fails here, not on the first request
        self.page = resources.files("genalign").joinpath("label_page.html").read_bytes()
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    # -- the API, on a store connection per request ------------------------------------------
    def state(self, annotator: str) -> dict[str, Any]:
        store = PreferenceStore(self.store_path)
        try:
            number = store.latest_round()
            if number is None:
                return {"round": None, "done": 0, "total": 0, "comparison": None}
            done, total = store.progress(annotator, number)
            q = store.next_comparison(annotator, number)
            comparison = None
            if q is not None:
                samples = store.samples([q["sample_a"], q["sample_b"]])
                a, b = samples[q["sample_a"]], samples[q["sample_b"]]
                left, right = (b, a) if swapped(annotator, q["id"]) else (a, b)
                comparison = {
                    "id": q["id"], "prompt": a.display,
                    "condition_image": f"/files/{a.condition_file}" if a.condition_file else None,
                    "left": _shown(left), "right": _shown(right),
                }
            return {"round": number, "done": done, "total": total, "comparison": comparison}
        finally:
            store.close()

    def answer(self, annotator: str, queue_id: int, choice: str) -> dict[str, Any]:
        if choice not in ("left", "right", "tie", "skip"):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"'choice' must be left, right, tie or skip, got {choice!r}")
        action = choice
        if choice in ("left", "right"):
            left_is_a = not swapped(annotator, queue_id)
            action = "a" if (choice == "left") == left_is_a else "b"
        store = PreferenceStore(self.store_path)
        try:
            written = store.record(queue_id, annotator, action)
        except UnknownComparisonError as e:
            raise BadRequest(HTTPStatus.NOT_FOUND, str(e.args[0])) from None
        finally:
            store.close()
        return {**self.state(annotator), "recorded": written}

    def undo(self, annotator: str) -> dict[str, Any]:
        store = PreferenceStore(self.store_path)
        try:
            undone = store.undo(annotator)
        finally:
            store.close()
        return {**self.state(annotator), "undone": undone}

    def file(self, relative: str) -> tuple[bytes, str]:
        """A round's image: the path must name a file inside a round folder of the root."""
        if not FILE_PATTERN.match(relative):
            raise BadRequest(HTTPStatus.FORBIDDEN, "only a round's images are served")
        path = os.path.realpath(os.path.join(self.root, relative))
        if os.path.commonpath([path, self.root]) != self.root:  # a link pointing out of the folder
            raise BadRequest(HTTPStatus.FORBIDDEN, "only a round's images are served")
        if not os.path.isfile(path):
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no file {relative}")
        with open(path, "rb") as f:
            return f.read(), CONTENT_TYPES[relative.rsplit(".", 1)[1]]


def _shown(sample: Any) -> dict[str, Any]:
    if sample.kind == "text":
        return {"kind": "text", "text": sample.text}
    return {"kind": sample.kind, "url": f"/files/{sample.file}"}


class Handler(BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "genalign-label"

    def log_message(self, format: str, *args: Any) -> None:  # one quiet server: no access log on stderr
        pass

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _handle(self, route) -> None:
        try:
            route()
        except BadRequest as e:
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a request must not take the server down
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self) -> None:  # noqa: N802
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._post)

    def _get(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self.server.state(_annotator((query.get("annotator") or [""])[0])))
        elif path == "/api/stats":  # every round, or ?round=N
            number = (query.get("round") or [None])[0]
            self._json(HTTPStatus.OK, status(self.server.root, None if number is None else _number(number, "round")))
        elif path.startswith("/files/"):
            body, kind = self.server.file(path[len("/files/"):])
            self._send(HTTPStatus.OK, body, kind)
        else:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no page {url.path}")

    def _post(self) -> None:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "a JSON body with Content-Length is required")
        if int(length) > MAX_BODY:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        annotator = _annotator(body.get("annotator"))
        if self.path == "/api/answer":
            self._json(HTTPStatus.OK, self.server.answer(annotator, _number(body.get("id")), str(body.get("choice"))))
        elif self.path == "/api/undo":
            self._json(HTTPStatus.OK, self.server.undo(annotator))
        else:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(root: str, host: str = "127.0.0.1", port: int = 0) -> tuple[LabelServer, threading.Thread]:
    """A server on a background thread (port 0: any free port); stop it with ``server.shutdown()``."""
    server = LabelServer(root, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def serve(root: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until Ctrl-C, printing the address."""
    from genalign.progress import write

    if not is_loopback(host):
        write(f"[genalign] warning: serving on {host}: anyone who can reach this machine on port {port} can read the "
              f"samples and write labels (there is no login)")
    server = LabelServer(root, host, port)
    write(f"[genalign] labelling {root} at {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
