#!/usr/bin/env python3
"""Records every HTTP request it gets as one JSON line (method, path, headers, body) and answers
{"ok": true}: the Telegram Bot API as far as baileys-dr's notifications use it.

    http_capture.py PORT OUTPUT_FILE
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    port, output = int(sys.argv[1]), sys.argv[2]

    class Handler(BaseHTTPRequestHandler):
        def _record(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with open(output, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                     "body": body.decode("utf-8", "replace")}) + "\n")
            answer = json.dumps({"ok": True, "result": {"message_id": 1}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = _record

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
