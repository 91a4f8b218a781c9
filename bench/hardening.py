"""Issue 15's attacks on a real `lmkube serve`, measured: how fast they are refused, how long the public and
authenticated probes wait meanwhile, and how far the server's memory grows.

    .venv/bin/python bench/hardening.py [--bodies 300,150] [--prompt-mib 20] [--repeat 3] [--flood-clients 4]

One server (`--demo`, an API token, the default 32 MiB body limit), lmkube/demo loaded and warmed up first.
- **Bodies** (item 3): per size, a POST to /v1/chat/completions with that Content-Length whose body is sent
  as fast as loopback takes it, without a token (401) and with one (413, over the body limit). Reported:
  the time from the first byte sent to the response's status line, how much of the body had gone out by
  then, `/health` latency while it ran (a probe every 20 ms on a kept-alive connection) and the server's
  peak RSS above its baseline (VmRSS read every 5 ms). Then a flood: `--flood-clients` attackers send such
  bodies back to back for `--flood-seconds`, and the same figures cover the whole flood.
- **Huge prompt** (item 4): a `content` of `--prompt-mib` MiB ("word " repeated) with a valid token: time to
  its 400, `/health` and `/v1/models` latency meanwhile, the largest gap between the tokens of a stream that
  runs alongside, and peak RSS above baseline.
Each figure is the median over `--repeat` runs (peak RSS and worst latencies: the maximum).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
from servers import Server, free_port, running

TOKEN = "sk-lm-benchhard:0123456789abcdefghij"
MODEL = "lmkube/demo"
CHUNK = 1 << 20


@dataclass
class Window:
    """What the samplers saw while one attack ran."""

    seconds: float = 0.0
    status: str = ""
    sent_mib: float = 0.0
    probes: dict[str, list[float]] = field(default_factory=dict)  # path → latencies (s) overlapping the attack
    peak_rss_mib: float = 0.0  # above the baseline
    max_gap_s: float = 0.0  # the side stream's largest inter-token gap during the attack


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Samplers:
    """Background threads: RSS every 5 ms, each probe path every 20 ms, optionally one stream's token times."""

    def __init__(self, server: Server, probe_paths: list[str], stream: bool) -> None:
        assert server.process is not None
        self.pid, self.url = server.process.pid, server.url
        self.stop = threading.Event()
        self.rss: list[tuple[float, float]] = []
        self.probes: dict[str, list[tuple[float, float]]] = {path: [] for path in probe_paths}
        self.tokens: list[float] = []
        self.threads = [threading.Thread(target=self._rss)]
        self.threads += [threading.Thread(target=self._probe, args=(path,)) for path in probe_paths]
        if stream:
            self.threads.append(threading.Thread(target=self._stream))

    def __enter__(self) -> Samplers:
        for thread in self.threads:
            thread.start()
        time.sleep(0.5)  # every sampler running before the attack
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _rss(self) -> None:
        while not self.stop.is_set():
            self.rss.append((time.perf_counter(), rss_mib(self.pid)))
            time.sleep(0.005)

    def _probe(self, path: str) -> None:
        with httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                assert client.get(path).status_code == 200
                self.probes[path].append((started, time.perf_counter()))
                time.sleep(0.02)

    def _stream(self) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": 100000, "logit_bias": {"2": -100},
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        with httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
            while not self.stop.is_set():
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            self.tokens.append(time.perf_counter())
                        if self.stop.is_set():
                            break

    def window(self, start: float, end: float, baseline_mib: float) -> Window:
        during = Window(seconds=end - start)
        during.probes = {path: [b - a for a, b in samples if a <= end and b >= start]
                         for path, samples in self.probes.items()}
        during.peak_rss_mib = max((mib for t, mib in self.rss if start <= t <= end + 0.5), default=0) - baseline_mib
        gaps = [b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False) if b >= start and a <= end]
        during.max_gap_s = max(gaps, default=0.0)
        return during


