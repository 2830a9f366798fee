"""A local HTTP server that plays Sentry's ingest for end-to-end tests.

It speaks the part of the protocol an SDK uses: POST /api/<project>/envelope/
(and the legacy /api/<project>/store/), bodies compressed with gzip, deflate or
br (Content-Encoding), authentication by the X-Sentry-Auth header or the
sentry_key query parameter. Envelopes are parsed item by item the way Relay
does (header line, then per item a header line and a payload of `length`
bytes or up to the next newline), and kept with the raw request bytes so that
tests can assert on both.

Used as a fixture (tests/integration/test_sentry_callback.py) or by hand:

    python tests/sentry_ingest.py --port 9000 --public-key publickey

prints one JSON line per item received.
"""

import argparse
import gzip
import json
import re
import signal
import sys
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

try:
    import brotli
except ImportError:  # the SDK only compresses with br when brotli is importable
    brotli = None

PATH_RE = re.compile(r"^/api/(?P<project>[0-9]+)/(?P<endpoint>envelope|store)/?$")


class EnvelopeError(ValueError):
    """A request body that is not a well-formed envelope."""


@dataclass
class Item:
    headers: dict
    payload: bytes

    @property
    def type(self):
        return self.headers.get("type")

    def json(self):
        return json.loads(self.payload)


@dataclass
class Envelope:
    headers: dict
    items: list = field(default_factory=list)


@dataclass
class Request:
    """One accepted request: what came over the wire and what it meant."""
    project: str
    endpoint: str
    headers: dict
    raw: bytes  # the body as sent (possibly compressed)
    body: bytes  # the body decompressed
    envelope: Envelope


def decompress(body, encoding):
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    if encoding == "deflate":
        # HTTP "deflate" is zlib-wrapped, but raw deflate is seen in the wild.
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    if encoding == "br":
        if brotli is None:
            raise EnvelopeError("Content-Encoding br needs the brotli module")
        return brotli.decompress(body)
    raise EnvelopeError("unsupported Content-Encoding %r" % encoding)


def parse_envelope(data):
    """Split an envelope into its header and items (Relay's framing rules)."""
    lines = data.split(b"\n", 1)
    try:
        headers = json.loads(lines[0])
    except ValueError as exc:
        raise EnvelopeError("envelope header is not JSON: %s" % exc) from None
    envelope = Envelope(headers=headers)
    rest = lines[1] if len(lines) > 1 else b""
    while rest.strip(b"\n"):
        header_line, _, rest = rest.partition(b"\n")
        if not header_line:
            continue
        try:
            item_headers = json.loads(header_line)
        except ValueError as exc:
            raise EnvelopeError("item header is not JSON: %s" % exc) from None
        length = item_headers.get("length")
        if length is not None:
            if len(rest) < length:
                raise EnvelopeError("item of type %s is shorter than its length %d" % (item_headers.get("type"), length))
            payload, rest = rest[:length], rest[length:]
            if rest.startswith(b"\n"):
                rest = rest[1:]
        else:
            payload, _, rest = rest.partition(b"\n")
        envelope.items.append(Item(headers=item_headers, payload=payload))
    return envelope


def auth_key(headers, query):
    """The public key the client authenticated with (header or query string)."""
    auth = headers.get("X-Sentry-Auth", "")
    match = re.search(r"sentry_key=([^,\s]+)", auth)
    if match:
        return match.group(1)
    return (parse_qs(query).get("sentry_key") or [None])[0]


class IngestServer:
    """Sentry ingest on 127.0.0.1: start(), read .requests / .events() / .checkins(), stop()."""

    def __init__(self, host="127.0.0.1", port=0, public_key=None):
        self.public_key = public_key
        self.requests = []
        self.rejected = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._thread = None

    @property
    def port(self):
        return self._server.server_address[1]

    def dsn(self, project=1):
        return "http://%s@127.0.0.1:%d/%d" % (self.public_key or "publickey", self.port, project)

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, name="sentry-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def clear(self):
        with self._lock:
            self.requests.clear()
            self.rejected.clear()

    def _record(self, request, rejected=False):
        with self._arrived:
            (self.rejected if rejected else self.requests).append(request)
            self._arrived.notify_all()

    def items(self, item_type=None):
        with self._lock:
            return [item for request in self.requests for item in request.envelope.items
                    if item_type is None or item.type == item_type]

    def events(self):
        return [item.json() for item in self.items("event")]

    def checkins(self):
        return [item.json() for item in self.items("check_in")]

    def body_bytes(self):
        """Every accepted request body, as sent (compressed) and decompressed: where secrets must not be."""
        with self._lock:
            return b"\n".join(part for request in self.requests for part in (request.raw, request.body))

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                url = urlsplit(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers.items())
                match = PATH_RE.match(url.path)
                if not match:
                    server._record(Request("", "", headers, raw, b"", Envelope({})), rejected=True)
                    return self._reply(404, {"detail": "no such endpoint %s" % url.path})
                if server.public_key is not None and auth_key(self.headers, url.query) != server.public_key:
                    server._record(Request(match["project"], match["endpoint"], headers, raw, b"", Envelope({})), rejected=True)
                    return self._reply(401, {"detail": "bad sentry_key"})
                try:
                    body = decompress(raw, self.headers.get("Content-Encoding"))
                    if match["endpoint"] == "store":
                        # The legacy endpoint takes one event as JSON: keep it as a one-item envelope.
                        event = json.loads(body)
                        envelope = Envelope({"event_id": event.get("event_id")},
                                            [Item({"type": "event", "length": len(body)}, body)])
                    else:
                        envelope = parse_envelope(body)
                except (EnvelopeError, OSError, zlib.error, ValueError) as exc:
                    server._record(Request(match["project"], match["endpoint"], headers, raw, b"", Envelope({})), rejected=True)
                    return self._reply(400, {"detail": str(exc)})
                server._record(Request(match["project"], match["endpoint"], headers, raw, body, envelope))
                self._reply(200, {"id": envelope.headers.get("event_id")})

        return Handler


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--public-key", help="reject requests authenticated with another key")
    args = parser.parse_args(argv)
    ingest = IngestServer(args.host, args.port, args.public_key)
    seen = 0
    ingest.start()
    # SIGTERM ends it like Ctrl-C (a background job of a script ignores SIGINT).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print("listening; DSN %s" % ingest.dsn(), file=sys.stderr, flush=True)
    try:
        while True:
            with ingest._arrived:
                ingest._arrived.wait(timeout=1)
                fresh = ingest.requests[seen:]
                seen = len(ingest.requests)
            for request in fresh:
                for item in request.envelope.items:
                    print(json.dumps({"project": request.project, "item": item.headers,
                                      "payload": item.payload.decode("utf-8", "replace")}), flush=True)
    except (KeyboardInterrupt, SystemExit):
        ingest.stop()


if __name__ == "__main__":
    main()
