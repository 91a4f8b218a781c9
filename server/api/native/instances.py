"""GET /api/v1/instances: what `lmkube ps` shows (an lmkube extension; LM Studio's lms uses its SDK socket).

`status` is idle | processingPrompt | generating | computingEmbedding as in `lms ps --json`; `active` counts
requests holding a slot and `queued` those waiting for one (LM Studio's `queued` is the two together).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends

from ...runtime.manager import ModelManager
from ..deps import get_manager


async def list_instances(manager: Annotated[ModelManager, Depends(get_manager)]) -> dict[str, Any]:
    now_wall, now = time.time(), time.monotonic()
    instances = []
    for instance in manager.loaded():
        engine = instance.engine
        instances.append({
            "id": instance.id,
            "model_key": instance.variant.model_key,
            "variant": instance.variant.key,
            "type": instance.type,
            "size_bytes": instance.variant.size_bytes,
            "loaded_at": datetime.fromtimestamp(instance.loaded_at, UTC).isoformat(),
            "context_length": instance.context_length,
            "parallel": engine.n_parallel,
            "ttl": instance.ttl,
            "jit": instance.jit,
            "last_used": datetime.fromtimestamp(now_wall - (now - instance.last_used), UTC).isoformat(),
            "status": engine.status(),
            "active": engine.active,
            "queued": engine.queued,
            "max_queue": engine.max_queue,  # waiting requests allowed beyond `parallel`; None: unbounded
        })
    return {"instances": instances}
