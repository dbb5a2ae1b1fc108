import socket
import time

import pytest

from support import write_hf_model_folder, write_random_adapter

from support import API_KEY  # noqa: F401 (re-exported for tests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-model")
    write_hf_model_folder(folder, "v3", seed=21)
    return folder


@pytest.fixture(scope="session")
def serve_port(ray_session):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def deploy(settings: dict, route_prefix: str, port: int, name: str) -> str:
    """Run one moeray Serve app and wait until it answers /health; returns its base URL."""
    import httpx
    from ray import serve

    from moeray.platform.serve_app import build_app

    serve.run(build_app(settings), name=name, route_prefix=route_prefix, blocking=False)
    base = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"app {name} did not become healthy")


@pytest.fixture(scope="session")
def lora_adapter(model_folder, tmp_path_factory):
    """(adapter folder, the in-memory base model with that adapter applied, unmerged)."""
    folder = tmp_path_factory.mktemp("served-adapter")
    return folder, write_random_adapter(model_folder, folder, seed=8)


@pytest.fixture(scope="session")
def served(serve_port, model_folder, lora_adapter):
    """The main app: the tiny transformers checkpoint, API keys on, one LoRA adapter beside it."""
    settings = {"model": str(model_folder), "served_model_name": "tiny-moe", "api_keys": [API_KEY],
                "lora_adapters": {"tiny-moe-lora": str(lora_adapter[0])},
                "engine": {"max_model_len": 256, "block_size": 4, "num_cache_blocks": 2048}}
    return deploy(settings, "/", serve_port, "main")
