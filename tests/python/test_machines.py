"""A cluster of several machines: hosts made by the test (hosts.py: each a
network, mount, UTS and IPC namespace of its own, joined by a bridge), the
controller on the first, listening on its bridge address, the others joined
with `shoal agent --join` and a copy of the connection file.

Every process runs inside a host; the test's own process only reads what
they print. Skips, with the reason, where namespaces cannot be made (not
root, no iproute2)."""

import json
import os
import signal
import sys
import textwrap
import threading
import time

import pytest

import hosts

topo = hosts.fixture(3)

PROFILE_FILE = "/tmp/shoal/profile_default/connection.json"
JOIN_FILE = "/tmp/cluster.json"
ENGINES = 2  # per host
HEARTBEAT_MS, NODE_TIMEOUT_MS = 250, 3000


_backend = {}  # SHOAL_NO_URING for the agents, per the cluster fixture's parameter


def _env(host):
    env = dict(os.environ, SHOAL_DIR="/tmp/shoal", HOME="/tmp", **_backend)
    env.pop("XDG_RUNTIME_DIR", None)  # each host's own /tmp/shoal-<uid> then
    return env


def shoal(host, *args, timeout=60, check=True):
    """`python -m shoal ARGS` in host; its CompletedProcess."""
    p = host.run([sys.executable, "-m", "shoal", *args], env=_env(host), capture_output=True, text=True,
                 timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"shoal {' '.join(args)} on {host.name} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def client(host, body, timeout=120, **names):
    """Runs body in a Python client on host (rc: a Client of the cluster,
    `out`: what it returns, as JSON) and returns out."""
    conn = PROFILE_FILE if host.index == 0 else JOIN_FILE
    code = "\n".join([
        "import json, os, socket, sys, time",
        "import numpy as np",
        "import shoal as ipp",
        *(f"{k} = {v!r}" for k, v in names.items()),
        f"rc = ipp.Client(url_file={conn!r}, timeout=20)",
        "out = None",
        textwrap.dedent(body),
        "rc.close()",
        "print('OUT' + json.dumps(out))",
    ])
    p = host.run([sys.executable, "-c", code], env=_env(host), capture_output=True, text=True, timeout=timeout)
    lines = [line for line in p.stdout.splitlines() if line.startswith("OUT")]
    if p.returncode or not lines:
        raise AssertionError(f"client on {host.name} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return json.loads(lines[-1][3:])


def client_submitted(host, body, **names):
    """Runs client(host, body) in a thread, and returns (thread, result: the
    dict its out fills) once body has written /tmp/submitted on host (its
    tasks are in flight): the test then breaks something under them."""
    host.path("/tmp/submitted").unlink(missing_ok=True)
    result = {}
    th = threading.Thread(target=lambda: result.update(client(host, body, **names)))
    th.start()
    deadline = time.monotonic() + 30
    while not host.path("/tmp/submitted").exists():
        assert th.is_alive() and time.monotonic() < deadline, f"the client on {host.name} did not submit"
        time.sleep(0.02)
    return th, result


def registry(host):
    return client(host, "out = rc._control(ipp._core.MSG_REGISTER)")


def copy_connection(topo, to):
    text = topo[0].path(PROFILE_FILE).read_bytes()
    for path in (JOIN_FILE, PROFILE_FILE):  # --join's, and the profile's (shoal status and stop)
        dest = to.path(path)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(text)


def join(host):
    p = shoal(host, "agent", "--join", JOIN_FILE, "-n", str(ENGINES), "--daemonize")
    assert "joined the cluster" in p.stdout, p.stdout
    return p


def shoal_pids(topo):
    """The pids of shoal's processes in each host (by their namespaces)."""
    found = {}
    for h in topo:
        mine = os.readlink(f"/proc/{h.holder_pid}/ns/mnt")
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") != mine:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if any(os.path.basename(a).startswith(b"shoal-") for a in cmd[:1]):
                pids.append(int(entry))
        found[h.index] = pids
    return found


@pytest.fixture(scope="module", params=["io_uring", "epoll"])
def cluster(request, topo):
    """The controller and 2 engines on host 0, listening on its bridge
    address; hosts 1 and 2 joined with 2 engines each; the agents on each
    event-loop backend in turn."""
    _backend.clear()
    if request.param == "epoll":
        _backend["SHOAL_NO_URING"] = "1"
    h0 = topo[0]
    shoal(h0, "start", "-n", str(ENGINES), "--ip", h0.addr, "--daemonize", "--heartbeat-ms", str(HEARTBEAT_MS),
          "--node-timeout-ms", str(NODE_TIMEOUT_MS))
    try:
        for h in topo[1], topo[2]:
            copy_connection(topo, h)
            join(h)
        yield topo
    finally:
        shoal(h0, "stop", check=False, timeout=60)


def test_hosts_join_and_share_the_work(cluster):
    topo = cluster
    reg = registry(topo[1])
    nodes = [n for n in reg["nodes"] if n["alive"]]
    assert sorted(n["host"] for n in nodes) == sorted(h.hostname for h in topo)
    assert len({n["agent_id"] for n in nodes}) == 3
    if _backend:
        assert {n["loop"] for n in nodes} == {"epoll"}
    out = client(topo[1], """
        rc.wait_for_engines(6, timeout=30)
        dv = rc[:]
        where = dv.apply_sync(socket.gethostname)
        a = np.arange(1 << 20, dtype=np.float64)
        dv.push({"a": a}, block=True)
        sums = dv.apply_sync(lambda: float(a.sum()))
        pulled = rc[-1].pull("a", block=True)
        dv.scatter("part", np.arange(1000), block=True)
        gathered = dv.gather("part", block=True)
        squares = rc.load_balanced_view().map_sync(lambda x: x * x, range(200))
        out = {"where": where, "sums": sums, "pulled_ok": bool((pulled == a).all()),
               "gathered_ok": bool((gathered == np.arange(1000)).all()), "squares_ok": squares == [x * x for x in range(200)],
               "ids": rc.ids, "local_node": rc._local_node, "lanes": sorted(e for e, l in rc._routes.lane.lanes.items() if l),
               "engine_nodes": {str(e["id"]): e["node"] for e in rc._control(ipp._core.MSG_REGISTER)["engines"]},
               "hostname": socket.gethostname()}
    """)
    assert sorted(set(out["where"])) == sorted(h.hostname for h in topo)
    assert out["sums"] == [float(sum(range(1 << 20)))] * 6
    assert out["pulled_ok"] and out["gathered_ok"] and out["squares_ok"]
    # The client uses the arena and lanes of its own host's agent only.
    mine = next(n for n in nodes if n["host"] == out["hostname"])
    assert out["local_node"] == mine["id"]
    assert out["lanes"] and all(out["engine_nodes"][str(e)] == mine["id"] for e in out["lanes"])


def test_status_on_a_joined_host_lists_every_node(cluster):
    p = shoal(cluster[2], "status")
    assert "3 node(s), 6 engine(s)" in p.stdout, p.stdout
    for h in cluster:
        assert h.hostname in p.stdout


def test_a_short_link_drop_loses_nothing(cluster):
    """A link down for less than the node timeout: a task running on the
    host's engines, and tasks sent to them while the link is down, are all
    answered once it is back."""
    topo = cluster
    h2 = topo[2]
    reg = registry(topo[0])
    node2 = next(n["id"] for n in reg["nodes"] if n["alive"] and n["host"] == h2.hostname)
    targets = [e["id"] for e in reg["engines"] if e["alive"] and e["node"] == node2]
    code = """
        ar = rc[targets].apply_async(lambda: (time.sleep(2.5), socket.gethostname())[1])
        open("/tmp/submitted", "w").close()
        while not os.path.exists("/tmp/down"):
            time.sleep(0.02)
        rs = [rc[targets].apply_async(lambda x: x + 1, i) for i in range(20)]
        out = {"first": ar.get(timeout=60), "rest": [r.get(timeout=60) for r in rs]}
    """
    topo[0].path("/tmp/down").unlink(missing_ok=True)
    th, result = client_submitted(topo[0], code, targets=targets)
    h2.link_down()
    try:
        topo[0].path("/tmp/down").touch()
        time.sleep(NODE_TIMEOUT_MS / 1000 / 2)
    finally:
        h2.link_up()
    th.join(120)
    assert result["first"] == [h2.hostname] * len(targets)
    assert result["rest"] == [[i + 1] * len(targets) for i in range(20)]


def test_losing_a_host_fails_its_tasks_and_it_can_join_again(cluster):
    topo = cluster
    h2 = topo[2]
    reg = registry(topo[0])
    node = next(n for n in reg["nodes"] if n["alive"] and n["host"] == h2.hostname)
    targets = [e["id"] for e in reg["engines"] if e["alive"] and e["node"] == node["id"]]
    others = [e["id"] for e in reg["engines"] if e["alive"] and e["node"] != node["id"]]
    code = """
        ar = rc[targets].apply_async(time.sleep, 60)
        time.sleep(0.5)
        open("/tmp/submitted", "w").close()
        t0 = time.monotonic()
        try:
            ar.get(timeout=60)
            err = None
        except (ipp.EngineError, ipp.CompositeError) as e:
            err = str(e)
        waited = time.monotonic() - t0
        rest = rc[others].apply_sync(lambda: 7)
        out = {"err": err, "waited": waited, "rest": rest}
    """
    th, result = client_submitted(topo[0], code, targets=targets, others=others)
    os.kill(node["pid"], signal.SIGKILL)
    th.join(120)
    assert result["err"] and f"lost with its node {node['id']} (host {h2.hostname}" in result["err"], result
    assert result["waited"] < 10  # a connection closed: one heartbeat, not the node timeout
    assert result["rest"] == [7] * len(others)
    # Nothing of that host's node is left: its engines went with their agent.
    deadline = time.monotonic() + 10
    while shoal_pids(topo)[2] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shoal_pids(topo)[2] == []
    # It joins again, with new engines, which work.
    join(h2)
    out = client(topo[1], """
        rc.wait_for_engines(6, timeout=30)
        out = sorted(set(rc[:].apply_sync(socket.gethostname)))
    """)
    assert out == sorted(h.hostname for h in topo)


def test_a_long_link_drop_fails_its_tasks_then_the_host_comes_back(cluster):
    """A link down for longer than the node timeout: the node is lost and
    its tasks fail, naming it; when the link is back its agent registers
    again and its engines, with their ids and namespaces, work again."""
    topo = cluster
    h1 = topo[1]
    reg = registry(topo[0])
    node = next(n for n in reg["nodes"] if n["alive"] and n["host"] == h1.hostname)
    targets = [e["id"] for e in reg["engines"] if e["alive"] and e["node"] == node["id"]]
    client(topo[0], "rc[targets].push({'kept': 41}, block=True)", targets=targets)
    code = """
        ar = rc[targets].apply_async(time.sleep, 30)
        time.sleep(0.3)
        open("/tmp/submitted", "w").close()
        try:
            ar.get(timeout=90)
            err = None
        except (ipp.EngineError, ipp.CompositeError) as e:
            err = str(e)
        out = {"err": err}
    """
    th, result = client_submitted(topo[0], code, targets=targets)
    h1.link_down()
    try:
        th.join(60)
    finally:
        h1.link_up()
    assert result["err"] and f"lost with its node {node['id']} (host {h1.hostname}" in result["err"], result
    out = client(topo[0], """
        deadline = time.monotonic() + 30
        while not set(targets) <= set(rc.ids) and time.monotonic() < deadline:
            time.sleep(0.2)
        out = rc[targets].apply_sync(lambda: (kept, socket.gethostname()))
    """, targets=targets)
    assert out == [[41, h1.hostname]] * len(targets)


# ---- what crosses the links: encrypted, members only, no replays ------------------

MARKER = "shoal-machines-marker-9c41"


def tcp_streams(pcap):
    """{(src, sport, dst, dport): bytes} of the TCP payloads in a pcap file
    (Ethernet, IPv4), each stream's segments in sequence order, a segment
    seen twice (a retransmission) taken once."""
    import struct
    magic = struct.unpack_from("<I", pcap)[0]
    order = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    pos, segs = 24, {}
    while pos + 16 <= len(pcap):
        _, _, incl, _ = struct.unpack_from(order + "IIII", pcap, pos)
        frame = pcap[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 15) * 4
        total = struct.unpack_from(">H", frame, 16)[0]
        src, dst = ".".join(map(str, frame[26:30])), ".".join(map(str, frame[30:34]))
        tcp = 14 + ihl
        sport, dport, seq = struct.unpack_from(">HHI", frame, tcp)
        payload = frame[tcp + (frame[tcp + 12] >> 4) * 4:14 + total]
        if payload:
            segs.setdefault((src, sport, dst, dport), {}).setdefault(seq, payload)
    return {k: b"".join(v[s] for s in sorted(v)) for k, v in segs.items()}


def test_what_crosses_the_links_is_encrypted(cluster):
    """The controller listens beyond loopback: Curve is on by default, and a
    capture on the bridge during a push of an array and code that carry a
    marker finds the bytes but not the marker."""
    topo = cluster
    info = json.loads(topo[0].path(PROFILE_FILE).read_text())
    assert info.get("curve"), "a cluster listening beyond loopback has Curve keys in its connection file"
    sent = topo[1].link_bytes()[1]
    with topo.capture() as cap:
        seen = client(topo[1], """
            a = np.frombuffer((marker * 40000).encode(), dtype=np.uint8)
            rc[:].push({"m": a}, block=True)
            rc[:].execute(f"seen = {marker!r} in bytes(m).decode()", block=True)
            out = rc[:].pull("seen", block=True)
        """, marker=MARKER)
    assert seen == [True] * 6  # every engine got the marker
    # It crossed host 1's link (the counters say so: a capture on a loaded
    # machine misses frames, and cuts 64 KiB GSO frames at its snap length).
    assert topo[1].link_bytes()[1] - sent > 40000 * len(MARKER)
    assert sum(map(len, tcp_streams(cap.data).values())) > 40000 * len(MARKER) / 4
    assert MARKER.encode() not in cap.data


def test_a_stranger_is_refused_across_the_link(cluster):
    """A client on another host with a connection file whose member keys
    are not the cluster's is refused at once, with a clear error."""
    topo = cluster
    info = json.loads(topo[0].path(PROFILE_FILE).read_text())
    out = client(topo[2], """
        from shoal import _core
        pub, sec = _core.curve_keypair()
        info = json.load(open(path))
        info["curve"] = dict(info["curve"], public_key=pub, secret_key=sec)
        json.dump(info, open("/tmp/stranger.json", "w"))
        os.chmod("/tmp/stranger.json", 0o600)
        t0 = time.monotonic()
        try:
            ipp.Client(url_file="/tmp/stranger.json", timeout=30)
            out = {"err": None}
        except ConnectionError as e:
            out = {"err": str(e), "took": time.monotonic() - t0}
    """, path=JOIN_FILE)
    assert out["err"] and "Curve key" in out["err"], out
    assert out["took"] < 5
    assert info["curve"]  # (the cluster's own keys were not touched)


def test_a_replayed_capture_runs_nothing_and_returns_nothing(cluster):
    """The bytes a client on host 1 sent the controller, captured on the
    bridge and sent again verbatim from host 2 on a new connection: the
    recorded code does not run again, and the replayer gets no result."""
    topo = cluster
    info = json.loads(topo[0].path(PROFILE_FILE).read_text())
    host, port = info["client"][len("tcp://"):].rsplit(":", 1)
    with topo.capture() as cap:
        client(topo[1], """
            rc[:].execute("replayed = globals().get('replayed', 0) + 1", block=True)
            out = rc[:].pull("replayed", block=True)
        """)
    streams = {k: v for k, v in tcp_streams(cap.data).items() if k[0] == topo[1].addr and k[2] == host
               and k[3] == int(port)}
    assert streams, "the client's connection to the controller was captured"
    before = client(topo[0], "out = rc[:].pull('replayed', block=True)")
    got = b""
    for data in streams.values():
        got += topo[2].run([sys.executable, "-c", textwrap.dedent("""
            import socket, sys, time
            data = sys.stdin.buffer.read()
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
            s.sendall(data)
            s.settimeout(2)
            got = b""
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, OSError):
                    break
                if not chunk:
                    break
                got += chunk
            sys.stdout.buffer.write(got)
        """), host, port], input=data, capture_output=True, timeout=30).stdout
    time.sleep(0.5)
    after = client(topo[0], "out = rc[:].pull('replayed', block=True)")
    assert after == before, "the recorded code ran again"
    assert b"SHWP" not in got and len(got) < 512 * len(streams), f"{len(got)} bytes came back"


def test_stop_from_a_joined_host_stops_every_host(topo, cluster):
    p = shoal(cluster[2], "stop")
    assert "stopped" in p.stdout
    deadline = time.monotonic() + 20
    while any(shoal_pids(topo).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shoal_pids(topo) == {0: [], 1: [], 2: []}
    assert not topo[0].path(PROFILE_FILE).exists()
