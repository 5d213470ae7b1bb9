"""`datablame serve`: a local web UI over one index and model. Type or paste an output (or
pick a line of a queries file), trace it, click through the rows, flip methods, download
the page.

Built on the standard library's HTTP server on purpose: it serves a handful of fixed
routes and no files at all, so no path a browser sends can reach the disk. It binds a
loopback address unless told otherwise, and answers only requests whose Host header names
that address (a web page elsewhere cannot reach it through DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from datablame.errors import UserError

KEPT_RESULTS = 50  # traced results kept in memory for download
MAX_REQUEST_BYTES = 1 << 20  # a query longer than 1 MiB is refused
SERVED_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
              "img-src data:; form-action 'self'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Loopback only, unless the user says out loud that the network may see the rows."""
    if not is_loopback(host) and not allow_remote:
        raise UserError(f"serve binds 127.0.0.1 only: --host {host} would show your training "
                        "rows to the network; add --allow-remote if you mean it")


class TraceSession:
    """The loaded tracer and what the UI may ask of it. One trace at a time (the model is
    shared), results kept by id for the download link."""

    def __init__(self, tracer, *, methods: list[str], queries: list | None = None,
                 top_k: int = 50, show: int = 10, all_rows_available: bool = False):
        self.tracer = tracer
        self.template = tracer.template
        self.methods = methods
        self.queries = queries or []
        self.top_k = top_k
        self.show = show
        self.all_rows_available = all_rows_available
        self.results: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0

    @property
    def prompt_fields(self) -> list[str]:
        return [f for f in self.template.fields if f != self.template.response_field]

    def form_values(self, params: dict[str, str]) -> dict:
        """What the form shows: the request's values, or a picked query file line's."""
        values = {"answer": params.get("answer", ""), "method": params.get("method", "grad"),
                  "fields": {f: params.get(f"field.{f}", "") for f in self.prompt_fields},
                  "generate": params.get("generate") == "1",
                  "all_rows": params.get("all_rows") == "1",
                  "focus": params.get("focus", ""), "pick": params.get("pick", "")}
        if values["pick"] and not params.get("answer") and not any(values["fields"].values()):
            line = self.picked(values["pick"])
            values["answer"] = line.answer or ""
            values["generate"] = line.answer is None
            values["focus"] = line.focus or ""
            values["fields"] = {f: _as_text(line.prompt.get(f, "")) for f in self.prompt_fields}
        return values

    def picked(self, pick: str):
        try:
            return self.queries[int(pick)]
        except (ValueError, IndexError):
            raise UserError(f"no query number {pick!r} in the queries file") from None

    def trace(self, values: dict) -> tuple[str, dict]:
        """Trace what the form asks; (result id, the result as the CLI's --out writes it)."""
        from datablame.cli.render import results_json
        from datablame.text import Query

        method = values["method"]
        if method not in self.methods:
            raise UserError(f"method {method!r} is not offered here "
                            f"({', '.join(self.methods)})")
        if values["all_rows"] and not self.all_rows_available:
            raise UserError("this index has no gradient store: build it with "
                            "index --gradients to score every row")
        prompt = {k: v for k, v in values["fields"].items() if v.strip()}
        focus = values["focus"].strip() or None
        with self._lock:
            if values["generate"]:
                if not prompt:
                    raise UserError("to trace the model's own answer, give its prompt")
                query = self.tracer.generate(prompt, 64, focus)
            else:
                if not values["answer"].strip():
                    raise UserError("give the output to trace (or tick 'the model's own "
                                    "answer' and give the prompt)")
                query = Query(values["answer"], prompt, focus)
            df = self.tracer.run(query, method=method, all_rows=values["all_rows"],
                                 top_k=self.top_k)
            df.attrs["generated"] = bool(values["generate"])
            record = json.loads(json.dumps(results_json(df), default=str))
            if method == "grad" and len(df):
                record["token_scores"] = self.tracer.word_shares(df, self.show)
            key = f"r{self._next}"
            self._next += 1
            self.results[key] = record
            while len(self.results) > KEPT_RESULTS:
                self.results.popitem(last=False)
        return key, record


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def ui_page(session: TraceSession, values: dict, *, result: dict | None = None,
            key: str | None = None, error: str | None = None) -> str:
    from datablame.data.chat import ChatTemplate
    from datablame.report import render

    ui = {"fields": [(f, values["fields"].get(f, "")) for f in session.prompt_fields],
          "answer_field": session.template.response_field, "form": values,
          "chat": isinstance(session.template, ChatTemplate),
          "methods": session.methods, "all_rows_available": session.all_rows_available,
          "queries": [(i, _query_label(q)) for i, q in enumerate(session.queries)],
          "download": f"/download/{key}.html" if key else None, "error": error}
    if result is None:
        return render(None, ui=ui)
    return render(result, ui=ui, show=session.show)


