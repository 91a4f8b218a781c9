"""A TCP forwarder: how pods on the real test node reach the test kube-apiserver.

The apiserver listens on loopback only (the tests and the host's kubectl/helm use it there);
pods cannot reach the host's loopback. The node forwards its bridge address (the `kubernetes` Service's
endpoint, see RealNode.expose_apiserver) to it, so in-cluster clients (the operator pods) work unchanged.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpForwarder:
    """Accepts on (listen_host, listen_port) and pipes each connection to (target_host, target_port)."""

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server = socket.create_server((listen_host, listen_port), reuse_port=False)
        self._server.settimeout(0.5)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tcp-forward", daemon=True)

    def start(self) -> TcpForwarder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self._server.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            source.shutdown(socket.SHUT_RD)