def post_body(url: str, size: int, token: str | None) -> tuple[float, float, float, str]:
    """POSTs a `size`-byte body on a raw socket, sending while watching for the answer: (first byte sent,
    status line received, MiB sent by then, status line)."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    answered = threading.Event()
    sent = [0]
    payload = b"[" + b" " * (CHUNK - 1)

    def send() -> None:
        try:
            sock.sendall(head)
            while sent[0] < size and not answered.is_set():
                piece = payload[: min(CHUNK, size - sent[0])]
                sock.sendall(piece)
                sent[0] += len(piece)
        except OSError:  # the server answered and closed the connection
            pass

    started = time.perf_counter()
    sender = threading.Thread(target=send)
    sender.start()
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    received = time.perf_counter()
    answered.set()
    mib = sent[0] / CHUNK
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sender.join()
    sock.close()
    return started, received, mib, answer.split(b"\r\n", 1)[0].decode(errors="replace")


def huge_prompt(url: str, mib: int) -> tuple[float, float, str]:
    content = "word " * ((mib << 20) // 5)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=300,
                          headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    ended = time.perf_counter()
    error = response.json().get("error", {})
    return started, ended, f"{response.status_code} {error.get('code')}"


def attack(server: Server, probes: list[str], stream: bool, run: Callable[[], tuple[float, float, float, str]],
           ) -> Window:
    assert server.process is not None
    time.sleep(1.0)  # memory freed by the previous attack settles
    baseline = rss_mib(server.process.pid)
    with Samplers(server, probes, stream) as samplers:
        start, end, sent, status = run()
        time.sleep(0.5)
    window = samplers.window(start, end, baseline)
    window.sent_mib, window.status = sent, status
    return window


def flood(server: Server, body: Callable[[], tuple[float, float, float, str]], clients: int, seconds: float,
          ) -> tuple[list[float], Window]:
    """`clients` attackers send `body` back to back for `seconds`: each attack's time to its answer, and the
    samplers' window over the whole flood."""
    assert server.process is not None
    time.sleep(1.0)
    baseline = rss_mib(server.process.pid)
    times: list[float] = []
    statuses: set[str] = set()

    def attacker(until: float) -> None:
        while time.perf_counter() < until:
            start, end, _, status = body()
            times.append(end - start)
            statuses.add(status)

    with Samplers(server, ["/health"], False) as samplers:
        start = time.perf_counter()
        threads = [threading.Thread(target=attacker, args=(start + seconds,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        end = time.perf_counter()
        time.sleep(0.5)
    window = samplers.window(start, end, baseline)
    window.status = ", ".join(sorted(statuses))
    return times, window


def summary(windows: list[Window]) -> str:
    seconds = statistics.median(w.seconds for w in windows)
    parts = [f"{windows[0].status}", f"answered after {seconds * 1e3:.0f} ms (median)"]
    if windows[0].status.startswith("HTTP/"):  # a body sent on a raw socket
        parts.append(f"{statistics.median(w.sent_mib for w in windows):.0f} MiB sent by then")
    for path in windows[0].probes:
        latencies = [x for w in windows for x in w.probes[path]]
        if latencies:
            parts.append(f"{path} p50 {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
                         f" ({len(latencies)} probes)")
    if any(w.max_gap_s for w in windows):
        parts.append(f"side stream's largest token gap {max(w.max_gap_s for w in windows) * 1e3:.0f} ms")
    parts.append(f"peak RSS +{max(w.peak_rss_mib for w in windows):.0f} MiB")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bodies", default="300,150", help="body sizes in MB (10^6 bytes), comma separated")
    parser.add_argument("--prompt-mib", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flood-clients", type=int, default=4, help="attackers sending bodies back to back")
    parser.add_argument("--flood-seconds", type=float, default=5.0)
    args = parser.parse_args()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        port = free_port()
        command = [str(Path(sys.executable).with_name("lmkube")), "serve", "--demo", "--models-dir", str(tmp / "m"),
                   "--port", str(port), "--api-token", TOKEN, "--log-level", "warning"]
        server = stack.enter_context(running(Server("lmkube", command, port, tmp / "server.log")))
        assert server.process is not None
        wait_ready_with_token(server)
        warm = httpx.post(f"{server.url}/v1/chat/completions", timeout=300,
                          headers={"authorization": f"Bearer {TOKEN}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert warm.status_code == 200, warm.text
        print(f"lmkube serve --demo, API token, default --max-body-size; baseline RSS "
              f"{rss_mib(server.process.pid):.0f} MiB; {args.repeat} runs each", flush=True)
        for megabytes in (int(v) for v in args.bodies.split(",")):
            for label, token in (("no token", None), ("with token", TOKEN)):
                body = partial(post_body, server.url, megabytes * 10**6, token)
                windows = [attack(server, ["/health"], False, body) for _ in range(args.repeat)]
                print(f"- {megabytes} MB body, {label}: {summary(windows)}", flush=True)
                times, window = flood(server, body, args.flood_clients, args.flood_seconds)
                health = window.probes["/health"]
                print(f"  flood, {args.flood_clients} clients for {args.flood_seconds:.0f} s: {len(times)} bodies "
                      f"({window.status}), answered after p50 {statistics.median(times) * 1e3:.0f} ms, max "
                      f"{max(times) * 1e3:.0f} ms; /health p50 {statistics.median(health) * 1e3:.1f} ms, max "
                      f"{max(health) * 1e3:.1f} ms ({len(health)} probes); peak RSS +{window.peak_rss_mib:.0f} MiB",
                      flush=True)

        def prompt() -> tuple[float, float, float, str]:
            start, end, status = huge_prompt(server.url, args.prompt_mib)
            return start, end, 0.0, status

        windows = [attack(server, ["/health", "/v1/models"], True, prompt) for _ in range(args.repeat)]
        print(f"- {args.prompt_mib} MiB content: {summary(windows)}", flush=True)
        assert server.process.poll() is None, server.log_tail()


def wait_ready_with_token(server: Server) -> None:
    """servers.wait_ready polls /v1/models, which needs the token here: wait on /health instead."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert server.process is not None and server.process.poll() is None, server.log_tail()
        time.sleep(0.2)
    raise TimeoutError(server.log_tail())


if __name__ == "__main__":
    main()
