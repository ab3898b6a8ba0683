"""Attaching to the node's arena through the local agent's Unix socket.

A process on a node that runs ``shoal-agent`` connects to the agent's socket
(its path is in the controller's registry), proves its uid (the agent checks
SO_PEERCRED), and receives the arena's fd. The connection stays open for as
long as the process uses the arena: when it closes and the process is gone,
the agent releases whatever the process still held there.
"""

import json
import os
import socket

from ._core import Arena


class LocalArena:
    """The node's arena, attached through the agent at ``path``.

    ``arena`` is the :class:`shoal.Arena`; ``info`` what the agent said
    (``node``, ``heap_size``). Close it when done; arrays that still use the
    arena keep it mapped.
    """

    def __init__(self, path, timeout=5.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(path)
            except OSError as e:
                raise ConnectionError(f"cannot reach the shoal agent at {path}: {e.strerror}") from e
            msg, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
            if not fds:
                raise ConnectionError(f"the shoal agent at {path} refused to share its arena "
                                      f"(it only serves processes of its own user)")
            try:
                self.info = json.loads(msg.decode())
                self.arena = Arena.attach(fds[0])
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException:
            self._sock.close()
            raise

    def ask(self, request):
        """Sends the agent one JSON request line and returns its one-line answer."""
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"the shoal agent at {self.path} closed the connection")
            data += chunk
        return json.loads(data.decode())

    def close(self):
        """Detaches. Arrays that still use the arena keep it mapped: it is
        released when the last of them is collected."""
        try:
            self.arena.close()
        except BufferError:
            pass  # arrays still use it; the Arena object closes itself when they are gone
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
