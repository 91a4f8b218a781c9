"""Stored responses through the gateway: `GET`/`DELETE /v1/responses/{id}` and `GET …/{id}/input_items`.

A response is stored on the replica that answered it, and these routes name no model. The gateway asks the
replica it saw answer first (`owners`, filled from the answers it relayed), then every other replica of the
models the key may use, and passes on the first answer that is not a 404. A key therefore never reaches a
response stored by a model it may not use, and another gateway replica (or a restarted one) still finds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import httpx

from .catalog import ServedModel

PATH = re.compile(r"^/v1/responses/(resp_[0-9a-f]{48})(/input_items)?$")


def response_id(method: str, path: str) -> str | None:
    """The stored response a request reads or deletes, or None for any other request."""
    match = PATH.match(path)
    if match is None or method not in ("GET", "DELETE") or (method == "DELETE" and match.group(2)):
        return None
    return match.group(1)


def candidates(models: Sequence[ServedModel], owner: str | None) -> list[str]:
    """Replica URLs to ask, the owner first (when the key may use its model), each once."""
    urls = [replica.url for model in models for replica in model.replicas]
    ordered = ([owner] if owner in urls else []) + urls
    return list(dict.fromkeys(ordered))


async def find(client: httpx.AsyncClient, urls: Iterable[str], method: str, path_and_query: str,
               headers: Mapping[str, str]) -> httpx.Response | None:
    """The first answer that is not a 404 (None when every replica says 404 or none can be reached)."""
    for url in urls:
        try:
            answer = await client.request(method, f"{url}{path_and_query}", headers=dict(headers), timeout=10)
        except httpx.TransportError:
            continue
        if answer.status_code != 404:
            return answer
    return None
