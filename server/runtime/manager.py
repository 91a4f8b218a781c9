"""Which models are loaded: explicit loads, JIT loads, idle TTL and auto-evict (LM Studio semantics).

- A request for a downloaded but unloaded model loads it (JIT) with the request's `ttl`, or the
  server's JIT default; concurrent first requests share one load.
- With auto-evict, JIT-loading a model first unloads the other JIT-loaded instances; explicitly
  loaded instances are never evicted.
- An instance whose TTL passes with no request in flight is unloaded by the reaper.
- Nothing is unloaded under a request that is using it: auto-evict waits for the evicted
  instance's requests to finish (and for the requests its JIT load was handed to, to start), and
  a request never starts on an instance whose unload has begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from ..config import RuntimeSettings
from ..engine.stats import EngineStats
from ..store.model_store import ModelNotFound, ModelStore, ModelVariant
from .instance import LoadConfig, ModelInstance
from .progress import Listener, LoadProgress

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _JitLoad:
    """A JIT load in flight. `waiters` counts the requests awaiting it until it finishes; from then
    on they are counted in the loaded instance's `claims`, so eviction cannot pull it from under them."""

    task: asyncio.Task[ModelInstance] | None = None
    waiters: int = 0
    instance: ModelInstance | None = None
    progress: LoadProgress = field(default_factory=LoadProgress)


