"""CurveZMQ on the controller's TCP sockets, and the window on stamps
(docs/controller.md, "Curve" and "Stamps"; docs/protocol.md, "Security").

Real processes throughout. Where a test must see the bytes on the wire, a
small TCP relay in this file sits between a client and the controller's
client port (the client is given a copy of the connection file that names
the relay) and records what passes each way. For everything a client sends
to travel as frames through the controller - not through the node's arena,
whose large arrays only their handles would name - the agent runs in a
mount namespace of its own, where its Unix socket is out of the client's
sight: the client then works as one on another machine does.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shoal
from shoal import _bin, _core

from procs import Agent, Controller, private_mount

MARKER = b"shoal-curve-marker-5e1d"


@pytest.fixture(params=["io_uring", "epoll"])
def backend(request):
    return request.param


def loop_env(backend):
    return {"SHOAL_NO_URING": "1"} if backend == "epoll" else {}


class Relay:
    """Listens on loopback and passes each connection on to target (a
    tcp:// endpoint), recording what passes: up (client to target) and down,
    as the chunks that each recv() got, in order."""

    def __init__(self, target):
        host, port = target[len("tcp://"):].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.up, self.down, self.socks = [], [], []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            up, down = [], []
            with self.lock:
                self.up.append(up)
                self.down.append(down)
                self.socks += [conn, upstream]
            for src, dst, rec in ((conn, upstream, up), (upstream, conn, down)):
                threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True).start()

    def _pump(self, src, dst, rec):
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self.lock:
                rec.append(data)
            try:
                dst.sendall(data)
            except OSError:
                return

    def chunks(self, which="up"):
        with self.lock:
            return [c for conn in (self.up if which == "up" else self.down) for c in conn]

    def recorded(self, which="up"):
        return b"".join(self.chunks(which))

    def close(self):
        self.listener.close()
        with self.lock:
            for s in self.socks:
                s.close()


def through(ctl, relay, path):
    """A copy of ctl's connection file at path whose client endpoint is the relay's."""
    info = dict(ctl.info, client=relay.endpoint)
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return str(path)


def replay(endpoint, chunks, wait=3.0):
    """Sends the recorded chunks as they are, in order, on a new plain TCP
    connection to endpoint, and returns what comes back within wait seconds
    (or until it is closed). A pause between chunks, as the client paused
    for the server's part of the handshake: ZeroMQ refuses a peer that
    sends its messages before the handshake is over."""
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    got = bytearray()
    with socket.create_connection((host, int(port))) as s:
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:  # closed by the peer: the rest is not read anyway
                break
            time.sleep(0.05)
        s.settimeout(0.2)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return bytes(got)


def zmtp_types(data):
    """The shoal message types in a plaintext ZMTP 3 stream from a ROUTER
    to a DEALER: after the 64-byte greeting, frames (flags; size in 1 or 8
    bytes); the first frame of each message is the 96-byte header."""
    types, i, first = [], 64, True
    while i < len(data):
        flags = data[i]
        if flags & 2:
            size, i = int.from_bytes(data[i + 1:i + 9], "big"), i + 9
        else:
            size, i = data[i + 1], i + 2
        body, i = data[i:i + size], i + size
        if flags & 4:  # a command (READY)
            continue
        if first and len(body) == 96 and body[:4] == b"SHWP":
            types.append(int.from_bytes(body[6:8], "little"))
        first = not flags & 1
    return types


def start(tmp_path, curve, backend="io_uring", hidden=False, engines=2, extra=()):
    """A controller (with --curve, or plaintext) and an agent with engines.
    hidden: the agent in a mount namespace of its own (needs root), so that
    clients here go without its arena."""
    if hidden and os.geteuid() != 0:
        pytest.skip("hiding the agent's socket from the client (a mount namespace) needs root")
    ctl = Controller(tmp_path / "home", heartbeat_ms=500, extra=(("--curve",) if curve else ()) + tuple(extra))
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    try:
        agent = Agent(ctl, run, engines=engines, env=loop_env(backend),
                      preexec_fn=private_mount(run, b"mode=0700") if hidden else None)
    except BaseException:
        ctl.stop()
        raise
    return ctl, agent


def refused(ctl):
    _, body = ctl.ask(ctl.socket(), _core.MSG_QUERY, {})
    return body["refused"]


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---- a cluster with Curve --------------------------------------------------------------------

def shoal_cmd(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "shoal", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_curve_cluster_works(tmp_path, backend):
    """`shoal start --curve` on loopback: the connection file has the keys
    (never the server's secret), clients and the agent speak Curve, and
    everything works: apply, push and pull of an array, a load-balanced
    map, `shoal status`, `shoal stop`. On both of the agent's event loops."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = dict(os.environ, SHOAL_DIR=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(run), **loop_env(backend))
    p = shoal_cmd(env, "start", "-n", "2", "--daemonize", "--curve", "--arena-size", str(256 << 20))
    assert p.returncode == 0, p.stderr
    conn = tmp_path / "home" / "profile_default" / "connection.json"
    pids = []
    try:
        info = json.loads(conn.read_text())
        assert set(info["curve"]) == {"server_key", "public_key", "secret_key"}
        assert all(len(v) == 40 for v in info["curve"].values())
        assert conn.stat().st_mode & 0o777 == 0o600
        log = (tmp_path / "home" / "profile_default" / "cluster.log").read_text()
        assert "(CurveZMQ)" in log and "controller tcp://" in log, log
        a = np.arange(1 << 20, dtype="f8")
        for lanes in (False, True):
            with shoal.Client(url_file=str(conn), lanes=lanes) as rc:
                assert rc[:].apply_sync(lambda x: x + 1, 41) == [42, 42]
                rc[:].push({"a": a}, block=True)
                back = rc[:].pull("a", block=True)
                assert all(np.array_equal(b, a) for b in back)
                assert rc.load_balanced_view().map_sync(lambda x: x * x, range(20)) == [x * x for x in range(20)]
                st = rc.cluster_status()
                assert st["curve"] is True
                assert st["refused"]["from_clients"]["unauthenticated"] == 0
                pids = [info["pid"]] + [n["pid"] for n in st["nodes"]] + [e["pid"] for e in st["engines"]]
        s = shoal_cmd(env, "status")
        assert s.returncode == 0 and "2 engine(s)" in s.stdout and f"loop {backend}" in s.stdout, s.stdout
    finally:
        stop = shoal_cmd(env, "stop")
    assert stop.returncode == 0, stop.stderr
    assert not conn.exists()
    assert pids and all(gone(pid) for pid in pids), "no shoal process is left"


@pytest.mark.parametrize("curve", [False, True])
def test_a_frame_of_max_frame_bytes_passes_with_curve_too(tmp_path, curve):
    """ZeroMQ's ZMQ_MAXMSGSIZE sees a frame as it arrives, with Curve's 33
    bytes on top: a frame of exactly --max-frame bytes must pass either way
    (it was dropped, with its connection, under Curve), one byte more not."""
    ctl = Controller(tmp_path / "home", extra=(("--curve",) if curve else ()) + ("--max-frame", "65536"))
    try:
        s = ctl.socket()
        mid = s.send(_core.MSG_QUERY, [b"{}"], [bytes(65536)])
        hdr, *_ = s.recv(timeout=5)
        assert hdr["type"] == _core.MSG_QUERY_REPLY and hdr["reply_to"] == mid
        s.send(_core.MSG_QUERY, [b"{}"], [bytes(65537)])
        with pytest.raises(TimeoutError):  # ZeroMQ cut the connection that carried it
            s.recv(timeout=1)
    finally:
        ctl.stop()


# ---- no plaintext on the wire ----------------------------------------------------------------

@pytest.mark.parametrize("curve", [False, True])
def test_what_crosses_the_wire_is_encrypted_with_curve(tmp_path, monkeypatch, curve):
    """A marker pushed in a large array (a buffer frame, which HMAC does not
    cover), in a small one (inline in the signed payload) and in executed
    code, and pulled back: seen in the relay's bytes without Curve (so that
    the test can fail), never with it, either way. (Through the controller:
    direct tasks, which would go to the agent's bulk server, are off.)"""
    monkeypatch.setenv("SHOAL_NO_DIRECT", "1")
    ctl, agent = start(tmp_path, curve, hidden=True)
    relay = Relay(ctl.info["client"])
    try:
        with shoal.Client(url_file=through(ctl, relay, tmp_path / "relay.json"), lanes=False) as rc:
            assert rc.arena is None, "the agent's socket is hidden: everything travels through the controller"
            big = np.frombuffer(MARKER * (200_000 // len(MARKER)), dtype="u1")
            small = np.frombuffer(MARKER * 2, dtype="u1")
            rc[:].push({"big": big, "small": small}, block=True)
            rc[:].execute(f"code = {MARKER.decode()!r} * 3", block=True)
            assert [bytes(b) for b in rc[:].pull("big", block=True)] == [big.tobytes()] * 2
            assert rc[:].pull("code", block=True) == [MARKER.decode() * 3] * 2
        up, down = relay.recorded("up"), relay.recorded("down")
        assert len(up) > 190_000 and len(down) > 390_000, "the arrays went through the relay"
        if curve:
            assert MARKER not in up and MARKER not in down
            assert b"SHWP" not in up and b"SHWP" not in down, "not even the headers are readable"
        else:
            assert MARKER in up and MARKER in down
    finally:
        relay.close()
        agent.stop()
        ctl.stop()


# ---- who is admitted --------------------------------------------------------------------------

def strangers_file(ctl, path, **change):
    """A copy of ctl's connection file with another member key pair (or the
    curve fields given)."""
    pub, sec = _core.curve_keypair()
    info = dict(ctl.info, curve=dict(ctl.info["curve"], public_key=pub, secret_key=sec, **change))
    path.write_text(json.dumps(info))
    return info


def test_a_stranger_is_refused_at_once_and_the_members_go_on(tmp_path):
    """A client whose connection file has another member key pair gets a
    clear error at once (not a hang); the controller counts and logs each
    refused connection (10 lines in 10 s at most) and serves its members."""
    ctl, agent = start(tmp_path, True)
    try:
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as member:
            assert member[:].apply_sync(os.getpid)
            info = strangers_file(ctl, tmp_path / "stranger.json")
            t0 = time.monotonic()
            with pytest.raises(ConnectionError, match=r"refused this process's Curve key \(ZAP status 400\)"):
                shoal.Client(url_file=str(tmp_path / "stranger.json"), timeout=30)
            assert time.monotonic() - t0 < 5
            # Many strangers: every one refused and counted, the log kept short.
            socks = [ctl.socket(curve=info["curve"]) for _ in range(25)]
            for s in socks:
                with pytest.raises(ConnectionRefusedError, match="ZAP status 400"):
                    s.recv(timeout=10)
                s.close()
            counts = refused(ctl)["from_clients"]
            assert counts["unauthenticated"] >= 26 and counts["handshake_failed"] == 0
            assert refused(ctl)["from_agents"]["unauthenticated"] == 0
            lines = [x for x in ctl.log.read_text().splitlines() if "refused a connection from 127.0.0.1" in x]
            assert 1 <= len(lines) <= 10, lines
            assert "to the clients' port: its Curve key is not this cluster's member key" in lines[0]
            # The member's work goes on, and so does a new member's.
            assert member[:].apply_sync(lambda: 7) == [7, 7]
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as again:
            assert again.load_balanced_view().map_sync(abs, [-1, -2]) == [1, 2]
    finally:
        agent.stop()
        ctl.stop()


def test_bad_keys_in_a_connection_file_name_the_file_and_field(tmp_path):
    """Not a crash, not a hang: a ValueError that says which file and field."""
    ctl = Controller(tmp_path / "home", extra=("--curve",))
    try:
        path = tmp_path / "bad.json"
        for change, words in (({"secret_key": "short"}, "curve.secret_key is not 40 characters long"),
                              ({"server_key": "~" * 40}, "curve.server_key has a character that is not Z85's"),
                              ({"public_key": None}, "curve.public_key is missing")):
            info = dict(ctl.info, curve=dict(ctl.info["curve"], **change))
            path.write_text(json.dumps(info))
            with pytest.raises(ValueError, match=f"the connection file {path} is not usable: {words}"):
                shoal.Client(url_file=str(path))
        info = dict(ctl.info, curve=dict(ctl.info["curve"], public_key=_core.curve_keypair()[0]))
        path.write_text(json.dumps(info))
        with pytest.raises(ValueError, match="curve.public_key is not the public half of secret_key"):
            shoal.Client(url_file=str(path))
        path.write_text(json.dumps(dict(ctl.info, curve="yes")))
        with pytest.raises(ValueError, match="curve must be null, or an object"):
            shoal.Client(url_file=str(path))
    finally:
        ctl.stop()


def test_an_agent_with_the_wrong_keys_stops_and_says_why(tmp_path, backend):
    """An agent given another member key pair is refused (counted on the
    agents' port) and exits with status 1 and the reason, rather than
    waiting for ever; one given bad key text says which field."""
    ctl = Controller(tmp_path / "home", extra=("--curve",))
    try:
        for n, (change, words) in enumerate((({}, "refused this process's Curve key (ZAP status 400)"),
                                             ({"server_key": "x"}, "curve.server_key is not 40 characters"))):
            home = tmp_path / f"other{n}"
            (home / "profile_default").mkdir(parents=True)
            conn = home / "profile_default" / "connection.json"
            if change:
                conn.write_text(json.dumps(dict(ctl.info, curve=dict(ctl.info["curve"], **change))))
            else:
                strangers_file(ctl, conn)
            run = tmp_path / f"run{n}"
            run.mkdir(mode=0o700)
            env = dict(os.environ, SHOAL_DIR=str(home), XDG_RUNTIME_DIR=str(run), **loop_env(backend))
            p = subprocess.run([_bin.find("shoal-agent"), "--engines", "0", "--arena-size", str(64 << 20)],
                               env=env, capture_output=True, text=True, timeout=20)
            assert p.returncode == 1 and words in p.stderr, p.stderr
        assert refused(ctl)["from_agents"]["unauthenticated"] >= 1
    finally:
        ctl.stop()


# ---- replays ---------------------------------------------------------------------------------

def record_a_session(ctl, relay, tmp_path, side):
    """Through the relay, a client sets x = 1 on every engine and appends a
    line to the file side; then, directly, another sets x = 2. Returns the
    chunks the first client sent."""
    with shoal.Client(url_file=through(ctl, relay, tmp_path / "relay.json"), lanes=False) as rc:
        rc[:].execute(f"x = 1\nopen({str(side)!r}, 'a').write('ran\\n')", block=True)
    relay.close()
    with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
        rc[:].execute("x = 2", block=True)
    assert side.read_text() == "ran\n" * 2
    return relay.chunks("up")


@pytest.mark.parametrize("curve", [True, False])
def test_a_replayed_session_fails_at_the_curve_handshake(tmp_path, curve):
    """The client's bytes of a session, replayed verbatim on a new TCP
    connection, fail at the handshake (its session keys are gone): nothing
    runs, and the replayer gets handshake bytes, no result. Without Curve,
    and within the stamps' window, the same replay runs the code again: the
    replayer is faithful, and plaintext clusters have only the window
    (below) against it."""
    ctl, agent = start(tmp_path, curve)
    try:
        side = tmp_path / "side-effect.txt"
        data = record_a_session(ctl, Relay(ctl.info["client"]), tmp_path, side)
        before = refused(ctl)["from_clients"]["handshake_failed"]
        got = replay(ctl.info["client"], data)
        time.sleep(0.5)
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            x = rc[:].pull("x", block=True)
        if not curve:
            assert _core.MSG_RESULT in zmtp_types(got)
            assert side.read_text() == "ran\n" * 4 and x == [1, 1], "plaintext, within the window: it ran again"
            return
        assert len(got) < 512, f"{len(got)} bytes: more than a greeting and a WELCOME"
        assert b"SHWP" not in got
        assert side.read_text() == "ran\n" * 2, "the recorded code did not run again"
        assert x == [2, 2]
        assert refused(ctl)["from_clients"]["handshake_failed"] == before + 1
        assert "a connection to the clients' port failed its handshake" in ctl.log.read_text()
    finally:
        agent.stop()
        ctl.stop()


def test_a_replayed_plaintext_session_is_refused_once_its_stamps_are_old(tmp_path):
    """Without Curve (loopback), the stamps are the fence: the same replay
    after the window (--max-skew-ms, here 5 s) is refused message by
    message, counted, and answered with errors; nothing runs."""
    ctl, agent = start(tmp_path, False, extra=("--node-timeout-ms", "2000", "--max-skew-ms", "5000"))
    try:
        side = tmp_path / "side-effect.txt"
        data = record_a_session(ctl, Relay(ctl.info["client"]), tmp_path, side)
        assert b"SHWP" in b"".join(data) and b"side-effect.txt" in b"".join(data), "plaintext: it is readable"
        time.sleep(5.5)
        got = replay(ctl.info["client"], data)
        types = zmtp_types(got)
        assert types and set(types) == {_core.MSG_ERROR}, types
        time.sleep(0.5)
        assert side.read_text() == "ran\n" * 2
        with shoal.Client(url_file=str(ctl.conn), lanes=False) as rc:
            assert rc[:].pull("x", block=True) == [2, 2]
        assert refused(ctl)["from_clients"]["stale"] == len(types)
        assert "before this controller's clock, past --max-skew-ms 5000" in ctl.log.read_text()
    finally:
        agent.stop()
        ctl.stop()
