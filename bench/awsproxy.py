"""A counting HTTP proxy in front of the AWS emulator: one JSON line per AWS call.

    python bench/awsproxy.py --upstream http://127.0.0.1:MOTO --log FILE \
        --listen helper=PORT --listen gahp=PORT ...

Each `--listen TAG=PORT` is a port on 127.0.0.1 whose calls are logged under TAG, so the
benchmarks can tell the helper's calls from a peer's. Requests are forwarded unchanged (Host
header included: HTCondor's ec2_gahp signs with the service and region it reads from the host
name, and moto picks the service from that signature). Stdlib only.

Logged per call: t (epoch seconds, when the request arrived), ms (until answered), tag,
service, action, status,
and for the calls the benchmarks reason about: DescribeInstances `first` (no NextToken: the
first page of a query) and `filters` (filter names); CreateFleet/RunInstances `annex` (the
htcondor-annex:name tag, if any) and `count` (TotalTargetCapacity, or MinCount/MaxCount).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


def describe_call(method: str, path: str, headers: dict[str, str], body: bytes) -> dict:
    """Service, action and the few parameters the benchmarks look at."""
    info: dict = {}
    auth = headers.get("authorization", "")
    if "Credential=" in auth:
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
        if len(scope) >= 4:
            info["service"] = scope[3]
    target = headers.get("x-amz-target", "")
    query = urllib.parse.urlsplit(path).query
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    ctype = headers.get("content-type", "")
    if body and "x-www-form-urlencoded" in ctype:
        params.update(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), True))
    if params.get("Action"):
        info["action"] = params["Action"]
    elif target:
        info["action"] = target.rsplit(".", 1)[-1]
    else:
        info["action"] = f"{method} {urllib.parse.urlsplit(path).path}"
    action = info["action"]
    if action == "DescribeInstances":
        info["first"] = "NextToken" not in params
        info["filters"] = sorted(
            v for k, v in params.items() if k.startswith("Filter.") and k.endswith(".Name")
        )
    elif action in ("CreateFleet", "RunInstances"):
        # TagSpecification.N.Tag.M.Key / .Value (RunInstances: TagSpecification.N...)
        keys = {k[: -len(".Key")]: v for k, v in params.items() if k.endswith(".Key")}
        for prefix, key in keys.items():
            if key == "htcondor-annex:name":
                info["annex"] = params.get(prefix + ".Value", "")
        if action == "CreateFleet":
            info["count"] = params.get("TargetCapacitySpecification.TotalTargetCapacity")
        else:
            info["count"] = params.get("MinCount")
            info["max_count"] = params.get("MaxCount")
    return info


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (its own timeout) is logged as status 599; no traceback."""


class Proxy:
    def __init__(self, upstream: str, log_path: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.log = open(log_path, "a", buffering=1)
        self.lock = threading.Lock()

    def record(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True)
        with self.lock:
            self.log.write(line + "\n")

    def handler(self, tag: str) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                t = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                lower = {k.lower(): v for k, v in headers.items()}
                entry = {"t": t, "tag": tag, **describe_call(self.command, self.path, lower, body)}
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    entry["status"] = resp.status
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError as err:
                    entry["status"] = 599
                    entry["error"] = str(err)
                    with contextlib.suppress(OSError):
                        self.send_error(502, "upstream unreachable or client gone")
                finally:
                    conn.close()
                    entry["ms"] = round((time.time() - t) * 1000, 1)
                    proxy.record(entry)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _forward

        return Handler

    def serve(self, tag: str, port: int) -> ThreadingHTTPServer:
        server = _Server(("127.0.0.1", port), self.handler(tag))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--listen", action="append", default=[], metavar="TAG=PORT")
    args = ap.parse_args()
    proxy = Proxy(args.upstream, args.log)
    for item in args.listen:
        tag, _, port = item.partition("=")
        proxy.serve(tag, int(port))
    threading.Event().wait()


if __name__ == "__main__":
    main()
