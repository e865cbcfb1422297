"""A local AWS-API server (moto, SNS+SQS+S3) on 127.0.0.1 with a fault-injection layer.

The tests start it in a thread on a free port (``AwsServer().start()``); CI
can run it as a process: ``python tests/awsserver.py [--port N]`` prints the
endpoint URL and serves until killed. It never binds anything but 127.0.0.1.

Faults are injected in front of moto, on the wire, so the clients see exactly
what AWS would send and their real retry code runs:

* :meth:`AwsServer.throttle` — the next *n* calls of an operation fail with the
  service's own throttling error (SNS ``Throttling``, SQS ``ThrottlingException``,
  S3 ``503 SlowDown``, Lambda ``429 TooManyRequestsException``);
* :meth:`AwsServer.fail_batch_entries` — the next *n* SNS ``PublishBatch`` calls
  publish all but their first *k* entries and report those as ``Failed``;
* :meth:`AwsServer.mangle_receives` — the next *n* SQS ``ReceiveMessage`` answers
  come back reversed and with every message twice (at-least-once, any order);
* :meth:`AwsServer.swallow_publishes` — the next *n* SNS ``PublishBatch`` calls are
  answered "all published" but go nowhere (a subscription that does not deliver yet).

``requests`` counts every call by operation (faulted ones included).
"""
from __future__ import annotations

import io
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import parse_qsl, urlencode

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

_SERVICE_IN_AUTH = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")
_ENTRY_FIELD = re.compile(r"^PublishBatchRequestEntries\.member\.(\d+)\.(.*)$")


def _operation(request: Request, body: bytes) -> tuple[str, str]:
    """(service, operation) of a signed AWS request, as far as the fault rules need it."""
    match = _SERVICE_IN_AUTH.search(request.headers.get("Authorization", ""))
    service = match.group(1) if match else ""
    target = request.headers.get("X-Amz-Target", "")
    if target:
        return service, target.rsplit(".", 1)[-1]
    if service == "lambda" and request.method == "POST" and request.path.endswith("/invocations"):
        return service, "Invoke"
    if service == "s3":
        path = request.path.strip("/")
        has_key = "/" in path
        if request.method == "GET":
            return service, "GetObject" if has_key else "ListObjects"
        if request.method == "PUT":
            return service, "PutObject" if has_key else "CreateBucket"
        if request.method == "POST" and "delete" in request.args:
            return service, "DeleteObjects"
        return service, f"{request.method}Object" if has_key else f"{request.method}Bucket"
    return service, dict(parse_qsl(body.decode("utf-8", "replace"))).get("Action", "")


def _throttle_response(service: str) -> Response:
    if service == "s3":
        body = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        return Response(body, status=503, content_type="application/xml")
    if service == "lambda":  # Invoke beyond the function's (or account's) concurrency
        return Response(json.dumps({"Type": "User", "message": "Rate Exceeded.",
                                    "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded"}),
                        status=429, content_type="application/json",
                        headers={"x-amzn-ErrorType": "TooManyRequestsException"})
    if service == "sqs":
        return Response(json.dumps({"__type": "com.amazonaws.sqs#ThrottlingException",
                                    "message": "Rate exceeded"}),
                        status=400, content_type="application/x-amz-json-1.0")
    body = ("<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>"
            "<Message>Rate exceeded</Message></Error><RequestId>fault</RequestId></ErrorResponse>")
    return Response(body, status=400, content_type="text/xml")


def _drop_batch_entries(body: bytes, k: int) -> tuple[bytes, list[str]]:
    """The PublishBatch form without its first ``k`` entries (renumbered), and their Ids."""
    kept, dropped = [], []
    for name, value in parse_qsl(body.decode("utf-8"), keep_blank_values=True):
        match = _ENTRY_FIELD.match(name)
        if match is None:
            kept.append((name, value))
            continue
        index, field = int(match.group(1)), match.group(2)
        if index <= k:
            if field == "Id":
                dropped.append(value)
        else:
            kept.append((f"PublishBatchRequestEntries.member.{index - k}.{field}", value))
    return urlencode(kept).encode(), dropped


