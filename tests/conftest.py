"""Session-wide fixtures: one local Ray instance for every test that needs Ray, a real S3
protocol server (moto's standalone server on 127.0.0.1) that boto3 and pyarrow reach over HTTP,
and the CPU kernels built the ways this machine does not use by default."""

import os
import platform
import socket
import subprocess
import sys
import time

import pytest
import torch

from support import write_hf_model_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_DASHBOARD_PORT = _free_port()

# Fixed before Ray starts, so that Ray's workers inherit the S3 endpoint and credentials.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update({"AWS_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server as a separate process on 127.0.0.1; yields the endpoint URL."""
    import httpx

    port = S3_ENDPOINT.rsplit(":", 1)[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(S3_ENDPOINT, timeout=2)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto S3 server did not start")
            time.sleep(0.2)
    yield S3_ENDPOINT
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than this machine has cores (actors mostly wait)."""
    import ray

    # Report load to the Serve autoscaler every half second (default 10 s) so scaling tests are quick.
    env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)
    # Jobs submitted through the Ray Jobs API run `moeray ...` from this virtualenv, as they
    # would in a container image with moeray installed.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    ray.init(address="local", num_cpus=16, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=RAY_DASHBOARD_PORT, log_to_driver=False,
             runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_dashboard(ray_session):
    """The URL of the session Ray's dashboard, which serves the Ray Jobs API."""
    return f"http://127.0.0.1:{RAY_DASHBOARD_PORT}"


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A random transformers DeepseekV3 checkpoint with the tiny tokenizer: (folder, reference model)."""
    folder = tmp_path_factory.mktemp("engine-v3")
    return folder, write_hf_model_folder(folder, "v3", seed=11)


@pytest.fixture(scope="session")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 23, 40, 1, 12, 64)]


# Builds of the CPU kernels other than the one this machine uses by default: the same C code
# with 512-bit vectors, and with no vector intrinsics at all (what a machine without AVX2 runs).
KERNEL_VARIANTS = {"512-bit": ("-DMOERAY_VECTOR_BITS=512",), "portable": ("-march=x86-64",)}


@pytest.fixture(scope="session", params=sorted(KERNEL_VARIANTS))
def kernel_variant_library(request, tmp_path_factory):
    from moeray.kernels import cpu

    if cpu.library() is None:
        pytest.skip(f"no CPU kernels: {cpu.unavailable_reason()}")
    if request.param == "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the portable variant is the x86-64 baseline; other machines build it by default")
    target = tmp_path_factory.mktemp("kernels") / f"decode-{request.param}.so"
    cpu.build(target, KERNEL_VARIANTS[request.param])
    return cpu.load(target)


@pytest.fixture
def kernel_variant(kernel_variant_library, monkeypatch):
    """Every caller of `moeray.kernels.cpu.library()` gets the variant build for this test."""
    from moeray.kernels import cpu

    monkeypatch.setattr(cpu, "library", lambda: kernel_variant_library)
    return kernel_variant_library
