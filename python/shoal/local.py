"""Attaching to the node's arena through the local agent's Unix socket.

A process on a node that runs ``shoal-agent`` connects to the agent's socket
(its path is in the controller's registry), proves its uid (the agent checks
SO_PEERCRED), and receives the arena's fd. The connection stays open for as
long as the process uses the arena: when it closes and the process is gone,
the agent releases whatever the process still held there.
"""

import json
import os
import select
import socket
import struct

from ._core import Arena


class AgentUnavailable(ConnectionError):
    """The node's agent did not give this process its arena: it refused
    (``reason`` says why, in the agent's words), or it did not answer in
    time. The message names the agent (pid, socket)."""

    def __init__(self, message, path, pid=None, reason=None):
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.reason = reason


def _peer_pid(sock):
    """The pid of the process listening at the other end (SO_PEERCRED), or None."""
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
    except OSError:
        return None


def who_listens(path, timeout=1.0):
    """(pid, agent_id) of the agent that listens on the Unix socket at
    path: its pid as this machine sees it (SO_PEERCRED, known even while
    that process is stopped: the kernel holds the connection in its
    backlog), and the id it says in its greeting (None if it says none
    within timeout: stopped, or busy). (None, None) where nobody listens
    there. The id is what tells an agent from another machine's at the
    same path and pid (containers); the pid is all there is of a stopped
    agent."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        pid = _peer_pid(s)
        try:
            msg, fds, _, _ = socket.recv_fds(s, 4096, 1)
        except OSError:
            return pid, None
        for fd in fds:
            os.close(fd)
        try:
            return pid, json.loads(msg.decode()).get("agent_id")
        except (ValueError, AttributeError):
            return pid, None
    except OSError:
        return None, None
    finally:
        s.close()


class LocalArena:
    """The node's arena, attached through the agent at ``path``.

    ``arena`` is the :class:`shoal.Arena`; ``info`` what the agent said
    (``node``, ``heap_size``). Close it when done; arrays that still use the
    arena keep it mapped.

    Raises :class:`AgentUnavailable` (a ``ConnectionError``) when the agent
    cannot be reached, refuses (its reason is in the message), or does not
    answer within ``timeout`` seconds (stopped, or overloaded).
    """

    def __init__(self, path, timeout=5.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(path)
            except TimeoutError:
                raise AgentUnavailable(f"the shoal agent at {path} did not take the connection within "
                                       f"{timeout:g} s (is it stopped, or overloaded?)", path,
                                       reason="no answer") from None
            except OSError as e:
                raise AgentUnavailable(f"cannot reach the shoal agent at {path}: {e.strerror}", path) from e
            pid = _peer_pid(self._sock)
            who = f"the shoal agent (pid {pid}, socket {path})" if pid else f"the shoal agent at {path}"
            try:
                msg, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
            except TimeoutError:
                raise AgentUnavailable(f"{who} did not answer within {timeout:g} s (is it stopped, or "
                                       f"overloaded?)", path, pid, "no answer") from None
            if not fds:
                try:
                    reason = json.loads(msg.decode()).get("error")
                except ValueError:
                    reason = None
                reason = reason or "it closed the connection without saying why (see its log)"
                raise AgentUnavailable(f"{who} refused to share its arena: {reason}", path, pid, reason)
            self.agent_pid = pid
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

    def gone(self):
        """Whether the agent has closed our connection (it died, or was
        stopped): a poll that never waits, for a client that waits on lanes."""
        try:
            r = select.poll()
            r.register(self._sock.fileno(), select.POLLIN)
            if not r.poll(0):
                return False
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True  # reset, or our socket closed

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