def _add_failed_entries(xml: bytes, ids: Iterable[str]) -> bytes:
    members = "".join(f"<member><Id>{i}</Id><Code>InternalError</Code><Message>injected failure</Message>"
                      f"<SenderFault>false</SenderFault></member>" for i in ids)
    text = xml.decode()
    if "<Failed/>" in text:
        return text.replace("<Failed/>", f"<Failed>{members}</Failed>").encode()
    if "<Failed>" in text:
        return text.replace("<Failed>", f"<Failed>{members}", 1).encode()
    return text.replace("</PublishBatchResult>", f"<Failed>{members}</Failed></PublishBatchResult>").encode()


def _swallowed_batch(body: bytes) -> Response:
    ids = [v for k, v in parse_qsl(body.decode("utf-8")) if (m := _ENTRY_FIELD.match(k)) and m.group(2) == "Id"]
    members = "".join(f"<member><Id>{i}</Id><MessageId>swallowed-{i}</MessageId></member>" for i in ids)
    xml = (f'<PublishBatchResponse xmlns="http://sns.amazonaws.com/doc/2010-03-31/"><PublishBatchResult>'
           f"<Successful>{members}</Successful><Failed/></PublishBatchResult>"
           f"<ResponseMetadata><RequestId>fault</RequestId></ResponseMetadata></PublishBatchResponse>")
    return Response(xml, status=200, content_type="text/xml")


def _mangle_messages(body: bytes) -> bytes:
    answer = json.loads(body or b"{}")
    messages = answer.get("Messages", [])
    answer["Messages"] = [m for m in reversed(messages) for _ in range(2)]
    return json.dumps(answer).encode()


@dataclass
class _Rule:
    operation: str
    remaining: int
    apply: Callable[[str, Request, bytes, Callable[[bytes], Response]], Response]


class FaultInjector:
    """WSGI middleware: counts calls by operation and applies one-shot fault rules."""

    def __init__(self, app):
        self.app = app
        self.requests: Counter[str] = Counter()
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()

    def add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.requests.clear()

    def _take_rule(self, operation: str) -> _Rule | None:
        with self._lock:
            self.requests[operation] += 1
            for rule in self._rules:
                if rule.operation == operation and rule.remaining > 0:
                    rule.remaining -= 1
                    return rule
        return None

    def __call__(self, environ, start_response):
        request = Request(environ)
        body = request.get_data(cache=True)
        service, operation = _operation(request, body)
        rule = self._take_rule(operation)
        if rule is None:
            return self._forward(environ, body)(environ, start_response)
        return rule.apply(service, request, body, lambda b: self._forward(environ, b))(environ, start_response)

    def _forward(self, environ, body: bytes) -> Response:
        """moto's answer to the request with ``body`` (possibly rewritten)."""
        request = Request(dict(environ))
        request.environ["CONTENT_LENGTH"] = str(len(body))
        request.environ["wsgi.input"] = io.BytesIO(body)
        return Response.from_app(self.app, request.environ, buffered=True)


class AwsServer:
    """moto's SNS/SQS/S3 over HTTP on 127.0.0.1, in a thread, behind a :class:`FaultInjector`."""

    def __init__(self, port: int = 0):
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.faults = FaultInjector(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", port, self.faults, threaded=True)
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> Counter[str]:
        return self.faults.requests

    def start(self) -> "AwsServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="aws-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def throttle(self, operation: str, times: int) -> None:
        self.faults.add(_Rule(operation, times, lambda service, *_: _throttle_response(service)))

    def fail_batch_entries(self, times: int, first: int) -> None:
        def apply(service, request, body, forward):
            rest, dropped = _drop_batch_entries(body, first)
            answer = forward(rest)
            answer.set_data(_add_failed_entries(answer.get_data(), dropped))
            return answer

        self.faults.add(_Rule("PublishBatch", times, apply))

    def swallow_publishes(self, times: int) -> None:
        self.faults.add(_Rule("PublishBatch", times, lambda service, request, body, forward: _swallowed_batch(body)))

    def mangle_receives(self, times: int) -> None:
        def apply(service, request, body, forward):
            answer = forward(body)
            answer.set_data(_mangle_messages(answer.get_data()))
            return answer

        self.faults.add(_Rule("ReceiveMessage", times, apply))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Serve moto's SNS/SQS/S3 on 127.0.0.1 until killed.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    server = AwsServer(parser.parse_args(argv).port).start()
    print(server.endpoint_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
