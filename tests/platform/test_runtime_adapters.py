"""LoRA adapters loaded at runtime, in one process: vLLM's admin routes (auth, errors), a loaded
adapter that answers as the adapted model does, `max_loras` with least-recently-used eviction,
adapters found under an S3 prefix (moto's server) on first use, and an adapter loaded again
under its old name that never reuses the old weights' prefix cache."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from moeray.engine import EngineConfig
from moeray.engine.build import build_engine
from moeray.model.tokenizer import Tokenizer
from moeray.platform.adapters import local_catalog
from moeray.platform.openai_api import LocalClient, build_openai_app
from moeray.platform.protocol import OpenAIError
from moeray.platform.service import ReplicaService
from moeray.platform.settings import ServeSettings
from moeray.storage import upload_dir
from support import moeray_greedy, write_hf_model_folder, write_random_adapter

API_KEY, ADMIN_KEY = "sk-user", "sk-admin"
USER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = [5, 9, 17, 33, 2, 8, 8, 40, 41, 42, 43, 44, 45]
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime-adapters-model")
    write_hf_model_folder(folder, "v3", seed=21)
    return folder


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    """name -> (folder, the adapted reference model) for three different adapters."""
    out = {}
    for seed, name in enumerate(("sql", "poem", "chess"), start=3):
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        out[name] = (folder, write_random_adapter(model, folder, seed=seed))
    return out


def serve(model, **settings):
    """(TestClient of the OpenAI app, the replica service) over one in-process engine."""
    settings = ServeSettings(model=str(model), served_model_name="tiny", **settings)
    config = EngineConfig(max_model_len=128, block_size=4, num_cache_blocks=256)
    service = ReplicaService(lambda: build_engine(model, config), max_loras=settings.max_loras)
    app = build_openai_app(LocalClient(service), settings, catalog=local_catalog(settings))
    return TestClient(app, raise_server_exceptions=False), service


@pytest.fixture
def served(model):
    client, service = serve(model, api_keys=[API_KEY], admin_api_keys=[ADMIN_KEY], max_loras=2)
    with client:
        yield client, service
    service.shutdown()


def expected_text(model, reference) -> str:
    return Tokenizer.from_pretrained(model).decode(moeray_greedy(reference, PROMPT, GREEDY["max_tokens"]))


def complete(client, name: str):
    return client.post("/v1/completions", headers=USER, json={"model": name, "prompt": PROMPT, **GREEDY})


def load(client, name: str, path, headers=ADMIN):
    return client.post("/v1/load_lora_adapter", headers=headers, json={"lora_name": name, "lora_path": str(path)})


def unload(client, name: str, headers=ADMIN):
    return client.post("/v1/unload_lora_adapter", headers=headers, json={"lora_name": name})


def test_a_loaded_adapter_answers_as_the_adapted_model_until_it_is_unloaded(served, model, adapters):
    client, _ = served
    folder, reference = adapters["sql"]
    response = load(client, "sql", folder)
    assert response.status_code == 200 and "sql" in response.text
    listed = client.get("/v1/models", headers=USER).json()["data"]
    assert [(m["id"], m["parent"]) for m in listed] == [("tiny", None), ("sql", "tiny")]
    answer = complete(client, "sql")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "sql"
    assert answer.json()["choices"][0]["text"] == expected_text(model, reference)
    assert complete(client, "tiny").json()["choices"][0]["text"] != answer.json()["choices"][0]["text"]

    assert unload(client, "sql").status_code == 200
    gone = complete(client, "sql")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    assert [m["id"] for m in client.get("/v1/models", headers=USER).json()["data"]] == ["tiny"]


def test_the_admin_routes_take_only_admin_keys(model, adapters):
    folder = adapters["sql"][0]
    client, service = serve(model, api_keys=[API_KEY], admin_api_keys=[ADMIN_KEY])
    with client:
        for headers in ({}, USER, {"Authorization": "Bearer nope"}):
            refused = load(client, "sql", folder, headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert unload(client, "sql", USER).status_code == 401
        assert load(client, "sql", folder).status_code == 200
    service.shutdown()

    client, service = serve(model, api_keys=[API_KEY])  # keys for users, none for admins: closed
    with client:
        closed = load(client, "sql", folder, USER)
        assert closed.status_code == 403 and "admin_api_keys" in closed.json()["error"]["message"]
    service.shutdown()


def test_bad_loads_are_named(served, model, adapters, tmp_path):
    client, service = served
    missing = load(client, "x", tmp_path / "nowhere")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
    assert "adapter 'x'" in missing.json()["error"]["message"] and "nowhere" in missing.json()["error"]["message"]
    bad_name = load(client, "../etc", adapters["sql"][0])
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "lora_name"
    assert load(client, "tiny", adapters["sql"][0]).json()["error"]["param"] == "lora_name"  # the base model's name
    no_path = client.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "x"})
    assert no_path.status_code == 400 and no_path.json()["error"]["param"] == "lora_path"
    assert unload(client, "never-loaded").status_code == 404

    assert load(client, "sql", adapters["sql"][0]).status_code == 200
    again = load(client, "sql", adapters["poem"][0])
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]

    # A config that reads fine over weights that do not fit this model: refused by the replica's
    # load, and not left in the catalog.
    other = tmp_path / "other-model"
    write_hf_model_folder(other, "v3", seed=1, hidden_size=48)
    write_random_adapter(other, tmp_path / "misfit", seed=1)
    misfit = load(client, "misfit", tmp_path / "misfit")
    assert misfit.status_code == 400 and "misfit" in misfit.json()["error"]["message"], misfit.text
    assert "misfit" not in [m["id"] for m in client.get("/v1/models", headers=USER).json()["data"]]
    assert service.async_engine.is_running


def test_max_loras_evicts_the_least_recently_used_adapter_and_reloads_it_on_demand(served, model, adapters):
    client, service = served
    for name, (folder, _) in adapters.items():
        assert load(client, name, folder).status_code == 200  # each load runs on the replica: 2 slots
    assert service.stats().lora_adapters == ["chess", "poem"] and service.stats().lora_evictions_total == 1
    for name in ("sql", "poem", "sql", "chess", "poem"):  # two slots, so every other use evicts
        answer = complete(client, name)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected_text(model, adapters[name][1]), name
        assert name in service.stats().lora_adapters and len(service.stats().lora_adapters) <= 2
    stats = service.stats()
    assert stats.lora_adapters == ["chess", "poem"]
    assert (stats.lora_loads_total, stats.lora_evictions_total) == (7, 5)
    assert len(service.engine.adapters) == 2  # evicted adapters left the engine too


def test_busy_slots_refuse_with_503_and_unloaded_adapters_leave_the_replica(model, adapters):
    async def scenario():
        settings = ServeSettings(model=str(model), max_loras=1)
        catalog = local_catalog(settings)
        config = EngineConfig(max_model_len=128, block_size=4, num_cache_blocks=64)
        service = ReplicaService(lambda: build_engine(model, config), max_loras=1, catalog=catalog)
        try:
            sql = await catalog.load("sql", str(adapters["sql"][0]))
            poem = await catalog.load("poem", str(adapters["poem"][0]))
            held = await service.adapters.acquire(sql)  # a request in flight on the only slot
            with pytest.raises(OpenAIError) as busy:
                await service.adapters.acquire(poem)
            assert busy.value.status == 503 and busy.value.code == "adapter_slots_busy"
            service.adapters.release(held)
            service.adapters.release(await service.adapters.acquire(poem))  # the idle one is evicted now
            assert service.adapters.names == ["poem"]
            await catalog.unload("poem")
            await service.adapters.forget(await catalog.listing())
            assert service.adapters.names == [] and service.engine.adapters == {}
        finally:
            service.shutdown()

    asyncio.run(scenario())


def test_an_adapter_loaded_again_under_its_name_does_not_reuse_the_old_prefix_cache(served, model, adapters):
    client, _ = served
    assert load(client, "tuned", adapters["sql"][0]).status_code == 200
    assert complete(client, "tuned").status_code == 200
    cached = (complete(client, "tuned").json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    assert cached  # the same adapter, the same prompt: served from its cache
    assert unload(client, "tuned").status_code == 200
    assert load(client, "tuned", adapters["poem"][0]).status_code == 200
    answer = complete(client, "tuned").json()
    assert answer["choices"][0]["text"] == expected_text(model, adapters["poem"][1])
    assert not (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")


def test_a_request_naming_an_adapter_under_the_s3_prefix_loads_it(s3_server, model, adapters):
    import boto3

    boto3.client("s3").create_bucket(Bucket="runtime-adapters")
    upload_dir(adapters["chess"][0], "s3://runtime-adapters/tuned/chess")
    client, service = serve(model, lora_adapter_prefix="s3://runtime-adapters/tuned")
    with client:
        answer = client.post("/v1/completions", json={"model": "chess", "prompt": PROMPT, **GREEDY})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected_text(model, adapters["chess"][1])
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "chess"]
        unknown = client.post("/v1/completions", json={"model": "checkers", "prompt": PROMPT, **GREEDY})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert service.stats().lora_adapters == ["chess"]
    service.shutdown()
