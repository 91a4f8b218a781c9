"""`lmkube server start|stop|status`: a local `lmkube serve` in the background, tracked by a pid file
($LMKUBE_HOME/server.json), as `lms server` manages LM Studio's."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from lmkube.server.config import ServerConfig
from lmkube.server.store.paths import lmkube_home

from .client import Client, CliError
from .output import print_json, style

SERVER_EXAMPLES = """examples:
  lmkube server start -d                      in the background on 127.0.0.1:1234 (log: $LMKUBE_HOME/server.log)
  lmkube server start --port 8080 --bind 0.0.0.0 --cors -d
  lmkube server status --json
  lmkube server stop
"""
_START_TIMEOUT_S = 60.0


def pid_file() -> Path:
    return lmkube_home() / "server.json"


def register(commands: Any) -> None:
    server = commands.add_parser("server", help="start, stop and check a local server", epilog=SERVER_EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = server.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="start the server", epilog=SERVER_EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    start.add_argument("-p", "--port", type=int, default=ServerConfig.port, help="port (default %(default)s)")
    start.add_argument("--bind", default=ServerConfig.host, help="address to listen on (default %(default)s)")
    start.add_argument("--cors", action="store_true", help="allow cross-origin requests from browsers")
    start.add_argument("-d", "--detach", action="store_true", help="run in the background")
    start.add_argument("--models-dir", type=Path, help="model store (default $LMKUBE_HOME/models)")
    start.set_defaults(func=start_server)
    actions.add_parser("stop", help="stop the server started with `server start`").set_defaults(func=stop_server)
    status = actions.add_parser("status", help="is the server running?")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=server_status)


def read_state() -> dict[str, Any] | None:
    """The recorded server, if its process is still alive (a stale file is removed)."""
    path = pid_file()
    try:
        state = json.loads(path.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid):
        path.unlink(missing_ok=True)
        return None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a recycled pid belongs to some other program
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"serve" in cmdline or b"lmkube" in cmdline


def _serve_command(args: argparse.Namespace) -> list[str]:
    # The installed script next to this interpreter: `python -m lmkube` run from some other checkout's root would
    # import that checkout's lmkube/ rather than the installed one.
    script = Path(sys.executable).with_name("lmkube")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "lmkube"]
    command = [*launcher, "serve", "--host", args.bind, "--port", str(args.port)]
    if args.cors:
        command.append("--cors")
    if args.models_dir:
        command += ["--models-dir", str(args.models_dir)]
    return command


def _write_state(pid: int, args: argparse.Namespace, log: Path | None) -> None:
    path = pid_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"pid": pid, "port": args.port, "host": args.bind, "log": str(log) if log else None,
             "started_at": time.time()}
    path.write_text(json.dumps(state))


def start_server(args: argparse.Namespace) -> int:
    if (state := read_state()) is not None:
        print(f"The server is already running on port {state['port']} (pid {state['pid']}).")
        return 0
    if not args.detach:
        _write_state(os.getpid(), args, None)
        try:
            return subprocess.call(_serve_command(args))
        except KeyboardInterrupt:
            return 0
        finally:
            pid_file().unlink(missing_ok=True)
    log = lmkube_home() / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(_serve_command(args), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    _write_state(process.pid, args, log)
    host = "127.0.0.1" if args.bind in ("0.0.0.0", "::") else args.bind
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pid_file().unlink(missing_ok=True)
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise CliError(f"the server exited with code {process.returncode}: {tail[0]} (log: {log})")
        try:
            if httpx.get(f"http://{host}:{args.port}/health", timeout=1).status_code == 200:
                print(f"Success! Server is now running on port {args.port} (pid {process.pid}, log: {log}).")
                return 0
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise CliError(f"the server did not answer on port {args.port} within {_START_TIMEOUT_S:.0f}s (log: {log})")


def stop_server(_args: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print("The server is not running.")
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file().unlink(missing_ok=True)
    print(f"Stopped the server on port {state['port']}.")
    return 0


def server_status(args: argparse.Namespace) -> int:
    state = read_state()
    report: dict[str, Any] = {"running": state is not None}
    if state is not None:
        host = "127.0.0.1" if state["host"] in ("0.0.0.0", "::") else state["host"]
        report |= {"port": state["port"], "pid": state["pid"], "host": state["host"], "log": state.get("log")}
        try:
            client = Client(host, state["port"])
            report["models"] = [i["id"] for i in client.get("/api/v1/instances")["instances"]]
        except CliError as exc:  # alive but not answering (still starting, or a token is needed)
            report["models"] = None
            report["error"] = exc.message
    if args.json:
        print_json(report)
    elif state is None:
        print("The server is not running.")
    else:
        models = report["models"]
        loaded = "unknown" if models is None else (", ".join(models) or "none")
        print(f"The server is {style('running', 'green')} on port {state['port']} (pid {state['pid']}). "
              f"Loaded models: {loaded}")
    return 0
