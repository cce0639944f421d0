"""Test and benchmark helper: a TCP proxy on 127.0.0.1 in front of a local server (the moto S3 server).

``rate`` caps the bytes per second forwarded toward the server (a slow upload link); :meth:`TCPProxy.stop` closes
the port and every open connection (the endpoint is unreachable: a storage outage), :meth:`TCPProxy.start` opens the
same port again, in front of the same server and its state.

    proxy = TCPProxy(target_port=moto_port, rate=500_000).start()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
    proxy.stop(); time.sleep(30); proxy.start()       # a 30 s outage
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Optional


def listen(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` (0: a free port), reusable at once after a close."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


class TCPProxy:
    def __init__(self, target_port: int, *, rate: Optional[float] = None, port: int = 0,
                 target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, int(target_port))
        self.rate = rate  # bytes per second toward the server, None: unlimited
        self.port = int(port)
        self._listener: Optional[socket.socket] = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TCPProxy:
        s = listen(self.port)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the port and cut every connection: clients get refused or reset until :meth:`start`."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    @property
    def running(self) -> bool:
        return self._listener is not None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                rate = self.rate if upload else None  # read once: a test may lift the limit meanwhile
                if rate:
                    for i in range(0, len(data), 16384):  # small slices: the rate holds within a request
                        dst.sendall(data[i:i + 16384])
                        time.sleep(min(len(data) - i, 16384) / rate)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns -= {src, dst}
            src.close()


__all__ = ["TCPProxy"]
