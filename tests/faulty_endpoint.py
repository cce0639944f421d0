"""A real TCP endpoint in front of an S3-compatible server that the tests turn into bad weather.

:class:`FaultyEndpoint` listens on 127.0.0.1 and forwards every connection to a target (the moto server), byte for
byte, until a test sets another mode:

* ``"forward"``: a working endpoint;
* ``"refuse"``: the listening socket is closed, so a connect is refused (the server is down);
* ``"reset"``: a connection is accepted and reset at once (RST), and so is every connection that was open when the
  mode was set (a server that crashed, a load balancer that drops its connections);
* ``"503"``: every request is answered ``503 Slow Down`` (S3 throttling) without reaching the target;
* ``"403"``: every request is answered ``403 Access Denied`` (a configuration error, never transient).

``faults`` counts the connections that were reset or answered with an error, so a test can show that its run really
met the weather. No mocks: the clients under test (pyarrow's S3 file system, in any process) talk TCP to it.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from typing import Optional

from tcp_proxy import listen

_RESPONSES = {
    "503": (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n"
            b"\r\n%s", b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce '
                      b'your request rate.</Message></Error>'),
    "403": (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n"
            b"\r\n%s", b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access '
                      b'Denied</Message></Error>'),
}


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST (SO_LINGER 0) instead of an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultyEndpoint:
    """A TCP proxy on 127.0.0.1 (``port``, fixed for its life) to ``target`` whose behaviour :meth:`set` changes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"
        self.faults = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: Optional[socket.socket] = None
        self._stopped = False
        # A port below Linux's ephemeral range (32768-60999): while the endpoint is down ("refuse"), no outgoing
        # connection of this busy machine can take its port, so it can always listen on it again.
        for _ in range(200):
            self.port = random.randrange(20000, 32000)
            try:
                self._listen()
                break
            except OSError:
                continue
        else:
            raise OSError("no free port for the faulty endpoint")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        sock = listen(self.port)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def set(self, mode: str) -> None:
        """Switch to ``mode`` (see the module doc); open connections are reset unless the mode is ``forward``."""
        assert mode in ("forward", "refuse", "reset", "503", "403"), mode
        with self._lock:
            self.mode = mode
            if mode != "forward":
                for s in list(self._open):
                    _reset(s)
                self._open.clear()
            if mode == "refuse" and self._listener is not None:
                # shutdown first: a plain close() from this thread leaves the accept() blocked in another thread
                # holding the socket, still listening (connections accepted, and the port not free to listen again)
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
        if mode != "refuse" and self._listener is None and not self._stopped:
            for attempt in range(50):  # the port may linger for a moment after the close
                try:
                    self._listen()
                    break
                except OSError:
                    if attempt == 49:
                        raise
                    time.sleep(0.1)

    def close(self) -> None:
        self._stopped = True
        self.set("refuse")

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed ("refuse")
            mode = self.mode
            if mode == "forward":
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()
                continue
            with self._lock:
                self.faults += 1
            if mode in _RESPONSES:
                threading.Thread(target=self._answer, args=(client, mode), daemon=True).start()
            else:
                _reset(client)

    @staticmethod
    def _answer(client: socket.socket, mode: str) -> None:
        """Read one request head (and drop any body) and answer it with the mode's error."""
        head, body = _RESPONSES[mode]
        client.settimeout(5)
        with contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            client.sendall(head % (len(body), body))
            client.shutdown(socket.SHUT_WR)
            while client.recv(65536):  # let the client finish sending its body before the close
                pass
        with contextlib.suppress(OSError):
            client.close()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if self.mode != "forward":
                _reset(client)
                _reset(upstream)
                return
            self._open.update((client, upstream))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(1 << 16)
                    if not data:
                        break
                    dst.sendall(data)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
            except OSError:
                _reset(src)
                _reset(dst)
            finally:
                with self._lock:
                    self._open.discard(src)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)
