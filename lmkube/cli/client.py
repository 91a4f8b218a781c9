"""The HTTP client every server-facing command uses: where the server is, the API token, and API errors
turned into one clear line (CliError) instead of a traceback."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from lmkube.server.config import ServerConfig

DEFAULT_BASE_URL = f"http://{ServerConfig.host}:{ServerConfig.port}"  # where `lmkube serve` listens by default


class CliError(Exception):
    """A failure to report as `lmkube: error: <message>` with exit code `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server connection")
    group.add_argument("--host", help="server host (default: from LMKUBE_BASE_URL, else 127.0.0.1)")
    group.add_argument("--port", type=int, help="server port (default: from LMKUBE_BASE_URL, else 1234)")


def base_url(host: str | None, port: int | None) -> str:
    """--host/--port win over LMKUBE_BASE_URL, which wins over http://127.0.0.1:1234."""
    url = httpx.URL(os.environ.get("LMKUBE_BASE_URL") or DEFAULT_BASE_URL)
    if host is not None or port is not None:
        url = url.copy_with(host=host or url.host, port=port or url.port or ServerConfig.port)
    return str(url).rstrip("/")


def error_message(response: httpx.Response) -> str:
    """The first line of the server's error message, whatever the API family's error shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("detail")
    if not isinstance(message, str) or not message.strip():
        message = response.text.strip() or response.reason_phrase
    return message.strip().splitlines()[0]


class Client:
    def __init__(self, host: str | None = None, port: int | None = None, *, timeout: float = 600.0) -> None:
        self.base_url = base_url(host, port)
        token = os.environ.get("LMKUBE_API_TOKEN", "").strip()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=5.0))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Client:
        return cls(getattr(args, "host", None), getattr(args, "port", None))

    def close(self) -> None:
        self.http.close()

    def check(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            hint = "set LMKUBE_API_TOKEN to a token the server accepts" if "Authorization" not in \
                self.http.headers else "LMKUBE_API_TOKEN is not a token this server accepts"
            raise CliError(f"the server at {self.base_url} refused the request: {error_message(response)} ({hint})")
        if response.status_code >= 400:
            raise CliError(error_message(response))

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError:
            raise CliError(f"cannot connect to the lmkube server at {self.base_url} (is it running? start one "
                           "with `lmkube server start -d`, or set --host/--port or LMKUBE_BASE_URL)") from None
        except httpx.TimeoutException:
            raise CliError(f"the lmkube server at {self.base_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise CliError(f"lost the connection to the lmkube server at {self.base_url}: {exc}") from None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._errors():
            response = self.http.request(method, path, **kwargs)
        self.check(response)
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body)

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response (status checked); leaving the block closes the connection."""
        with self._errors(), self.http.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                self.check(response)
            yield response

    def sse(self, response: httpx.Response) -> Iterator[str | None]:
        """The `data:` payloads of an SSE response; None for each comment line (subscriptions, keepalives)."""
        with self._errors():
            for line in response.iter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip()
                elif line.startswith(":"):
                    yield None
