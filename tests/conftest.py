"""Shared fixtures: one Ray instance per module, a generated corpus, tiny checkpoints, moto S3.

Plain helpers live in ``helpers.py``."""

from __future__ import annotations

import os

import pytest
from helpers import (
    CORPUS,
    HIDDEN,
    NO_EXT,
    NOT_IMAGE_EXT,
    PROVENANCE,
    free_port,
    own_ray,
    start_ray,
    tiny_model,
    write_files,
)

from aidetect_batch.detectors.checkpoints import save_checkpoint
from aidetect_batch.schema import Status


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", help="also run the slow tests (signals, clusters, restarts, the demo)"
    )


# Fixtures that start Ray: a test that uses one, directly or through another fixture, is marked ``ray``.
RAY_FIXTURES = {"ray_cluster", "ray_after_moto", "ray_with_state_api", "ray_with_a_gpu"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shared = {item.module.__name__ for item in items if "ray_cluster" in item.fixturenames}
    items.sort(key=lambda item: item.module.__name__ in shared)
    for item in items:
        if RAY_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.ray)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_shared_ray = {"gcs_address": None}


@pytest.fixture(scope="session", autouse=True)
def _scans_decode_in_their_task():
    """Scans here decode in their Ray task unless a test sets ``--decode-timeout``: the watchdog's forkserver
    costs a few seconds once per Ray worker process (BENCHMARKS.md), which is nothing in a real scan but adds
    about 5 s to each of this suite's forty short scans. tests/test_watchdog.py runs the watchdog itself, on
    its own and inside a Ray scan; the default of 120 s is checked there too."""
    from aidetect_batch.scan import config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DEFAULT_DECODE_TIMEOUT_S", 0.0)
        patch.setattr(config, "WATERMARK_DECODE_TIMEOUT_S", 0.0)
        yield


@pytest.fixture(autouse=True)
def _no_ray_unless_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts Ray in this process without the ``ray`` mark fails, so ``-m 'not ray'`` stays fast."""
    if request.node.get_closest_marker("ray") is not None:
        return
    import ray

    def refuse(*args, **kwargs):
        pytest.fail("this test starts Ray: mark it @pytest.mark.ray (or use a Ray fixture)")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance shared by every module that needs nothing special.

    Starting Ray and warming its workers costs about 8 s, so the instance outlives the module:
    collection runs these modules last and together, and the session's end shuts it down."""
    import ray

    if not (ray.is_initialized() and ray.get_runtime_context().gcs_address == _shared_ray["gcs_address"]):
        start_ray()
        _shared_ray["gcs_address"] = ray.get_runtime_context().gcs_address
    yield ray


@pytest.fixture(scope="module")
def ray_after_moto(s3_server):
    """Ray started after the AWS environment points at moto, so its workers inherit it."""
    with own_ray() as ray:
        yield ray


def pytest_sessionfinish(session: pytest.Session) -> None:
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A folder of good and broken images with expected statuses.

    Returns a dict with ``root``, ``default`` (path → status for the default listing)
    and ``all_files`` (path → status with ``--all-files``).
    """
    root = str(tmp_path_factory.mktemp("corpus"))
    listed = write_files(root, CORPUS + [(path, factory, Status.OK) for path, factory, _ in PROVENANCE])
    extra = write_files(root, NO_EXT + NOT_IMAGE_EXT)
    write_files(root, HIDDEN)
    os.makedirs(os.path.join(root, "empty_dir", "nested_empty"))
    return {"root": root, "default": listed, "all_files": {**listed, **extra}}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A resnet_tiny detector in the project's own format (1 logit, threshold 0.5)."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_checkpoint(path, tiny_model(), "resnet_tiny", info={"purpose": "tests"})
    return path


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 API), with the AWS environment pointing at it.

    fsspec caches filesystem instances, endpoint included, so the cache is cleared on both sides:
    a module's server never answers for another's."""
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