def _query_label(line) -> str:
    text = line.answer if line.answer is not None else \
        "generate: " + " ".join(_as_text(v) for v in line.prompt.values())
    label = " ".join(text.split())
    label = label if len(label) <= 80 else label[:79] + "…"
    return f"{line.id if line.id is not None else line.line}: {label}"


class Handler(BaseHTTPRequestHandler):
    """Fixed routes only: / (the form), /trace (form in, page out), /api/trace (JSON out),
    /download/ID.html (a traced page as a file). Everything else is 404."""

    session: TraceSession
    allowed_hosts: set[str] | None  # None: any (served beyond loopback on purpose)
    server_version = "datablame"
    sys_version = ""
    timeout = 30  # a connection that sends nothing does not hold its thread

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # a quiet terminal; errors reach the page

    def _send(self, status: int, body: str, content_type: str = "text/html; charset=utf-8",
              extra: dict | None = None) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", SERVED_CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _params(self, query: str) -> dict[str, str]:
        parsed = parse_qs(query, keep_blank_values=True, max_num_fields=200)
        return {k: v[-1] for k, v in parsed.items()}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._route(urlsplit(self.path).query)

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self._send(HTTPStatus.BAD_REQUEST, "a body of 0 to 1 MiB, with its length",
                       "text/plain; charset=utf-8")
            return
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        self._route(body)

    def _foreign(self) -> str | None:
        """Why this request must be refused, if it must: another Host (DNS rebinding), or
        a request another site's page made (an <img> or form pointing here)."""
        if self.allowed_hosts is not None and \
                self.headers.get("Host", "") not in self.allowed_hosts:
            return "this server answers only on " + ", ".join(sorted(self.allowed_hosts))
        if self.headers.get("Sec-Fetch-Site", "") == "cross-site":
            return "requests from other sites are refused"
        origin = self.headers.get("Origin")
        if origin and self.allowed_hosts is not None and \
                urlsplit(origin).netloc not in self.allowed_hosts:
            return "requests from other sites are refused"
        return None

    def _route(self, query: str) -> None:
        refused = self._foreign()
        if refused:
            self._send(HTTPStatus.FORBIDDEN, refused, "text/plain; charset=utf-8")
            return
        try:
            self._answer(query)
        except ValueError as exc:  # a malformed query string
            self._send(HTTPStatus.BAD_REQUEST, f"bad request: {exc}",
                       "text/plain; charset=utf-8")
        except Exception as exc:  # noqa: BLE001 - the page says what broke, the server lives
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR,
                       f"the trace failed: {type(exc).__name__}: {exc}",
                       "text/plain; charset=utf-8")

    def _answer(self, query: str) -> None:
        path = urlsplit(self.path).path
        session = self.session
        try:
            params = self._params(query)
            if path == "/":
                self._send(HTTPStatus.OK, ui_page(session, session.form_values(params)))
            elif path == "/trace":
                values = session.form_values(params)
                try:
                    key, record = session.trace(values)
                except UserError as exc:
                    self._send(HTTPStatus.BAD_REQUEST, ui_page(session, values,
                                                               error=str(exc)))
                    return
                self._send(HTTPStatus.OK, ui_page(session, values, result=record, key=key))
            elif path == "/api/trace":
                try:
                    key, record = session.trace(session.form_values(params))
                except UserError as exc:
                    self._send(HTTPStatus.BAD_REQUEST, json.dumps({"error": str(exc)}),
                               "application/json")
                    return
                self._send(HTTPStatus.OK, json.dumps({"id": key, **record},
                                                     ensure_ascii=False),
                           "application/json")
            elif path.startswith("/download/") and path.endswith(".html") \
                    and path[len("/download/"):-len(".html")] in session.results:
                from datablame.report import render

                key = path[len("/download/"):-len(".html")]
                self._send(HTTPStatus.OK, render(session.results[key], show=session.show),
                           extra={"Content-Disposition":
                                  f'attachment; filename="datablame-trace-{key}.html"'})
            else:
                self._send(HTTPStatus.NOT_FOUND, "not found", "text/plain; charset=utf-8")
        except UserError as exc:
            self._send(HTTPStatus.BAD_REQUEST, str(exc), "text/plain; charset=utf-8")


def make_server(session: TraceSession, host: str = "127.0.0.1", port: int = 0,
                allow_remote: bool = False) -> ThreadingHTTPServer:
    """A server bound to host:port (0: a free port), not yet serving. Loopback: only
    requests naming a loopback host are answered; remote (`allow_remote`): any."""
    check_bind(host, allow_remote)
    handler = type("BoundHandler", (Handler,), {"session": session})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    bound = server.server_address[1]
    names = {host, "localhost", "127.0.0.1", "[::1]"}
    handler.allowed_hosts = None if not is_loopback(host) else {f"{n}:{bound}" for n in names}
    return server


def index_has_gradients(index_dir: str | Path) -> bool:
    return (Path(index_dir) / "gradients").is_dir()
