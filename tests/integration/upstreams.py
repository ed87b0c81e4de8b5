"""Fake upstream servers for the ``http`` backend's tests (test_http_backend.py).

An :class:`Upstream` is a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port), run in a
thread of the test process. Every POST it receives becomes a :class:`Call`, handed to the
upstream's *behaviour*, a callable ``behaviour(call) -> Reply``; the reply says what to
answer (status, JSON body, headers) and how long to wait first. While it waits the handler
watches the connection, so a client that hangs up (an aborted call, a killed inferd) ends
the wait at once and is recorded (``call.disconnected``).

The upstream counts what it saw: every call (``calls``), the calls per payload
(``count(key)``; a call's ``key`` is its JSON body, canonical), the calls in flight now and
the most ever in flight at once (``max_in_flight``).

Behaviours:

- :func:`echo` answers ``{"echo": <the request's JSON>, "call": <nth call of this payload>}``;
- :class:`Script` answers each payload's n-th call with the n-th reply of a list (the last
  one repeats), chosen by a key function, e.g. ``Script({"flaky": [Reply(500), Reply(500),
  Reply()]}, key=lambda c: c.json["case"])``;
- :func:`openai` is an OpenAI-compatible completions server (``/v1/chat/completions`` and
  ``/v1/completions``) whose completion is the prompt (or the last user message), upper-cased.

:class:`StallingS3` is an S3 endpoint for one object that can hold every request unanswered
(a stalled read) until the test releases it.

Nothing here sleeps on a fixed schedule except a reply's own ``delay_s``; ``stop()`` ends
every wait.
"""
import http.server
import json
import select
import socket
import threading
import time

__all__ = ["Call", "Reply", "Script", "StallingS3", "Upstream", "echo", "openai",
           "upper_completion"]


class Reply:
    """What an upstream answers one call.

    ``body``: a JSON-able value (sent as JSON), ``bytes`` (sent as they are), or ``None``
    for the echo body (see :func:`echo`). ``delay_s``: wait this long first (ended early by
    a client that hangs up, or by ``Upstream.stop()``).
    """

    def __init__(self, status=200, body=None, headers=None, delay_s=0.0):
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.delay_s = delay_s

    def __repr__(self):
        return f"Reply({self.status}, delay_s={self.delay_s})"


class Call:
    """One request an upstream received."""

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None
        # the payload's identity: its JSON, canonical (or the raw bytes if not JSON)
        self.key = (json.dumps(self.json, sort_keys=True, separators=(",", ":"))
                    if self.json is not None else body.decode("utf-8", "replace"))
        self.nth = 0                 # 1 for the first call with this key, 2 for the second...
        self.started = time.monotonic()
        self.ended = None            # when the answer was sent, or the client was seen gone
        self.status = None           # the status answered (None if never answered)
        self.disconnected = False    # the client closed the connection before the answer

    def __repr__(self):
        return (f"Call({self.method} {self.path} key={self.key[:60]!r} nth={self.nth} "
                f"status={self.status} disconnected={self.disconnected})")


def echo(delay_s=0.0):
    """Answers 200 ``{"echo": <request JSON>, "call": <nth>}`` after ``delay_s``."""
    def behaviour(call):
        return Reply(200, None, delay_s=delay_s)
    return behaviour


class Script:
    """Per-payload scripts: the n-th call of a key gets ``replies[key][n-1]`` (the last one
    repeats once the list is used up); keys without a script get ``default`` (a list too).

    ``key(call)`` picks the script (default: the call's canonical JSON body).
    """

    def __init__(self, replies=None, default=(Reply(),), key=None):
        self.replies = {k: list(v) for k, v in (replies or {}).items()}
        self.default = list(default)
        self.key = key or (lambda call: call.key)

    def __call__(self, call):
        try:
            k = self.key(call)
        except Exception:  # noqa: BLE001 - an odd payload gets the default script
            k = None
        script = self.replies.get(k, self.default)
        return script[min(call.nth, len(script)) - 1]


def upper_completion(text):
    """What :func:`openai` answers for a prompt."""
    return text.upper()


# The request keys OpenAI's APIs accept; any other is a 400, as OpenAI answers it.
OPENAI_COMPLETIONS_KEYS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix",
    "temperature", "top_p", "user"}
OPENAI_CHAT_KEYS = {
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions",
    "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities",
    "n", "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop",
    "store", "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs",
    "top_p", "user", "verbosity", "web_search_options"}


