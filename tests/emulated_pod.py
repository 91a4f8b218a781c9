"""The kubelet half of tests/kubelet_emulator.py: one bound Pod's containers as real host processes.

`PodRuntime` is driven by the emulator's worker thread (never by two threads at once): `sync()` starts,
probes, restarts and stops the containers' processes, and `status()` renders the `status` a kubelet
would report for them. Everything that needs the API (Secrets, ConfigMaps for env and volumes) is
passed in as a `lookup` callable so this module only deals with processes, paths and timing; what the
spec means for a process (volumes, env, argv) is in tests/emulated_pod_spec.py.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from emulated_pod_spec import ConfigError, Lookup, PodSpecMixin, ServiceAccountConfig

log = logging.getLogger("kubelet_emulator")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def port_is_free(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


@dataclass
class Settings:
    """Knobs shared by all pods of one emulator (see KubeletEmulator's docstring)."""

    root: Path
    python_bin_dir: Path
    extra_env: dict[str, str]
    image_entrypoints: dict[str, list[str]]
    probe_period: float | None
    restart_backoff: tuple[float, float]
    pull_backoff: float
    max_grace: float


@dataclass
class Probe:
    spec: dict[str, Any]
    next_at: float = 0.0
    failures: int = 0
    successes: int = 0


@dataclass
class Container:
    spec: dict[str, Any]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    container_id: str = ""
    started_at: str | None = None
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None  # current state, for restartPolicy Never/OnFailure
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    next_start: float = 0.0
    backoff: float = 0.0
    started: bool = False  # startupProbe passed (or none)
    ready: bool = False
    probes: dict[str, Probe] = field(default_factory=dict)
    pull_failed_at: float | None = None
    killing: str | None = None  # why the running process is being stopped ("liveness", "startup", "delete")
    kill_deadline: float = 0.0
    started_mono: float = 0.0

    @property
    def name(self) -> str:
        return self.spec["name"]


class PodRuntime(PodSpecMixin):
    """The processes of one Pod bound to an emulated node, and the status a kubelet would report."""

    def __init__(self, pod: dict[str, Any], ip: str, host_ip: str, settings: Settings, lookup: Lookup,
                 service_account: ServiceAccountConfig | None = None) -> None:
        self.pod = pod
        meta = pod["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.ip = ip
        self.host_ip = host_ip
        self.settings = settings
        self.lookup = lookup
        self.service_account = service_account
        self.start_time = now()
        self.transitions: dict[str, tuple[str, str]] = {}  # condition type -> (status, lastTransitionTime)
        self.events: list[tuple[str, str, str]] = []  # (type, reason, message) for the emulator to post
        logs = settings.root / "logs" / self.namespace
        logs.mkdir(parents=True, exist_ok=True)
        self.containers = [Container(c, logs / f"{self.name}_{c['name']}.log") for c in pod["spec"]["containers"]]
        self.terminating = False
        self.home = settings.root / "homes" / self.namespace / self.name
        self.home.mkdir(parents=True, exist_ok=True)

    # -- lifecycle --------------------------------------------------------------------------------

    def _start(self, c: Container, images_unpullable: set[str]) -> None:
        image = c.spec.get("image", "")
        if image in images_unpullable:
            now_m = time.monotonic()
            if c.pull_failed_at is None:
                c.pull_failed_at = now_m
                c.waiting = ("ErrImagePull", f'failed to pull and unpack image "{image}": not found (emulated)')
                self.events.append(("Warning", "Failed", f'Failed to pull image "{image}": not found (emulated)'))
            elif now_m - c.pull_failed_at >= self.settings.pull_backoff and c.waiting != _pull_backoff(image):
                c.waiting = _pull_backoff(image)
                self.events.append(("Normal", "BackOff", f'Back-off pulling image "{image}"'))
            return
        c.pull_failed_at = None
        try:
            mounts = self._mounts(c.spec, self._prepare_volumes())
            argv, env = self._command(c.spec, mounts)
        except ConfigError as error:
            if c.waiting != ("CreateContainerConfigError", str(error)):
                self.events.append(("Warning", "Failed", f"Error: {error}"))
            c.waiting = ("CreateContainerConfigError", str(error))
            c.next_start = time.monotonic() + 1.0
            return
        workdir = c.spec.get("workingDir")
        with c.log_path.open("ab") as out:
            out.write(f"--- {now()} emulated start: {argv}\n".encode())
            out.flush()
            try:
                c.process = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    cwd=self._map_path(workdir, mounts) if workdir else None,
                    start_new_session=True,  # the whole process group is signalled on stop
                )
            except OSError as error:
                c.waiting = ("RunContainerError", f"failed to start container process: {error}")
                c.next_start = time.monotonic() + 1.0
                return
        c.container_id = f"emulated://{self.uid[:8]}-{c.name}-{c.process.pid}"
        c.started_at, c.waiting, c.terminated, c.killing = now(), None, None, None
        c.started_mono = time.monotonic()
        c.started, c.ready = False, False
        c.probes = {kind: Probe(c.spec[kind], next_at=time.monotonic() + c.spec[kind].get("initialDelaySeconds", 0))
                    for kind in ("startupProbe", "readinessProbe", "livenessProbe") if c.spec.get(kind)}
        c.started = "startupProbe" not in c.probes
        c.ready = c.started and "readinessProbe" not in c.probes
        self.events.append(("Normal", "Started", f"Started container {c.name}"))
        log.info("pod %s/%s: started %s (pid %d) on %s", self.namespace, self.name, c.name, c.process.pid, self.ip)

    def _signal(self, c: Container, sig: int) -> None:
        if c.process is not None and c.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.process.pid, sig)

    def _stop(self, c: Container, why: str, grace: float) -> None:
        if c.process is None or c.process.poll() is not None or c.killing:
            return
        c.killing = why
        c.kill_deadline = time.monotonic() + min(grace, self.settings.max_grace)
        self._signal(c, signal.SIGTERM)

    def _reap(self, c: Container) -> None:
        """Notices an exited process: records it and schedules the restart the restartPolicy asks for."""
        assert c.process is not None
        code = c.process.returncode
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers of its process group
            os.killpg(c.process.pid, signal.SIGKILL)
        if code < 0:  # killed by a signal: the runtime reports 128 + signal
            code = 128 - code
        state = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": c.started_at,
                 "finishedAt": now(), "containerID": c.container_id}
        log.info("pod %s/%s: %s exited with %d (%s)", self.namespace, self.name, c.name, code, c.killing or "exit")
        c.process, c.ready, c.started = None, False, False
        c.probes = {}
        restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)
        if self.terminating or not restart:
            c.terminated, c.waiting = state, None
            return
        c.last_terminated = state
        c.restart_count += 1
        low, high = self.settings.restart_backoff
        # A liveness/startup kill restarts at once, like the kubelet; crashes back off exponentially (reset
        # after a run that lasted longer than the longest back-off, as the kubelet does after 10 minutes).
        if time.monotonic() - c.started_mono > 2 * high:
            c.backoff = 0.0
        c.backoff = 0.0 if c.killing else (min(high, c.backoff * 2) if c.backoff else low)
        c.next_start = time.monotonic() + c.backoff
        if c.backoff:
            c.waiting = ("CrashLoopBackOff", f"back-off {c.backoff:g}s restarting failed container={c.name} "
                                             f"pod={self.name}_{self.namespace}({self.uid})")
            self.events.append(("Warning", "BackOff", "Back-off restarting failed container "
                                                      f"{c.name} in pod {self.name}_{self.namespace}({self.uid})"))
        c.killing = None

    def _probe_once(self, c: Container, spec: dict[str, Any]) -> bool:
        timeout = min(float(spec.get("timeoutSeconds", 1)), 2.0)
        if "httpGet" in spec:
            get = spec["httpGet"]
            port = _port(c.spec, get["port"])
            scheme = get.get("scheme", "HTTP").lower()
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            try:
                response = httpx.get(f"{scheme}://{get.get('host') or self.ip}:{port}{get.get('path', '/')}",
                                     headers=headers, timeout=timeout, verify=False, trust_env=False)
            except httpx.HTTPError:
                return False
            return 200 <= response.status_code < 400
        if "tcpSocket" in spec:
            try:
                socket.create_connection((self.ip, _port(c.spec, spec["tcpSocket"]["port"])), timeout=timeout).close()
            except OSError:
                return False
            return True
        if "exec" in spec:
            try:
                return subprocess.run(spec["exec"]["command"], capture_output=True, timeout=timeout).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False
        return True

    def _run_probes(self, c: Container) -> None:
        moment = time.monotonic()
        for kind, probe in c.probes.items():
            if moment < probe.next_at or c.killing or (kind != "startupProbe" and not c.started):
                continue
            if kind == "startupProbe" and c.started:
                continue
            period = self.settings.probe_period or float(probe.spec.get("periodSeconds", 10))
            probe.next_at = moment + period
            if self._probe_once(c, probe.spec):
                probe.failures, probe.successes = 0, probe.successes + 1
                if kind == "startupProbe":
                    c.started = True
                    c.ready = "readinessProbe" not in c.probes
                elif kind == "readinessProbe" and probe.successes >= probe.spec.get("successThreshold", 1):
                    c.ready = True
                continue
            probe.failures, probe.successes = probe.failures + 1, 0
            threshold = probe.spec.get("failureThreshold", 3)
            if probe.failures < threshold:
                continue
            if kind == "readinessProbe":
                c.ready = False
            else:
                self.events.append(("Warning", "Unhealthy", f"{kind[:-5].capitalize()} probe failed"))
                self.events.append(("Normal", "Killing", f"Container {c.name} failed {kind[:-5]} probe, "
                                                         "will be restarted"))
                self._stop(c, kind, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))

    def sync(self, unpullable_images: set[str]) -> None:
        """One kubelet iteration: reap exits, start (or restart after back-off), probe, escalate kills."""
        for c in self.containers:
            if c.process is not None and c.process.poll() is not None:
                self._reap(c)
            if c.process is not None:
                if c.killing and time.monotonic() >= c.kill_deadline:
                    self._signal(c, signal.SIGKILL)
                self._run_probes(c)
            elif not self.terminating and c.terminated is None and time.monotonic() >= c.next_start:
                self._start(c, unpullable_images)

    def terminate(self, grace: float) -> None:
        """Graceful stop of every container (pod deleted): SIGTERM now, SIGKILL after `grace`."""
        if not self.terminating:
            self.terminating = True
            names = ", ".join(c.name for c in self.containers)
            self.events.append(("Normal", "Killing", f"Stopping container {names}"))
        for c in self.containers:
            self._stop(c, "delete", grace)

    @property
    def stopped(self) -> bool:
        return all(c.process is None for c in self.containers)

    def signal_all(self, sig: int = signal.SIGTERM) -> None:
        self.terminating = True
        for c in self.containers:
            self._signal(c, sig)

    def kill(self, timeout: float = 5) -> None:
        """Stops everything now (emulator shutdown): SIGTERM, then SIGKILL after `timeout`."""
        self.signal_all()
        deadline = time.monotonic() + timeout
        for c in self.containers:
            if c.process is None:
                continue
            try:
                c.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(c, signal.SIGKILL)
                c.process.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers of its process group
                os.killpg(c.process.pid, signal.SIGKILL)
            c.process = None

    def alive(self) -> bool:
        return any(c.process is not None and c.process.poll() is None for c in self.containers)

    # -- status -----------------------------------------------------------------------------------

    def _container_status(self, c: Container) -> dict[str, Any]:
        if c.process is not None:
            state: dict[str, Any] = {"running": {"startedAt": c.started_at}}
        elif c.terminated is not None:
            state = {"terminated": c.terminated}
        else:
            reason, message = c.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        image = c.spec.get("image", "")
        status = {"name": c.name, "image": image, "imageID": f"emulated://{image}" if c.container_id else "",
                  "ready": c.ready and c.process is not None, "started": c.started and c.process is not None,
                  "restartCount": c.restart_count, "state": state,
                  "lastState": {"terminated": c.last_terminated} if c.last_terminated else {}}
        if c.container_id:
            status["containerID"] = c.container_id
        return status

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        value = "True" if ok else "False"
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != value:
            self.transitions[kind] = (value, now())
        condition = {"type": kind, "status": value, "lastProbeTime": None,
                     "lastTransitionTime": self.transitions[kind][1]}
        if not ok and reason:
            condition |= {"reason": reason, "message": message}
        return condition

    def status(self) -> dict[str, Any]:
        statuses = [self._container_status(c) for c in self.containers]
        ever_started = all(c.container_id for c in self.containers)
        if all(c.terminated is not None for c in self.containers):
            phase = "Succeeded" if all(c.terminated["exitCode"] == 0 for c in self.containers) else "Failed"
        else:
            phase = "Running" if ever_started else "Pending"
        unready = [c.name for c, s in zip(self.containers, statuses, strict=True) if not s["ready"]]
        message = f"containers with unready status: [{' '.join(unready)}]"
        conditions = [
            self._condition("PodReadyToStartContainers", not self.terminating or not self.stopped),
            self._condition("Initialized", True),
            self._condition("Ready", not unready, "ContainersNotReady", message),
            self._condition("ContainersReady", not unready, "ContainersNotReady", message),
            self._condition("PodScheduled", True),
        ]
        return {"phase": phase, "conditions": conditions, "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
                "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": self.start_time,
                "containerStatuses": statuses}


def _pull_backoff(image: str) -> tuple[str, str]:
    return "ImagePullBackOff", f'Back-off pulling image "{image}"'


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ValueError(f"container {container['name']} has no port named {port!r}")


def decode_secret(data: Mapping[str, str] | None, string_data: Mapping[str, str] | None = None) -> dict[str, str]:
    decoded = {key: base64.b64decode(value).decode(errors="replace") for key, value in (data or {}).items()}
    return decoded | dict(string_data or {})
