"""LoRA adapters at runtime: the app's catalog of adapters, and the ones each replica holds.

Contract:
- `AdapterRef(name, uri, version)` is what a request carries to its model replica. `version` is
  new at every load, so an adapter loaded again under its old name (new weights) is another
  engine adapter with its own prefix-cache namespace (`engine_key`).
- `AdapterCatalog` is the app's set of adapters: the configured `lora_adapters`, those loaded
  through the API (`load`, `unload`), and, with `lora_adapter_prefix`, every `<prefix>/<name>`
  that holds a PEFT adapter, added by the first request naming it (`resolve`). Adding one reads
  and checks its adapter_config.json (never its weights, which the catalog does not hold); a
  problem is an `OpenAIError` naming the adapter, its URI and the request parameter.
- `app_catalog(app_name, settings)` is that catalog as the named, detached Ray actor
  `<app_name>-adapters` (namespace moeray), shared by every ingress and model replica of the
  app and outliving any one of them; `local_catalog(settings)` is one in this process. Both
  are a `CatalogClient` (async).
- `ResidentAdapters` is what one replica's engine holds: at most `max_loras` adapters, the
  configured ones among them for good. `acquire(ref)` returns the engine's name for the
  adapter, loading it first if need be (the download off the event loop, the merge on the
  engine thread) and evicting the least recently used adapter that no request is using;
  `release(key)` ends a request's use. When every slot serves requests, `acquire` raises 503
  (retry). `forget(current)` drops idle adapters the catalog no longer has; given the catalog,
  the replica does so every `sync_interval_s` from its first adapter request on, so an adapter
  unloaded through any ingress leaves every replica's memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeray.platform.protocol import OpenAIError

if TYPE_CHECKING:
    from moeray.engine import AsyncEngine
    from moeray.platform.settings import ServeSettings

# Path-like names (org/name) are allowed; no part may start with a dot, so none can leave the prefix.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
MAX_NAME_LENGTH = 128
ADAPTER_CONFIG = "adapter_config.json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    name: str  # what requests send as `model`
    uri: str  # PEFT adapter folder or s3:// URI
    version: str  # new at every load

    @property
    def engine_key(self) -> str:
        return f"{self.name}@{self.version}"


def configured_ref(name: str, uri: str) -> AdapterRef:
    """A configured adapter's ref: the same in every replica and ingress that reads the settings."""
    return AdapterRef(name, uri, "configured-" + hashlib.sha256(uri.encode()).hexdigest()[:8])


def is_adapter_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and ADAPTER_NAME.fullmatch(name) is not None


