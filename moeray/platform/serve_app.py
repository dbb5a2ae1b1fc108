"""The Ray Serve application: an OpenAI ingress and an autoscaled model deployment.

Contract:
- `build_app(args)` returns a bound Serve `Application`; `args` is the `ServeSettings` as a
  dict, so it works as a Serve `import_path` (`moeray.platform.serve_app:build_app`) from a YAML
  config (a KubeRay RayService) and from Python (`serve.run(build_app({...}))`).
- `ModelDeployment` replicas each load the model and run one engine; `OpenAIIngress` owns the
  HTTP routes and reaches the replicas through a streaming deployment handle. Both read the
  app's adapter catalog (the `<app>-adapters` actor, adapters.py), so every replica serves the
  adapters any ingress loaded.
- A replica that cannot start for a reason retrying cannot heal raises `ReplicaStartupError`
  (the CLI reports it in one line instead of watching Serve retry).
- A replica asked to stop (downscale, redeploy) takes no new requests and finishes its
  streams for up to `graceful_shutdown_timeout_s`: Serve's own drain, sized from settings. The
  HTTP replicas also follow `drain.py`'s flag, with which `moeray serve` drains the whole app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from moeray.platform.adapters import AdapterRef, CatalogClient, app_catalog, configured_ref
from moeray.platform.errors import ReplicaStartupError
from moeray.platform.drain import watch_drain
from moeray.platform.openai_api import LocalClient, build_openai_app
from moeray.platform.ray_metrics import ReplicaExporter
from moeray.platform.service import GenerateChunk, GenerateRequest, ReplicaService
from moeray.platform.settings import ServeSettings

MODEL_DEPLOYMENT = "model"
# Serve asks each replica's check_health this often. A replica process that died is noticed at
# the next check, and until then /health would still count it (Serve's default is 10 s).
HEALTH_CHECK_PERIOD_S = 2.0
# Errors that the same settings would raise again at every start: not worth Serve's retries.
PERMANENT_STARTUP_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def log_into_serve() -> None:
    """In a replica, moeray's log lines go where Serve's go (the replica's log file, and stderr),
    each tagged as Serve tags its own with the id of the request that wrote it."""
    ours = logging.getLogger("moeray")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    for handler in logging.getLogger("ray.serve").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)


def load_replica_service(settings: ServeSettings, app_name: str, catalog: CatalogClient | None = None
                         ) -> ReplicaService:
    """`app_name`: the name Serve runs the app under, which names the actors its replicas share."""
    from moeray.engine import Engine
    from moeray.engine.build import build_engine
    from moeray.model.lora import merged_variant
    from moeray.platform.default_model import resolve_model
    from moeray.storage import local_copy

    folder = resolve_model(settings.model)
    engine_config = settings.engine.to_engine_config()
    experts = None
    ep = settings.expert_parallel
    if ep.shards:
        from moeray.actors.dispatch import start_expert_parallel

        # One Router per deployed app, shared by every model replica (the first one creates it).
        _, experts = start_expert_parallel(
            str(folder), ep.shards, ep.redundant_experts, name=f"{app_name}-router", namespace="moeray",
            num_cpus=ep.shard_cpus, num_gpus=ep.shard_gpus, strategy=ep.placement_strategy,
            dtype=engine_config.dtype, rebalance_interval_s=ep.rebalance_interval_s, detached=True,
            transport=ep.transport, fp8=engine_config.fp8, device=engine_config.device)
        experts.timeout_s = ep.timeout_s

    configured = [configured_ref(name, uri) for name, uri in settings.lora_adapters.items()]

    def adapters(model):
        return {ref.engine_key: merged_variant(model, local_copy(ref.uri)) for ref in configured}

    def build() -> Engine:
        # Runs on the engine thread, so loading and stepping share one OpenMP team (see AsyncEngine).
        return build_engine(folder, engine_config, experts, chat_template=settings.chat_template, adapters=adapters)

    return ReplicaService(build, reasoning_parser=settings.reasoning_parser, experts=experts,
                          max_loras=settings.max_loras, configured_adapters=configured, catalog=catalog)


class _HostsEngine:
    """What every deployment that holds an engine shares: building it, its metrics, health, shutdown."""

    def __init__(self, settings: ServeSettings):
        log_into_serve()
        self.settings = settings
        # The name Serve runs this app under (the one given to serve.run), not settings.app_name:
        # two apps of one cluster never share a Router or a catalog.
        app_name = serve.get_replica_context().app_name
        self.catalog = app_catalog(app_name, settings)
        try:
            self.service = load_replica_service(self.settings, app_name, self.catalog)
        except PERMANENT_STARTUP_ERRORS as err:
            raise ReplicaStartupError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        self.exporter = ReplicaExporter(lambda: self.service.stats().as_dict())

    def check_health(self) -> None:
        if not self.service.async_engine.is_running:
            raise RuntimeError("engine thread is not running")

    def __del__(self):
        exporter = getattr(self, "exporter", None)
        if exporter is not None:
            exporter.stop()
        service = getattr(self, "service", None)
        if service is not None:
            service.shutdown()


@serve.deployment
class ModelDeployment(_HostsEngine):
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        async for chunk in self.service.generate(request):
            yield chunk

    async def stats(self) -> dict[str, Any]:
        return self.service.stats().as_dict()

    async def prepare_adapter(self, adapter: AdapterRef) -> None:
        await LocalClient(self.service).prepare_adapter(adapter)


class HandleClient:
    """`ModelClient` over a Serve deployment handle."""

    def __init__(self, handle: DeploymentHandle, app_name: str):
        self.streaming = handle.options(stream=True, method_name="generate")
        self.handle = handle
        self.app_name = app_name

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        response = self.streaming.remote(request)
        finished = False
        try:
            async for chunk in response:
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:
                response.cancel()  # the replica's generator is closed, which aborts the request

    async def stats(self) -> dict[str, Any] | None:
        return await self.handle.stats.remote()

    async def prepare_adapter(self, adapter: AdapterRef) -> None:
        await self.handle.prepare_adapter.remote(adapter)

    async def ready(self) -> str | None:
        """Asks Serve's controller, not a replica: a replica busy with max_ongoing_requests
        streams would make a health call through the handle wait in line behind them."""
        status = await asyncio.to_thread(serve.status)
        application = status.applications.get(self.app_name)
        deployment = application.deployments.get(MODEL_DEPLOYMENT) if application else None
        if deployment is None:
            return "the model deployment is not deployed"
        if not deployment.replica_states.get("RUNNING"):
            return f"no model replica is running (model deployment {deployment.status.lower()})"
        return None


@serve.deployment
@serve.ingress()
class OpenAIIngress:
    def __init__(self, model: DeploymentHandle, settings: ServeSettings):
        log_into_serve()
        self.settings = settings
        # The name Serve runs this app under (the one given to serve.run), not settings.app_name.
        app_name = serve.get_replica_context().app_name
        self.client = HandleClient(model, app_name)
        self.catalog = app_catalog(app_name, settings)
        self.lifecycle = watch_drain(app_name)

    def __serve_build_asgi_app__(self):
        return build_openai_app(self.client, self.settings, behind_serve_proxy=True, lifecycle=self.lifecycle,
                                catalog=self.catalog)


@serve.deployment
@serve.ingress()
class OpenAIModelDeployment(_HostsEngine):
    """`ingress: colocated`: the OpenAI app and the engine in one replica. Each request's tokens
    then cross one Ray hop (replica -> HTTP proxy) instead of two, which matters when the CPU
    that carries them is the CPU the model runs on; /metrics shows the answering replica."""

    def __init__(self, settings: ServeSettings):
        super().__init__(settings)
        self.lifecycle = watch_drain(serve.get_replica_context().app_name)

    def __serve_build_asgi_app__(self):
        return build_openai_app(LocalClient(self.service), self.settings, behind_serve_proxy=True,
                                lifecycle=self.lifecycle, catalog=self.catalog)


def build_app(args: dict[str, Any]) -> serve.Application:
    # MOERAY_* environment variables fill in what `args` leaves out: on Kubernetes the API keys
    # come from a Secret as MOERAY_API_KEYS, never through serveConfigV2.
    settings = ServeSettings.load(overrides=args)
    # Validated once, here: the replicas get the settings object itself (pickled), not a dict to
    # validate again.
    resources: dict[str, Any] = {"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus}
    if settings.expert_parallel.shards and settings.engine.device == "cpu":
        from moeray.actors import SHARED_CPU_ENV

        resources["runtime_env"] = {"env_vars": SHARED_CPU_ENV}  # the replica shares cores with its shards
    model_options = dict(name=MODEL_DEPLOYMENT, autoscaling_config=settings.autoscaling.to_serve(),
                         ray_actor_options=resources, max_ongoing_requests=settings.max_ongoing_requests,
                         max_queued_requests=settings.max_queued_requests,
                         graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
                         health_check_period_s=HEALTH_CHECK_PERIOD_S)
    if settings.ingress == "colocated":
        return OpenAIModelDeployment.options(**model_options).bind(settings)
    router = settings.routing.to_serve()  # the ingress's handle calls carry the prompt the router reads
    if router is not None:
        model_options["request_router_config"] = router
    model = ModelDeployment.options(**model_options).bind(settings)
    # The ingress drains as long as the model replicas: its open streams are theirs.
    return OpenAIIngress.options(name="openai", ray_actor_options={"num_cpus": 0.1},
                                 graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
                                 max_ongoing_requests=max(1000, settings.max_queued_requests * 4)).bind(model, settings)
