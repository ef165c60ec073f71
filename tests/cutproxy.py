"""A TCP proxy on 127.0.0.1 that lets a fixed number of client bytes through
to the server and then cuts every connection: Wi-Fi dying mid-upload,
at a point a test chooses rather than one a race does."""

from __future__ import annotations

import socket
import threading


class CutProxy:
    def __init__(self, target_port: int, budget: int) -> None:
        self.target_port = target_port
        self.budget = budget  # client -> server bytes before the cut
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "CutProxy":
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cut()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, server]
            for src, dst, metered in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._pump, args=(src, dst, metered),
                                          daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, metered: bool) -> None:
        try:
            while data := src.recv(65536):
                if metered:
                    with self._lock:
                        allowed = min(len(data), self.budget)
                        self.budget -= allowed
                    dst.sendall(data[:allowed])
                    if self.budget == 0:
                        self._cut()
                        return
                else:
                    dst.sendall(data)
        except OSError:
            return

    def _cut(self) -> None:
        self.cut.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