def check_name(name: str, param: str = "lora_name") -> None:
    if not is_adapter_name(name):
        raise OpenAIError(400, f"{param}: {name!r} is not an adapter name (letters, digits, '.', '_', '-', parts "
                               f"separated by '/', none starting with '.'; at most {MAX_NAME_LENGTH} characters)",
                          param=param)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class AdapterCatalog:
    """See the module docstring. Thread-safe: the actor serves several calls at once."""

    def __init__(self, base_model: str, configured: dict[str, str], prefix: str | None = None):
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterRef] = {}
        self._configured: set[str] = set()
        self.base_model = base_model
        self.prefix: str | None = None
        self.configure(base_model, configured, prefix)

    def configure(self, base_model: str, configured: dict[str, str], prefix: str | None) -> None:
        """The settings of a (re)deployed app: its configured adapters replace the last ones;
        adapters loaded at runtime stay unless the base model changed."""
        with self._lock:
            if base_model != self.base_model:
                self._adapters.clear()
            for name in self._configured - set(configured):
                self._adapters.pop(name, None)
            self._adapters.update({name: configured_ref(name, uri) for name, uri in configured.items()})
            self._configured = set(configured)
            self.base_model, self.prefix = base_model, prefix.rstrip("/") if prefix else None

    def listing(self) -> list[AdapterRef]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda ref: ref.name)

    def resolve(self, name: str) -> AdapterRef | None:
        """The adapter a request's `model` names, found under the prefix on first use; None: none."""
        with self._lock:
            ref, prefix = self._adapters.get(name), self.prefix
        if ref is not None or prefix is None or not is_adapter_name(name):
            return ref
        from moeray.storage import StorageError, file_exists

        uri = f"{prefix}/{name}"
        try:
            present = file_exists(f"{uri}/{ADAPTER_CONFIG}")
        except StorageError as err:
            raise OpenAIError(503, f"model '{name}': the adapter store {prefix} is not reachable "
                                   f"({_first_line(err)}): retry later", type="server_error", param="model",
                              code="unavailable") from None
        return self._add(name, uri, "model") if present else None

    def load(self, name: str, uri: str) -> AdapterRef:
        check_name(name)
        if not uri:
            raise OpenAIError(400, "lora_path: give the adapter's folder or s3:// URI", param="lora_path")
        return self._add(name, uri, "lora_path")

    def unload(self, name: str) -> AdapterRef:
        with self._lock:
            ref = self._adapters.pop(name, None)
            self._configured.discard(name)
        if ref is None:
            raise OpenAIError(404, f"lora_name: no adapter named '{name}' is loaded", param="lora_name",
                              code="not_found")
        return ref

    def _add(self, name: str, uri: str, param: str) -> AdapterRef:
        if name == self.base_model:
            raise OpenAIError(400, f"lora_name: '{name}' is the base model's name", param="lora_name")
        ref = AdapterRef(name, uri, uuid.uuid4().hex[:12])
        _check_config(ref, param)  # outside the lock: it may download
        with self._lock:
            if name in self._adapters:
                if param == "model":  # two first requests raced: the other one added it
                    return self._adapters[name]
                raise OpenAIError(400, f"lora_name: an adapter named '{name}' is already loaded "
                                       f"({self._adapters[name].uri}); unload it first", param="lora_name")
            self._adapters[name] = ref
        return ref


def _check_config(ref: AdapterRef, param: str) -> None:
    from moeray.model.lora import read_adapter_config
    from moeray.storage import local_copy

    try:
        read_adapter_config(local_copy(ref.uri, skip_suffixes=(".safetensors",), revision=ref.version))
    except Exception as err:  # noqa: BLE001 - a missing folder, a store that refuses, a bad config alike
        raise OpenAIError(400, f"{param}: adapter '{ref.name}' ({ref.uri}) cannot be loaded: {_first_line(err)}",
                          param=param) from None


class CatalogClient:
    """The catalog's methods as coroutines, wherever the catalog lives."""

    async def _call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    async def resolve(self, name: str) -> AdapterRef | None:
        return await self._call("resolve", name)

    async def load(self, name: str, uri: str) -> AdapterRef:
        return await self._call("load", name, uri)

    async def unload(self, name: str) -> AdapterRef:
        return await self._call("unload", name)

    async def listing(self) -> list[AdapterRef]:
        return await self._call("listing")


class _LocalCatalog(CatalogClient):
    def __init__(self, catalog: AdapterCatalog):
        self.catalog = catalog

    async def _call(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.catalog, method), *args)  # it may read S3


class _RemoteCatalog(CatalogClient):
    def __init__(self, actor):
        self.actor = actor

    async def _call(self, method: str, *args: Any) -> Any:
        from ray.exceptions import RayTaskError

        from moeray.platform.errors import unwrap

        try:
            return await getattr(self.actor, method).remote(*args)
        except RayTaskError as err:
            raise unwrap(err) from None


def local_catalog(settings: ServeSettings) -> CatalogClient:
    return _LocalCatalog(AdapterCatalog(settings.model_name, settings.lora_adapters, settings.lora_adapter_prefix))


def app_catalog(app_name: str, settings: ServeSettings) -> CatalogClient:
    """The app's shared catalog actor, created by whichever replica asks first, and told this
    deployment's settings."""
    import ray

    actor = (ray.remote(AdapterCatalog)
             .options(name=f"{app_name}-adapters", namespace="moeray", get_if_exists=True, lifetime="detached",
                      num_cpus=0, max_concurrency=16)
             .remote(settings.model_name, settings.lora_adapters, settings.lora_adapter_prefix))
    ray.get(actor.configure.remote(settings.model_name, settings.lora_adapters, settings.lora_adapter_prefix))
    return _RemoteCatalog(actor)


