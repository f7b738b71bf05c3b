"""A real two-node Ray cluster on 127.0.0.1 (`ray start --head` + `ray start --address`): a scan submitted
with `ray job submit --working-dir`, as cluster/README.md documents it, and the upload page joining the cluster.

The second node advertises one logical GPU and one CPU, so the Classifier actor (1 GPU + 1 CPU) and the upload
page's replica can only land there and run on their CPU fallback; the head's two CPUs are left for decoding.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from helpers import encode, free_port, photo

from aidetect_batch import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")

pytestmark = pytest.mark.slow


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0"}


def node(*args: str) -> subprocess.Popen:
    """One `ray start --block` node in its own process group, so stopping it stops only its processes."""
    return subprocess.Popen(
        [RAY, "start", "--block", "--object-store-memory", str(300 * 2**20), *args],
        env=ray_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stop(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM every `ray start --block` (each stops its node's processes); SIGKILL the process groups after 5 s."""
    for proc in nodes:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def forget_cluster(gcs_port: int) -> None:
    """Remove `ray start`'s record of the cluster, as `ray stop` does, so a later `ray.init()` starts its own."""
    record = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
    with contextlib.suppress(FileNotFoundError):
        with open(record, encoding="utf-8") as handle:
            ours = handle.read().strip().endswith(f":{gcs_port}")
        if ours:
            os.remove(record)


@pytest.fixture(scope="module")
def cluster():
    """Dashboard address and GCS address of a head node (2 CPUs) and a GPU node (1 CPU, 1 logical GPU)."""
    gcs, dashboard = free_port(), free_port()
    head = node(
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    )
    nodes = [head]
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "token")  # the state API client sends ~/.ray/auth_token, as the ray CLI does
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for(lambda: len(alive_nodes(address)) == 1, head, "the head node")
        nodes.append(
            node(
                f"--address=127.0.0.1:{gcs}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--num-gpus=1",
                f"--dashboard-agent-listen-port={free_port()}",
                "--disable-usage-stats",
            )
        )
        wait_for(lambda: len(alive_nodes(address)) == 2, nodes[1], "the GPU node")
        yield address, f"127.0.0.1:{gcs}"
    finally:
        stop(nodes)
        patch.undo()
        forget_cluster(gcs)


def alive_nodes(address: str) -> list:
    from ray.util.state import list_nodes

    try:
        return list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the dashboard answers only once it is up
        return []


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited: {proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{what} did not come up in {timeout:.0f} s"
        time.sleep(1)


def node_ids(address: str) -> tuple[str, str]:
    """(CPU node, GPU node) ids."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, raise_on_missing_output=False)
    gpu = [n.node_id for n in nodes if n.resources_total.get("GPU", 0) >= 1]
    cpu = [n.node_id for n in nodes if n.resources_total.get("GPU", 0) == 0]
    assert len(gpu) == 1 and len(cpu) == 1, nodes
    return cpu[0], gpu[0]


def test_scan_submitted_to_a_two_node_cluster(cluster, tmp_path, tiny_checkpoint):
    from ray.util.state import list_actors, list_tasks

    address, _ = cluster

    images = tmp_path / "dump"
    for folder in ("a", "b"):
        (images / folder).mkdir(parents=True)
        for i in range(12):
            (images / folder / f"{i:02d}.jpg").write_bytes(encode(photo(160, 120, seed=i), "JPEG", quality=90))
    (images / "b" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"

    submitted = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/scan.py",
            str(images),
            "--checkpoint",
            tiny_checkpoint,
            "--out",
            str(out),
            "--batch-size",
            "8",
        ],
        cwd=REPO,
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert "succeeded" in logs and "scanned 25 files: ok 24, failed 1" in logs, logs[-4000:]
    assert "progress: 25/25 inputs (100.0%), 25 rows: ok 24, failed 1" in logs, "the progress line reaches the job log"

    table = pq.read_table(out / schema.SCORES_DIR)
    assert table.num_rows == 25 and table.column(schema.STATUS).to_pylist().count("ok") == 24
    run = json.loads((out / schema.RUN_FILE).read_text())
    assert run["cluster_resources"]["GPU"] == 1.0 and run["cluster_resources"]["CPU"] == 3.0
    assert run["resolved"]["classifier"]["num_gpus"] == 1

    cpu_node, gpu_node = node_ids(address)
    actors = list_actors(address=address, limit=10_000, raise_on_missing_output=False)
    classifiers = [a for a in actors if "Classifier" in a.class_name]
    assert classifiers and {a.node_id for a in classifiers} == {gpu_node}, "the Classifier needs the (logical) GPU"
    tasks = list_tasks(address=address, limit=10_000, raise_on_missing_output=False)
    decodes = [t for t in tasks if "prepare_batch" in t.name and t.node_id]
    assert decodes and {t.node_id for t in decodes} == {cpu_node}, "decoding runs on the CPU node"


def test_upload_page_joins_the_cluster_and_stops_on_ctrl_c(cluster, tiny_checkpoint):
    from ray.util.state import list_actors

    address, gcs = cluster
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aidetect_batch", "serve", "--checkpoint", tiny_checkpoint, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**ray_env(), "RAY_ADDRESS": gcs},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("upload page: ") for line in list(lines)):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the page never came up:\n" + "".join(lines)
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        photo_bytes = encode(photo(300, 200, seed=1), "JPEG")
        request = urllib.request.Request(url + "score?name=p.jpg", data=photo_bytes, method="POST")
        with urllib.request.urlopen(request, timeout=60) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "ok" and 0.0 <= body["score"] <= 1.0 and body["model"]["device"] == "cpu"
        replicas = [
            a
            for a in list_actors(address=address, limit=10_000, raise_on_missing_output=False)
            if "UploadPage" in a.class_name and a.state == "ALIVE"
        ]
        assert [a.node_id for a in replicas] == [node_ids(address)[1]], "the replica takes the GPU node's GPU"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
        output = "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "upload page stopped" in output
