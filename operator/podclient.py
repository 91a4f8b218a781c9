"""A small typed client for one model-server pod's native API (`http://<podIP>:<port>/api/v1`).

Every failure is raised as a `PodError` whose `reason` is a condition reason (CamelCase) and whose
`message` says what to do: the server's own error message when it answered with one, the HTTP status
when it did not, and the transport error when it could not be reached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_TIMEOUT = 10.0
LOAD_TIMEOUT = 900.0  # a large model can take minutes to load; the call blocks until it is in memory


class PodError(Exception):
    """A request to a pod failed. `reason` is for the condition, `message` for humans."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


class PodAuthError(PodError):
    """401/403: the operator's token is not one the server accepts."""


class PodUnreachable(PodError):
    """Connection refused, reset or timed out."""


@dataclass(frozen=True)
class DownloadStarted:
    """The answer to POST /api/v1/models/download: a job id, or None when the files are already there."""

    job_id: str | None
    status: str  # "already_downloaded", "downloading", "completed", "failed", "paused"
    total_bytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class DownloadStatus:
    job_id: str
    status: str  # "downloading", "paused", "completed", "failed"
    downloaded_bytes: int = 0
    total_bytes: int = 0
    bytes_per_second: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class LoadedInstance:
    model_key: str
    instance_id: str
    context_length: int | None
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelListing:
    key: str
    variants: tuple[str, ...]  # variant keys, `org/name@q4_k_m`
    selected_variant: str | None
    instances: tuple[LoadedInstance, ...]


def _server_message(response: httpx.Response) -> str | None:
    """The message of any of the server's error shapes ({"error": {"message"}} or {"error": "..."})."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return None


class PodClient:
    """Talks to one pod. Use as a context manager (one connection pool per reconcile of a pod)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url
        self._client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> PodClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, failure: str, *, json: Any = None,
                 timeout: float | None = None) -> Any:
        try:
            kwargs: dict[str, Any] = {"json": json}
            if timeout is not None:
                kwargs["timeout"] = timeout
            response = self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise PodUnreachable("PodUnreachable", f"{method} {self.base_url}{path} timed out ({exc})") from None
        except httpx.TransportError as exc:
            raise PodUnreachable("PodUnreachable", f"cannot reach the server at {self.base_url}: {exc}") from None
        self._check(response, failure)
        try:
            return response.json()
        except ValueError:
            raise PodError(failure, f"{method} {path}: the server answered with invalid JSON",
                           response.status_code) from None

    def _check(self, response: httpx.Response, failure: str) -> None:
        if response.status_code in (401, 403):
            detail = _server_message(response) or response.reason_phrase
            raise PodAuthError(
                "Unauthorized",
                f"the server at {self.base_url} refused the operator's token ({response.status_code}: {detail}); "
                "check that the token Secret matches the one the pod was started with (a rotated token needs "
                "the pod restarted)", response.status_code)
        if response.status_code >= 400:
            detail = _server_message(response) or f"HTTP {response.status_code} {response.reason_phrase}"
            raise PodError(failure, detail, response.status_code)

    # -- the endpoints the operator drives ---------------------------------------------------------

    def models(self) -> list[ModelListing]:
        body = self._request("GET", "/api/v1/models", "ServerError")
        listings = []
        for model in body.get("models", []):
            key = str(model.get("key", ""))
            instances = tuple(
                LoadedInstance(model_key=key, instance_id=str(i.get("id")),
                               context_length=(i.get("config") or {}).get("context_length"),
                               config=i.get("config") or {})
                for i in model.get("loaded_instances") or [])
            listings.append(ModelListing(key=key, variants=tuple(model.get("variants") or ()),
                                         selected_variant=model.get("selected_variant"), instances=instances))
        return listings

    def loaded(self) -> list[LoadedInstance]:
        return [i for m in self.models() for i in m.instances]

    def download(self, body: Mapping[str, Any]) -> DownloadStarted:
        answer = self._request("POST", "/api/v1/models/download", "DownloadFailed", json=dict(body), timeout=60)
        return DownloadStarted(job_id=answer.get("job_id"), status=str(answer.get("status", "")),
                               total_bytes=int(answer.get("total_size_bytes") or 0), error=answer.get("error"))

    def download_status(self, job_id: str) -> DownloadStatus | None:
        """The job's status, or None when the server does not know the job (a fresh server)."""
        try:
            answer = self._request("GET", f"/api/v1/models/download/status/{job_id}", "DownloadFailed")
        except PodError as exc:
            if exc.status == 404 and not isinstance(exc, PodAuthError):
                return None
            raise
        return DownloadStatus(
            job_id=job_id, status=str(answer.get("status", "")),
            downloaded_bytes=int(answer.get("downloaded_bytes") or 0),
            total_bytes=int(answer.get("total_size_bytes") or 0),
            bytes_per_second=float(answer.get("bytes_per_second") or 0.0), error=answer.get("error"))

    def load(self, body: Mapping[str, Any], on_progress: Callable[[float], None] | None = None) -> str:
        """Loads a model and returns its instance id (blocks until the model is in memory). With `on_progress`,
        through the server's streamed load, which tells it llama.cpp's load progress (0..1) as it goes; a server
        without the streamed load gets the plain one."""
        if on_progress is not None:
            try:
                return self._streamed_load(body, on_progress)
            except PodError as exc:
                if not (exc.status == 400 and "'stream'" in exc.message):
                    raise
        answer = self._request("POST", "/api/v1/models/load", "LoadFailed", json=dict(body), timeout=LOAD_TIMEOUT)
        return str(answer["instance_id"])

    def _streamed_load(self, body: Mapping[str, Any], on_progress: Callable[[float], None]) -> str:
        path = "/api/v1/models/load"
        try:
            with self._client.stream("POST", path, json={**body, "stream": True}, timeout=LOAD_TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response, "LoadFailed")
                event = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[len("event: "):]
                    elif line.startswith("data: "):
                        data = json.loads(line[len("data: "):])
                        if event == "model_load.progress":
                            on_progress(float(data["progress"]))
                        elif event == "model_load.end":
                            return str(data["result"]["instance_id"])
                        elif event == "error":
                            error = data.get("error") or {}
                            status = 404 if error.get("type") == "model_not_found" else None
                            raise PodError("LoadFailed", str(error.get("message") or "the load failed"), status)
        except httpx.TimeoutException as exc:
            raise PodUnreachable("PodUnreachable", f"POST {self.base_url}{path} timed out ({exc})") from None
        except httpx.TransportError as exc:
            raise PodUnreachable("PodUnreachable", f"cannot reach the server at {self.base_url}: {exc}") from None
        except ValueError:
            raise PodError("LoadFailed", f"POST {path}: the server's load stream was not valid JSON") from None
        raise PodError("LoadFailed", f"POST {path}: the server ended the load stream before the model loaded")

    def estimate(self, body: Mapping[str, Any]) -> int | None:
        """The memory a load would take (`estimate_only`), in bytes; None when the server cannot tell."""
        answer = self._request("POST", "/api/v1/models/load", "LoadFailed", json={**body, "estimate_only": True},
                               timeout=60)
        total = (answer.get("estimate") or {}).get("total_bytes")
        return int(total) if total is not None else None

    def unload(self, instance_id: str) -> None:
        """Unloads an instance; one that is already gone is not an error."""
        try:
            self._request("POST", "/api/v1/models/unload", "UnloadFailed", json={"instance_id": instance_id})
        except PodError as exc:
            if exc.status != 404 or isinstance(exc, PodAuthError):
                raise
