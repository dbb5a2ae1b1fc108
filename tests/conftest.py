"""Session-wide fixtures: one local Ray instance for every test that needs Ray, a real S3
protocol server (moto's standalone server on 127.0.0.1) that boto3 and pyarrow reach over HTTP,
and the CPU kernels built the ways this machine does not use by default. Servers bind the ports
they listen on themselves (port 0) wherever they can, so no port is picked long before use."""

import os
import platform
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from support import write_hf_model_folder

# Fake credentials for moto, fixed before anything reads them (boto3 and Ray's workers alike).
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"})


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server as a separate process on 127.0.0.1, on a port it binds itself (port 0,
    read back from its start-up line); ready once a real `list_buckets` answers. Sets
    AWS_ENDPOINT_URL for this process and, since Ray starts after it, for Ray's workers."""
    import boto3

    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    endpoint, deadline = None, time.monotonic() + 60
    while endpoint is None:
        line = server.stderr.readline()
        if not line or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("moto S3 server did not start")
        match = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
        endpoint = match.group(1) if match else None
    # Keep draining its log so the server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    while True:
        try:
            boto3.client("s3").list_buckets()
            break
        except Exception:  # noqa: BLE001 - not answering yet
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto S3 server does not answer list_buckets") from None
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_context(s3_server):
    """A local Ray with more logical CPUs than this machine has cores (actors mostly wait); its
    dashboard (the Ray Jobs API) on a port Ray picks itself."""
    import ray

    # Report load to the Serve autoscaler every half second (default 10 s) so scaling tests are quick.
    # Ray Train's controller polls its workers every 0.2 s (default 2 s): a worker's second
    # `ray.train.report` waits until the controller took the first (a queue of one), so every
    # checkpoint after the first, the start and the end of each run waited up to 2 s for a poll.
    # A poll that misses its deadline is not a failure (only one hanging for 10 min is).
    env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    os.environ.update(env)
    # Jobs submitted through the Ray Jobs API run `moeray ...` from this virtualenv, as they
    # would in a container image with moeray installed.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    context = ray.init(address="local", num_cpus=16, include_dashboard=True, dashboard_host="127.0.0.1",
                       log_to_driver=False, runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}})
    yield context
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_context):
    import ray

    return ray


@pytest.fixture(scope="session")
def ray_dashboard(ray_context):
    """The URL of the session Ray's dashboard, which serves the Ray Jobs API."""
    return f"http://{ray_context.dashboard_url}"


@pytest.fixture(scope="session")
def serve_port(ray_session):
    """Serve's HTTP proxy on the session Ray; the port its apps answer on."""
    from ray import serve

    from support import unused_port

    port = unused_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture
def deployed(serve_port):
    """`deploy(settings, route_prefix, name)` for one test: the app, and the actors it shares, are
    deleted after the test."""
    from support import deploy, undeploy

    names = []

    def run(settings: dict, route_prefix: str, name: str) -> str:
        names.append(name)
        return deploy(settings, route_prefix, serve_port, name)

    yield run
    for name in names:
        undeploy(name)


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
    return target


@pytest.fixture
def kernel_variant(kernel_variant_library, monkeypatch):
    """Every caller of `moeray.kernels.cpu.library()` and `library_path()` (the native decoder)
    gets the variant build for this test."""
    from moeray.kernels import cpu

    library = cpu.load(kernel_variant_library)
    monkeypatch.setattr(cpu, "library", lambda: library)
    monkeypatch.setattr(cpu, "library_path", lambda: kernel_variant_library)
    return library
