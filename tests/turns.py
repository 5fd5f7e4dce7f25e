"""A loopback TCP proxy that counts round trips: shared by the round-trip tests and
``benchmarks/roundtrips.py``."""

from __future__ import annotations

import selectors
import socket
import threading


class TurnCounter:
    """A TCP proxy to one server that counts the client's turns over all its connections."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.turns = 0
        self.connections = 0  # connections opened through the proxy
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            with self._lock:
                self.connections += 1
            server = socket.create_connection(self.target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, server)
        selector.register(server, selectors.EVENT_READ, client)
        client_spoke_last = False
        try:
            while True:
                for key, _ in selector.select():
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(1 << 16)
                    if not data:
                        return
                    if source is client:
                        if not client_spoke_last:
                            with self._lock:
                                self.turns += 1
                        client_spoke_last = True
                    else:
                        client_spoke_last = False
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            client.close()
            server.close()


#: The counter the running test counts with (read by the inner projects' conftest).
ACTIVE: TurnCounter | None = None