class ModelManager:
    def __init__(self, store: ModelStore, settings: RuntimeSettings) -> None:
        self.store = store
        self.settings = settings
        self.instances: dict[str, ModelInstance] = {}
        self._loading: dict[str, _JitLoad] = {}
        self._lock = asyncio.Lock()  # serialises loads and unloads, never held across inference
        self._reaper: asyncio.Task[None] | None = None
        # /metrics counters per instance id; kept after an unload so a reload under the same id continues them.
        self.stats: dict[str, EngineStats] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="ttl-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for instance_id in list(self.instances):
            await self.unload(instance_id)

    # -- lookups -----------------------------------------------------------------------------------

    def find_loaded(self, name: str) -> ModelInstance | None:
        """An instance by identifier, else the first instance of that model or variant key."""
        wanted = name.strip().lower()
        if (instance := self.instances.get(wanted)) is not None:
            return instance
        for instance in self.instances.values():
            if instance.id.lower() == wanted:
                return instance
        for instance in self.instances.values():
            variant = instance.variant
            if wanted in (variant.model_key, variant.key):
                return instance
        return None

    def listed_model_ids(self) -> list[str]:
        """What /v1/models shows: downloaded model keys under JIT, else only loaded instances."""
        loaded = [i.id for i in self.instances.values()]
        if not self.settings.jit:
            return loaded
        downloaded = [entry.key for entry in self.store.scan() if entry.default_variant is not None]
        return downloaded + [i for i in loaded if i not in downloaded]

    # -- loading -----------------------------------------------------------------------------------

    async def acquire(
        self, name: str, *, ttl: float | None = None, context_length: int | None = None,
        on_progress: Listener | None = None,
    ) -> ModelInstance:
        """The instance serving `name`, JIT-loading it when allowed. Raises ModelNotFound.

        `ttl` and `context_length` apply only if this call starts the JIT load. `on_progress` hears the JIT
        load's progress (this call's, or the one under way it waits for), on the event loop.

        The caller must start using the instance (`in_use`) before its next await."""
        while True:
            if (instance := self.find_loaded(name)) is not None:
                instance.last_used = time.monotonic()
                return instance
            if not self.settings.jit:
                raise ModelNotFound(name, self.listed_model_ids())
            variant = self.store.resolve(name)
            load = self._loading.get(variant.key)
            if load is None:
                load = _JitLoad()
                load.task = asyncio.create_task(self._jit_load(variant, ttl, load, context_length))
                self._loading[variant.key] = load
                load.task.add_done_callback(self._forgetter(variant.key, load))
            assert load.task is not None
            if load.instance is not None:
                load.instance.claims += 1
            else:
                load.waiters += 1
            if on_progress is not None:
                load.progress.listen(on_progress)
            try:
                # A cancelled client must not cancel the load other requests are waiting on.
                instance = await asyncio.shield(load.task)
            finally:
                if on_progress is not None:
                    load.progress.unlisten(on_progress)
                if load.instance is not None:
                    load.instance.claims -= 1
                else:
                    load.waiters -= 1
            if not instance.closing:
                instance.last_used = time.monotonic()
                return instance
            # Unloaded (by hand, or past its drain timeout) before this request could start: load it again.

    def _forgetter(self, key: str, load: _JitLoad) -> Callable[[asyncio.Task[ModelInstance]], None]:
        """A done-callback that drops `load` from the loads under way once its task ends."""
        return lambda _task: self._forget_load(key, load)

    def _forget_load(self, key: str, load: _JitLoad) -> None:
        if self._loading.get(key) is load:
            del self._loading[key]

    async def _jit_load(
        self, variant: ModelVariant, ttl: float | None, load: _JitLoad, context_length: int | None = None
    ) -> ModelInstance:
        async with self._lock:
            instance = self.find_loaded(variant.key)
            if instance is None:
                if self.settings.auto_evict:
                    for old in [i for i in self.instances.values() if i.jit]:
                        log.info("auto-evicting JIT-loaded %s to load %s", old.id, variant.key)
                        await self._unload_locked(old.id, drain=True)
                config = LoadConfig(
                    parallel=self.settings.parallel, ttl=ttl if ttl is not None else self.settings.jit_ttl,
                    context_length=context_length,
                )
                instance = await self._load_locked(variant, config, jit=True, progress=load.progress)
            # Hand the instance to the waiting requests before the lock goes to the next load.
            instance.claims += load.waiters
            load.waiters = 0
            load.instance = instance
            return instance

    async def load(self, name: str, config: LoadConfig, *, on_progress: Listener | None = None) -> ModelInstance:
        """An explicit load (API or CLI): always a new instance, never auto-evicted. `on_progress` hears the
        load's progress (0..1, on the event loop)."""
        variant = self.store.resolve(name)
        progress = LoadProgress()
        if on_progress is not None:
            progress.listen(on_progress)
        async with self._lock:
            return await self._load_locked(variant, config, jit=False, progress=progress)

    async def _load_locked(self, variant: ModelVariant, config: LoadConfig, *, jit: bool,
                           progress: LoadProgress | None = None) -> ModelInstance:
        instance_id = self._new_instance_id(config.identifier or variant.model_key)
        if config.parallel < 1:
            config = replace(config, parallel=self.settings.parallel)
        log.info("loading %s as %s", variant.key, instance_id)
        instance = await asyncio.to_thread(
            ModelInstance,
            instance_id,
            variant,
            config,
            default_context=self.settings.default_context_length,
            n_threads=self.settings.n_threads,
            jit=jit,
            max_queue=self.settings.max_queue,
            cache_ram_mib=self.settings.cache_ram_mib,
            stats=self.stats.setdefault(instance_id, EngineStats()),
            resolve=self.store.resolve,
            progress=progress.report if progress is not None else None,
            sampling_defaults=self.settings.sampling,
        )
        self.instances[instance_id] = instance
        log.info("loaded %s in %.2fs (context %d)", instance_id, instance.load_seconds, instance.context_length)
        return instance

    def _new_instance_id(self, base: str) -> str:
        taken = {i.lower() for i in self.instances}
        if base.lower() not in taken:
            return base
        n = 2
        while f"{base}:{n}".lower() in taken:
            n += 1
        return f"{base}:{n}"

    async def unload(self, instance_id: str, *, drain: bool = False) -> ModelInstance:
        async with self._lock:
            return await self._unload_locked(instance_id, drain=drain)

    async def _unload_locked(self, instance_id: str, *, drain: bool = False) -> ModelInstance:
        """Unloads at once (requests still running on it fail), or with `drain` once they are done."""
        instance = self.find_loaded(instance_id)
        if instance is None or instance.id.lower() != instance_id.strip().lower():
            raise ModelNotFound(instance_id, list(self.instances), reason="is not loaded")
        del self.instances[instance.id]  # new requests no longer find it
        if drain:
            deadline = time.monotonic() + self.settings.evict_drain_timeout
            while instance.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if instance.busy:
                log.warning("unloading %s with requests still running on it (drain timed out)", instance.id)
        instance.closing = True  # set before the first await of the close: no request starts on it after
        await asyncio.to_thread(instance.close)
        log.info("unloaded %s", instance.id)
        return instance

    # -- idle TTL ----------------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval)
            await self.reap_idle()

    async def reap_idle(self) -> list[str]:
        if not any(i.idle_expired(time.monotonic()) for i in self.instances.values()):
            return []
        async with self._lock:  # re-checked under the lock: a request may have arrived meanwhile
            expired = [i.id for i in self.instances.values() if i.idle_expired(time.monotonic())]
            for instance_id in expired:
                log.info("unloading %s: idle TTL passed", instance_id)
                await self._unload_locked(instance_id)
        return expired

    def loaded(self) -> Iterable[ModelInstance]:
        return self.instances.values()