def openai(delay_s=0.0, extra_keys=()):
    """An OpenAI-compatible server: POST …/chat/completions answers
    ``{"choices": [{"message": {"role": "assistant", "content": C}}], ...}`` and POST
    …/completions answers ``{"choices": [{"text": C}], ...}``, where C is the prompt (or
    the last user message's content) upper-cased. A body without them, or with a key outside
    OpenAI's request schema (and ``extra_keys``, a server's own extras), is a 400
    ``{"error": {"message": ...}}``, like OpenAI's; ``"stream": true`` is answered as a stream
    of server-sent events; any other path is a 404.
    """
    counter = [0]
    lock = threading.Lock()

    def behaviour(call):
        with lock:
            counter[0] += 1
            n = counter[0]
        body = call.json if isinstance(call.json, dict) else {}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        known = OPENAI_CHAT_KEYS if call.path.endswith("/chat/completions") \
            else OPENAI_COMPLETIONS_KEYS
        unknown = sorted(set(body) - known - set(extra_keys))
        if unknown and call.path.endswith("/completions"):
            return Reply(400, {"error": {"message": "Unrecognized request argument supplied: "
                                                    + unknown[0],
                                         "type": "invalid_request_error"}})
        if body.get("stream") is True:
            return Reply(200, b'data: {"choices": [{"delta": {"content": "X"}}]}\n\n'
                              b"data: [DONE]\n\n",
                         headers={"Content-Type": "text/event-stream"})
        if call.path.endswith("/chat/completions"):
            msgs = body.get("messages")
            users = [m for m in msgs or [] if isinstance(m, dict) and m.get("role") == "user"]
            if not users or not isinstance(users[-1].get("content"), str):
                return Reply(400, {"error": {"message": "messages: no user message",
                                             "type": "invalid_request_error"}})
            content = upper_completion(users[-1]["content"])
            return Reply(200, {"id": f"chatcmpl-{n}", "object": "chat.completion",
                               "model": body.get("model"),
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant",
                                                        "content": content}}],
                               "usage": usage}, delay_s=delay_s)
        if call.path.endswith("/completions"):
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return Reply(400, {"error": {"message": "prompt: expected a string",
                                             "type": "invalid_request_error"}})
            return Reply(200, {"id": f"cmpl-{n}", "object": "text_completion",
                               "model": body.get("model"),
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "text": upper_completion(prompt)}],
                               "usage": usage}, delay_s=delay_s)
        return Reply(404, {"error": {"message": f"no route {call.path}"}})
    return behaviour


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256        # hundreds of calls may connect at once

    def handle_error(self, request, client_address):
        pass  # a client killed mid-request (kill -9 tests) resets its connection


