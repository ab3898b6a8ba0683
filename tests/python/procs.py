"""Starting and stopping real shoal processes for the tests."""

import ctypes
import json
import os
import signal
import subprocess
import time

from shoal import _bin, _core


def controller_binary():
    return _bin.find("shoal-controller")


class Controller:
    def __init__(self, root, profile="default", heartbeat_ms=200, extra=()):
        self.root = root
        self.profile = profile
        self.dir = root / f"profile_{profile}"
        self.conn = self.dir / "connection.json"
        env = dict(os.environ, SHOAL_DIR=str(root))
        # Logs go to a file, not a pipe nobody reads (which would fill up and block).
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / f"controller-{profile}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([controller_binary(), "--profile", profile, "--heartbeat-ms",
                                          str(heartbeat_ms), *extra], env=env, stderr=log)
        deadline = time.monotonic() + 10
        while not self.conn.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "no connection file"
            time.sleep(0.01)
        self.info = json.loads(self.conn.read_text())
        self.key = bytes.fromhex(self.info["key"])
        self.sockets = []

    def socket(self, which="client", key=None, identity=None, curve=False):
        """A dealer to one of the controller's ports, with the cluster key
        (or key) and the connection file's Curve keys (or curve's: a dict
        of them, or None for plaintext)."""
        kw = {"identity": identity} if identity else {}
        s = _core.Socket("dealer", key or self.key, connect=self.info[which],
                         curve=self.info.get("curve") if curve is False else curve, **kw)
        self.sockets.append(s)
        return s

    def ask(self, sock, type, body=None, timeout=5):
        payload = [json.dumps(body).encode()] if body is not None else []
        mid = sock.send(type, payload)
        hdr, payload, _, _ = sock.recv(timeout=timeout)
        assert hdr["reply_to"] == mid
        return hdr["type"], json.loads(bytes(payload[0])) if payload else None

    def stop(self):
        for s in self.sockets:
            s.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return rc


class Agent:
    """A shoal-agent for the profile of `ctl`, with its own runtime directory."""

    def __init__(self, ctl, runtime, arena_size=256 << 20, env=None, engines=0, extra=(), preexec_fn=None):
        self.ctl = ctl
        self.runtime = runtime
        runtime.mkdir(mode=0o700, exist_ok=True)
        e = dict(os.environ, SHOAL_DIR=str(ctl.root), XDG_RUNTIME_DIR=str(runtime), **(env or {}))
        self.log = runtime / "agent.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([_bin.find("shoal-agent"), "--profile", ctl.profile, "--engines",
                                          str(engines), "--arena-size", str(arena_size), *extra], env=e,
                                         stderr=log, preexec_fn=preexec_fn)
        self.client = ctl.socket()
        try:
            self._wait_registered(ctl, engines)
        except BaseException:  # the agent and its engines must not outlive a failed start
            self.stop(signal.SIGKILL, timeout=5)
            raise

    def _wait_registered(self, ctl, engines):
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            _, reg = ctl.ask(self.client, _core.MSG_REGISTER)
            mine = [n for n in reg["nodes"] if n["pid"] == self.proc.pid]
            ready = [e for e in reg["engines"] if mine and e["node"] == mine[0]["id"] and e["alive"]]
            # The agent has heard its node id too (a LocalArena's info says it).
            if mine and len(ready) == engines and "registered as node" in self.log.read_text():
                self.node = mine[0]
                self.engines = ready
                break
            assert time.monotonic() < deadline, "the agent never registered"
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def evaluate(view, code):
    """The value of code's last line, an expression, on each engine of view
    (one value for a view of one engine), after its other lines have run.
    execute gives ExecuteReplies, as ipyparallel's does, not values."""
    *before, last = code.rstrip("\n").rsplit("\n", 1)
    view.execute("\n".join(before + [f"_shoal_test_value = {last}"]), block=True)
    try:
        return view.pull("_shoal_test_value", block=True)
    finally:
        view.execute("del _shoal_test_value", block=True)


# ---- a node of its own: a private mount namespace -------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x20000, 0x4000, 1 << 18


def private_mount(over, options=None):
    """For preexec_fn: a mount namespace of the child's own, with an empty
    tmpfs over the directory `over` (the files there are not the child's,
    and the child's there are not ours), mounted with options (e.g.
    b"mode=0700"). Needs root."""
    def setup():
        if libc.unshare(CLONE_NEWNS) != 0 or \
                libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0 or \
                libc.mount(b"tmpfs", str(over).encode(), b"tmpfs", 0, options) != 0:
            raise OSError(ctypes.get_errno(), "cannot make a private mount namespace")
    return setup


# ---- memory cgroups ------------------------------------------------------------------

def _own_cgroup(v1):
    """This process's cgroup path in the v2 hierarchy, or the v1 memory one."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            if (v1 and "memory" in ctrls.split(",")) or (not v1 and hid == "0" and ctrls == ""):
                return path
    return None


def _mount(v1):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            fields, (fstype, _, sup) = pre.split(), post.split()[:3]
            if (v1 and fstype == "cgroup" and "memory" in sup.split(",")) or (not v1 and fstype == "cgroup2"):
                return fields[4], fields[3]
    return None, None


def make_cgroup(v1, limit):
    """A child of our own memory cgroup with its memory limit set, or a
    reason to skip."""
    point, root = _mount(v1)
    own = _own_cgroup(v1)
    if point is None or own is None:
        return None, f"no cgroup {'v1 memory' if v1 else 'v2'} hierarchy mounted"
    if root != "/" and own.startswith(root):
        own = own[len(root):]
    parent = os.path.join(point, own.lstrip("/"))
    if not v1:
        try:
            with open(os.path.join(parent, "cgroup.controllers")) as f:
                if "memory" not in f.read().split():
                    return None, f"cgroup v2 at {point}: no memory controller delegated to {parent}"
        except OSError as e:
            return None, f"cgroup v2 at {point}: {e}"
    path = os.path.join(parent, f"shoal-test-{os.getpid()}")
    try:
        os.mkdir(path)
    except OSError as e:
        return None, f"cannot make a cgroup under {parent}: {e.strerror}"
    try:
        if not v1:
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        with open(os.path.join(path, "memory.limit_in_bytes" if v1 else "memory.max"), "w") as f:
            f.write(str(limit))
    except OSError as e:
        os.rmdir(path)
        return None, f"cannot set a memory limit in {path}: {e.strerror}"
    return path, None


def remove_cgroup(path):
    """Removes a cgroup of make_cgroup's once the processes in it are gone
    (the kernel lets go of a dead process's membership a little later)."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)
