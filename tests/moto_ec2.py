"""moto's EC2 as a real HTTP server on 127.0.0.1, behind a small WSGI middleware that can answer
the next call of an action with a real EC2 error (the status code AWS uses) and counts actions."""

from __future__ import annotations

import base64
import io
import threading
import urllib.request
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

from werkzeug.serving import make_server

ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>test</RequestID></Response>"
)


CONSOLE_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><GetConsoleOutputResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
    "<requestId>test</requestId><instanceId>{instance}</instanceId><timestamp>2026-01-01T00:00:00.000Z</timestamp>"
    "<output>{output}</output></GetConsoleOutputResponse>"
)


class MotoEc2:
    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.app = DomainDispatcherApplication(create_backend_app)
        self.fail_next: dict[str, tuple[str, int, str]] = {}
        self.calls: Counter[str] = Counter()
        # What GetConsoleOutput answers (decoded text), when set; moto's own has no host keys.
        self.console: str | None = None
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        action = (parse_qs(body.decode(errors="replace")).get("Action") or [""])[0]
        if action:
            self.calls[action] += 1
        if action in self.fail_next:
            code, status, message = self.fail_next.pop(action)
            data = ERROR_XML.format(code=code, message=message).encode()
            start_response(f"{status} Error", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
            return [data]
        if action == "GetConsoleOutput" and self.console is not None:
            instance = (parse_qs(body.decode()).get("InstanceId") or [""])[0]
            output = base64.b64encode(self.console.encode()).decode()
            data = CONSOLE_XML.format(instance=instance, output=output).encode()
            start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
            return [data]
        return self.app(environ, start_response)

    def start(self) -> None:
        self.thread.start()

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")).read()
        self.fail_next.clear()
        self.calls.clear()
        self.console = None

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)