class Upstream:
    """A fake upstream on 127.0.0.1; see the module's doc. Use as a context manager, or
    ``start()`` / ``stop()``."""

    def __init__(self, behaviour=None, name="upstream"):
        self.behaviour = behaviour or echo()
        self.name = name
        self.calls = []              # every Call, in arrival order
        self.lock = threading.RLock()   # predicates of wait() may call count() etc.
        self.changed = threading.Condition(self.lock)
        self.in_flight = 0
        self.max_in_flight = 0
        self._by_key = {}
        self._stopping = threading.Event()
        self.httpd = None
        self.thread = None
        self.url = None
        self.port = None

    # -- lifecycle ---------------------------------------------------------
    def start(self):
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server API
                upstream._serve(self, "POST")

            def do_GET(self):  # noqa: N802
                upstream._serve(self, "GET")

            def log_message(self, *args):
                pass

        self.httpd = _HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name=f"{self.name}-{self.port}")
        self.thread.start()
        return self

    def stop(self):
        """Ends every wait, stops accepting and closes the socket."""
        self._stopping.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- what it saw --------------------------------------------------------
    def count(self, key=None):
        """Calls received in all (key None), or with this payload (a dict/list is made
        canonical, a str is taken as the canonical JSON text)."""
        with self.lock:
            if key is None:
                return len(self.calls)
            return len(self._by_key.get(self._key(key), []))

    def calls_for(self, key):
        with self.lock:
            return list(self._by_key.get(self._key(key), []))

    def keys(self):
        """{canonical payload: number of calls}."""
        with self.lock:
            return {k: len(v) for k, v in self._by_key.items()}

    def snapshot(self):
        with self.lock:
            return list(self.calls)

    def wait(self, predicate, deadline_s, what):
        """Waits (on the upstream's own events) until ``predicate(self)`` is truthy; returns
        it, or raises AssertionError naming ``what`` at the deadline."""
        end = time.monotonic() + deadline_s
        with self.changed:
            while True:
                value = predicate(self)
                if value:
                    return value
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name} {self.url}: timed out after {deadline_s:.0f}s waiting for "
                        f"{what}; in flight {self.in_flight}, calls {self.calls[-5:]!r}")
                self.changed.wait(min(left, 0.2))

    @staticmethod
    def _key(key):
        if isinstance(key, (dict, list)):
            return json.dumps(key, sort_keys=True, separators=(",", ":"))
        return key

    # -- serving ---------------------------------------------------------------
    def _serve(self, h, method):
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        call = Call(method, h.path, dict(h.headers), body)
        with self.changed:
            self.calls.append(call)
            same = self._by_key.setdefault(call.key, [])
            same.append(call)
            call.nth = len(same)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.changed.notify_all()
        try:
            try:
                reply = self.behaviour(call)
            except Exception as exc:  # noqa: BLE001 - a broken script is the test's 500
                reply = Reply(500, {"error": f"upstream script failed: {exc!r}"})
            if reply.delay_s and not self._wait_open(h.connection, reply.delay_s):
                call.disconnected = True
                h.close_connection = True
                return
            body = reply.body
            if body is None:
                body = {"echo": call.json, "call": call.nth}
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                h.send_response(reply.status)
                headers = {"Content-Type": "application/json", **reply.headers}
                for k, v in headers.items():
                    h.send_header(k, str(v))
                h.send_header("Content-Length", str(len(payload)))
                h.end_headers()
                h.wfile.write(payload)
                h.wfile.flush()
                call.status = reply.status
            except OSError:
                call.disconnected = True
                h.close_connection = True
        finally:
            with self.changed:
                call.ended = time.monotonic()
                self.in_flight -= 1
                self.changed.notify_all()

    def _wait_open(self, conn, seconds):
        """Waits ``seconds``; False as soon as the client closes the connection (or on stop).

        The client sends nothing more while it waits for this answer, so the socket turning
        readable means EOF (or a reset)."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return True
            if self._stopping.is_set():
                return False
            try:
                readable, _, _ = select.select([conn], [], [], min(left, 0.05))
                if readable and conn.recv(1, socket.MSG_PEEK) == b"":
                    return False
            except (OSError, ValueError):
                return False


class StallingS3:
    """A path-style S3 endpoint for one object, ``s3://inputs/request.json``, on 127.0.0.1
    (for ``--s3-endpoint``). While stalled it takes every request and never answers it
    (until :meth:`release`, or :meth:`stop`); otherwise it serves the object as S3 does
    (HEAD with its size and ETag, ranged GET). ``requests`` lists (method, path) as they
    came."""
    BUCKET, KEY = "inputs", "request.json"

    def __init__(self, body, stalled=False):
        self.body = body
        self.released = threading.Event()
        if not stalled:
            self.released.set()
        self.stopping = threading.Event()
        self.lock = threading.Condition()
        self.requests = []
        s3 = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):  # noqa: N802 - http.server API
                s3._serve(self, head=True)

            def do_GET(self):  # noqa: N802
                s3._serve(self, head=False)

            def log_message(self, *args):
                pass

        self.httpd = _HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _serve(self, h, head):
        with self.lock:
            self.requests.append((h.command, h.path))
            self.lock.notify_all()
        while not self.released.wait(0.05):
            if self.stopping.is_set():
                return
        if h.path.split("?")[0] != f"/{self.BUCKET}/{self.KEY}":
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data, status, extra = self.body, 200, {}
        rng = h.headers.get("Range")
        if rng and not head:
            a, b = (int(x) for x in rng.split("=")[1].split("-"))
            data, status = self.body[a:b + 1], 206
            extra["Content-Range"] = f"bytes {a}-{b}/{len(self.body)}"
        h.send_response(status)
        h.send_header("ETag", '"v1"')
        h.send_header("Content-Length", str(len(self.body) if head else len(data)))
        for k, v in extra.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def wait_requests(self, n, deadline_s, what):
        end = time.monotonic() + deadline_s
        with self.lock:
            while len(self.requests) < n:
                left = end - time.monotonic()
                assert left > 0, f"timed out after {deadline_s} s waiting for {what}"
                self.lock.wait(left)

    def release(self):
        self.released.set()

    def stop(self):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
