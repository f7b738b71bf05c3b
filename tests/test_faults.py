"""Faults during a scan: a Classifier actor killed mid-job, and an S3 endpoint that throttles, fails and drops."""

import collections
import http.client
import http.server
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode, free_port, own_ray, photo

from aidetect_batch import schema
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan


@pytest.fixture(scope="module")
def ray_with_state_api(s3_server):
    """Ray with its dashboard, so the test can find the Classifier actor's process; started after moto."""
    with own_ray(include_dashboard=True) as ray:
        yield ray


def write_photos(root, n, side=160):
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(root, f"p{i:04d}.jpg")
        with open(path, "wb") as handle:
            handle.write(encode(photo(side, side, seed=i % 40 + 1), "JPEG", quality=90))
        paths.append(path)
    return paths


def classifier_actor_pids():
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if "Classifier" in a.class_name]


@pytest.mark.slow
def test_a_killed_classifier_actor_is_replaced_and_no_row_is_lost(ray_with_state_api, tiny_checkpoint, tmp_path):
    paths = write_photos(str(tmp_path / "imgs"), 300)
    killed = []

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = classifier_actor_pids()
            if pids:
                time.sleep(1.0)
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], time.monotonic()))
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    cfg = ScanConfig(
        sources=(str(tmp_path / "imgs"),), out=str(tmp_path / "out"), checkpoint=tiny_checkpoint, batch_size=8
    )
    result = run_scan(cfg)
    finished = time.monotonic()
    thread.join(timeout=5)
    assert killed and killed[0][1] < finished, "an actor was killed while the scan ran"
    table = pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR))
    assert sorted(table.column(schema.PATH).to_pylist()) == sorted(paths)
    assert result.summary.ok == len(paths)


class FaultyS3Proxy(http.server.ThreadingHTTPServer):
    """Forwards S3 requests to moto; the first tries of each object read are throttled, fail or get dropped."""

    FAULTS = ("throttle", "drop", "error")

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.tries = collections.Counter()
        self.injected = collections.Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _ProxyHandler)

    def fault_for(self, method, path):
        if method not in ("GET", "HEAD") or "?" in path or path.count("/") < 2:
            return None
        with self.lock:
            self.tries[path] += 1
            attempt = self.tries[path]
        fault = self.FAULTS[attempt - 1] if attempt <= len(self.FAULTS) else None
        if fault:
            with self.lock:
                self.injected[fault] += 1
        return fault


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.server.fault_for(self.command, self.path)
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault in ("throttle", "error"):
            code, name = (503, "SlowDown") if fault == "throttle" else (500, "InternalError")
            payload = f"<Error><Code>{name}</Code><Message>injected</Message></Error>".encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.mark.slow  # a whole Ray scan: moved out of the default suite to keep it under 10 minutes (--runslow)
def test_transient_s3_errors_are_retried_and_a_missing_object_is_a_row(
    ray_with_state_api, s3_server, tiny_checkpoint, tmp_path
):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.mkdir("flaky")
    keys = [f"flaky/d/{i}.jpg" for i in range(6)]
    for i, key in enumerate(keys):
        fs.pipe_file(key, encode(photo(120, 120, seed=i + 1), "JPEG"))
    proxy = FaultyS3Proxy(int(s3_server.rsplit(":", 1)[1]))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        manifest = str(tmp_path / "m.parquet")
        pq.write_table(pa.table({"path": [f"s3://{k}" for k in keys] + ["s3://flaky/d/missing.jpg"]}), manifest)
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
        cfg = ScanConfig(
            sources=(),
            manifest=manifest,
            out=str(tmp_path / "out"),
            checkpoint=tiny_checkpoint,
            storage_options={"endpoint_url": endpoint},
        )
        result = run_scan(cfg)
    finally:
        proxy.shutdown()
    rows = {r[schema.PATH]: r for r in pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR)).to_pylist()}
    assert all(rows[f"s3://{k}"][schema.STATUS] == "ok" for k in keys)
    missing = rows["s3://flaky/d/missing.jpg"]
    assert missing[schema.STATUS] == "unreadable" and "FileNotFoundError" in missing[schema.ERROR]
    assert result.summary.ok == len(keys)
    assert all(proxy.injected[fault] >= len(keys) for fault in FaultyS3Proxy.FAULTS), proxy.injected