class ResidentAdapters:
    """See the module docstring. Used from one event loop."""

    def __init__(self, async_engine: AsyncEngine, max_loras: int, configured: list[AdapterRef] = (),
                 catalog: CatalogClient | None = None, sync_interval_s: float = 5.0):
        self._engine = async_engine
        self.max_loras = max_loras
        self._catalog, self._sync_interval_s = catalog, sync_interval_s
        self._sync: asyncio.Task | None = None
        self._pinned = {ref.engine_key for ref in configured}
        self._resident: OrderedDict[str, AdapterRef] = OrderedDict((ref.engine_key, ref) for ref in configured)
        self._in_use: Counter[str] = Counter()
        self._loading: dict[str, asyncio.Future] = {}
        self.loads_total = self.evictions_total = 0

    @property
    def names(self) -> list[str]:
        return sorted(ref.name for ref in self._resident.values())

    async def acquire(self, ref: AdapterRef) -> str:
        if self._catalog is not None and self._sync is None:
            self._sync = asyncio.ensure_future(self._follow_catalog())
        key = ref.engine_key
        while key not in self._resident:  # again if another request's eviction took it meanwhile
            pending = self._loading.get(key)
            if pending is None:
                pending = self._loading[key] = asyncio.ensure_future(self._load(ref))
                pending.add_done_callback(lambda _: self._loading.pop(key, None))
            await asyncio.shield(pending)
        self._in_use[key] += 1
        self._resident.move_to_end(key)
        return key

    def release(self, key: str) -> None:
        self._in_use[key] -= 1
        if self._in_use[key] <= 0:
            del self._in_use[key]

    async def forget(self, current: list[AdapterRef]) -> None:
        keep = {ref.engine_key for ref in current}
        for key in [key for key in self._resident if key not in keep]:
            if key in self._resident and not self._in_use[key]:  # still idle after the awaits before
                self._pinned.discard(key)
                await self._evict(key)

    async def _follow_catalog(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            try:
                await self.forget(await self._catalog.listing())
            except Exception:  # noqa: BLE001 - the catalog may be restarting: next round
                logger.warning("could not compare this replica's adapters with the catalog", exc_info=True)

    async def _load(self, ref: AdapterRef) -> None:
        from moeray.model.lora import merged_variant
        from moeray.storage import local_copy

        await self._make_room()
        try:
            folder = await asyncio.to_thread(local_copy, ref.uri, (), ref.version)
            key = ref.engine_key
            # The merge is torch work: on the engine thread (see AsyncEngine on OpenMP teams).
            await self._engine.call(lambda engine: engine.add_adapter(key, merged_variant(engine.model, folder)))
        except OpenAIError:
            raise
        except Exception as err:  # noqa: BLE001 - the store or the weights: named for the client
            raise OpenAIError(400, f"model: adapter '{ref.name}' ({ref.uri}) cannot be loaded: {_first_line(err)}",
                              param="model") from None
        self._resident[ref.engine_key] = ref
        self.loads_total += 1

    async def _make_room(self) -> None:
        # The load asking is in _loading already.
        while len(self._resident) + len(self._loading) > self.max_loras:
            victim = next((key for key in self._resident if key not in self._pinned and not self._in_use[key]), None)
            if victim is None:
                raise OpenAIError(503, f"model: all {self.max_loras} adapter slots (max_loras) hold adapters that "
                                       f"requests are using: retry", type="server_error", param="model",
                                  code="adapter_slots_busy")
            await self._evict(victim)
            self.evictions_total += 1

    async def _evict(self, key: str) -> None:
        # Gone for new requests first; the engine drops it after every command sent before.
        del self._resident[key]
        await self._engine.call(lambda engine: engine.remove_adapter(key))
