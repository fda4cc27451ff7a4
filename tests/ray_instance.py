"""A local Ray instance for the tests that serve on Ray: localhost only, bounded in time."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

# Ray Serve gives its HTTP proxy 5 s to start and 10 s per health check: on a busy 2-core machine
# (CI may share it with other work) both run out. Ray's processes inherit these from this one.
LOADED_MACHINE_TIMEOUTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "30",
}
START_ATTEMPTS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_ray() -> Iterator[tuple[str, str]]:
    """(Serve's base URL, Ray's temporary directory): Ray with 2 CPUs in a temporary directory of
    its own, Ray Serve's proxy on a free localhost port; the start is tried twice, and a Ray that
    cannot start fails the test saying so. Serve and Ray are stopped at the end."""
    import ray
    from ray import serve

    saved = {name: os.environ.get(name) for name in LOADED_MACHINE_TIMEOUTS}
    os.environ.update(LOADED_MACHINE_TIMEOUTS)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        url, errors = None, []
        for _ in range(START_ATTEMPTS):
            port = free_port()
            try:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                url = f"http://127.0.0.1:{port}"
                break
            except Exception as error:  # noqa: BLE001 - any start failure is retried once, then reported
                errors.append(f"{type(error).__name__}: {error}")
                with contextlib.suppress(Exception):
                    serve.shutdown()
                ray.shutdown()
        if url is None:
            pytest.fail(f"Ray itself could not start on this machine ({START_ATTEMPTS} tries): {errors}")
        try:
            yield url, temp_dir
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp_dir, ignore_errors=True)
