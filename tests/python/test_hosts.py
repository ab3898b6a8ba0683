"""The hosts module (tests/python/hosts.py): N hosts on this machine, each
with its own network, /tmp, /dev/shm, /run and hostname, on one bridge;
their links cut, shaped, counted and captured; and nothing left after."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

import hosts

PY = sys.executable

pytestmark = pytest.mark.timeout(60)

topo = hosts.fixture(3)

# A TCP sink: prints its port, takes one connection, then prints the bytes
# it got and the seconds from the first byte to the end.
SINK = r"""
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    t0 = t0 or time.monotonic()
    n += len(b)
print(n, time.monotonic() - (t0 or time.monotonic()), flush=True)
"""

# Sends argv[3] bytes, the marker argv[4] first, to argv[1]:argv[2], connecting
# within argv[5] seconds.
SEND = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[5]))
n = int(sys.argv[3])
head = sys.argv[4].encode() if len(sys.argv) > 4 else b""
s.sendall(head)
n -= len(head)
chunk = b"x" * (1 << 20)
while n > 0:
    s.sendall(chunk[:n])
    n -= min(n, len(chunk))
s.close()
"""


def sink(host, bind="0.0.0.0"):
    """A SINK in host; (process, port)."""
    p = host.popen([PY, "-c", SINK, bind], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def send(host, addr, port, nbytes, marker="", connect_timeout=10):
    return host.run([PY, "-c", SEND, addr, str(port), str(nbytes), marker, str(connect_timeout)],
                    capture_output=True, text=True, timeout=connect_timeout + 20)


def received(p):
    """(bytes, seconds) that a sink got."""
    n, dt = p.communicate(timeout=20)[0].split()
    return int(n), float(dt)


def ip(args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, env=hosts.tool_env()).stdout


def root_net():
    """The root network namespace's interfaces, addresses and routes."""
    out = {}
    for what in (["link"], ["addr"], ["route", "show", "table", "all"], ["-6", "route", "show", "table", "all"]):
        data = json.loads(ip(["-j", *what]))
        for d in data:  # counters and timers that move by themselves
            for k in ("stats64", "stats", "expires"):
                d.pop(k, None)
            for a in d.get("addr_info", []):
                a.pop("valid_life_time", None)
                a.pop("preferred_life_time", None)
        out[" ".join(what)] = data
    return out


def running(pid):
    """Whether pid is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def netns_list():
    return ip(["netns", "list"])


def test_available_says_why():
    ok, why = hosts.available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok or why


def test_each_host_has_its_own_hostname(topo):
    mine = socket.gethostname()
    names = [h.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip() for h in topo]
    assert names == [h.hostname for h in topo]
    assert len(set(names)) == len(names) and mine not in names
    assert socket.gethostname() == mine


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm", "/run/user"])
def test_files_are_private_to_a_host(topo, where):
    d = f"/run/user/{os.geteuid()}" if where == "/run/user" else where
    name = f"{d}/{uuid.uuid4().hex}"
    topo[0].run(["sh", "-c", f"echo hello > {name}"], check=True, timeout=10)
    assert topo[0].run(["cat", name], capture_output=True, text=True, timeout=10).stdout == "hello\n"
    assert topo[0].path(name).read_text() == "hello\n"
    for h in topo[1:]:
        assert h.run(["test", "-e", name], timeout=10).returncode == 1
    assert not os.path.exists(name)
    # The tmpfs mounts are the hosts' alone: none leaked into the machine's mount table.
    with open("/proc/self/mountinfo") as f:
        assert "shoal-tmp" not in f.read()


def test_a_unix_socket_is_private_to_a_host(topo):
    path = f"/tmp/{uuid.uuid4().hex}.sock"
    server = topo[0].popen([PY, "-c", f"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind({path!r})
s.listen()
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n"
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"
        topo[0].run([PY, "-c", connect], check=True, timeout=10)
        r = topo[1].run([PY, "-c", connect], capture_output=True, text=True, timeout=10)
        assert r.returncode != 0 and "FileNotFoundError" in r.stderr
        assert not os.path.exists(path)
    finally:
        server.kill()
        server.communicate()


def test_hosts_reach_each_other_over_tcp(topo):
    for h in topo[1:]:
        p, port = sink(h)
        r = send(topo[0], h.addr, port, 5, "hello")
        assert r.returncode == 0, r.stderr
        assert received(p)[0] == 5


def test_a_hosts_loopback_is_its_own(topo):
    # A service on the machine's 127.0.0.1 is not on a host's 127.0.0.1 ...
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = send(topo[0], "127.0.0.1", s.getsockname()[1], 1)
        assert r.returncode != 0 and "ConnectionRefusedError" in r.stderr
    # ... while the host's own is.
    p, port = sink(topo[0], bind="127.0.0.1")
    assert send(topo[0], "127.0.0.1", port, 3, "abc").returncode == 0
    assert received(p)[0] == 3


def test_link_down_cuts_a_host_off_and_link_up_joins_it_again(topo):
    h0, h1 = topo[0], topo[1]
    p, port = sink(h1)
    try:
        h1.link_down()
        r = send(h0, h1.addr, port, 1, "x", connect_timeout=1)
        # Dropped frames: the connect times out (or, once ARP gives up, finds no route).
        assert r.returncode != 0 and ("TimeoutError" in r.stderr or "No route to host" in r.stderr), r.stderr
    finally:
        h1.link_up()
    r = send(h0, h1.addr, port, 1, "x")
    assert r.returncode == 0, r.stderr
    assert received(p)[0] == 1


def transfer(a, b, nbytes):
    """Bits per second of nbytes from host a to host b, as b got them."""
    p, port = sink(b)
    r = send(a, b.addr, port, nbytes)
    assert r.returncode == 0, r.stderr
    n, dt = received(p)
    assert n == nbytes
    return n * 8 / dt


def test_shape_bounds_the_rate_both_ways(topo):
    h0, h1 = topo[0], topo[1]
    rate, size = 200e6, 30 << 20
    free = transfer(h0, h1, size)
    h0.shape("200mbit")
    try:
        out = transfer(h0, h1, size)  # through h0's eth0
        into = transfer(h1, h0, size)  # through h0's bridge port
    finally:
        h0.unshape()
    # tbf lets no more than rate * time + burst through: 30 MiB take at
    # least 1.2 s. Only bounds that must hold on a busy machine: under
    # twice the rate, and slower than the link without the shape.
    assert out < 2 * rate and into < 2 * rate, (out, into)
    assert free > out and free > into, (free, out, into)
    for ns, dev in ((h0.netns, h0.ifname), (topo.bridge_netns, h0.port)):
        shown = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True,
                               env=hosts.tool_env()).stdout
        assert "tbf" not in shown


def test_link_bytes_count_what_was_sent(topo):
    h0, h1 = topo[0], topo[1]
    size = 1 << 20
    rx0, tx0 = h0.link_bytes()
    rx1, tx1 = h1.link_bytes()
    transfer(h0, h1, size)
    assert h0.link_bytes()[1] - tx0 >= size
    assert h1.link_bytes()[0] - rx1 >= size
    assert h0.link_bytes()[0] > rx0  # the ACKs


@pytest.mark.parametrize("tool", ["tcpdump", "python"])
def test_capture_sees_a_marker(topo, tool):
    if tool == "tcpdump" and shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed (scripts/setup.sh installs it)")
    marker = f"shoal-marker-{uuid.uuid4().hex}"
    p, port = sink(topo[2])
    with topo.capture(tool=tool) as cap:
        assert send(topo[0], topo[2].addr, port, len(marker), marker).returncode == 0
        received(p)
    assert cap.data[:4] in (bytes.fromhex("a1b2c3d4"), bytes.fromhex("d4c3b2a1"))  # a pcap file
    assert marker.encode() in cap.data
    assert b"shoal-marker-never-sent" not in cap.data


def test_close_leaves_nothing(tmp_path):
    ok, why = hosts.available()
    if not ok:
        pytest.skip(why)
    before = root_net()
    with hosts.Topology(2) as t:
        names = t.netns_names()
        assert len(names) == 3 and all(n in netns_list() for n in names)
        assert root_net() == before
        holders = [h.holder_pid for h in t]
        # A process started through popen, and one it started that nobody tracks.
        p = t[0].popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        grandchild = int(p.stdout.readline())
        cap = t.capture(tool="python")
    assert t.closed
    assert cap.data is not None
    assert not any(n in netns_list() for n in names)
    for pid in holders + [p.pid, grandchild]:
        assert not running(pid), pid
    assert p.returncode is not None
    p.stdout.close()
    assert root_net() == before
    t.close()  # again: nothing to do
    with pytest.raises(hosts.HostsError):
        t[0].run(["true"])


def test_close_on_an_exception():
    ok, why = hosts.available()
    if not ok:
        pytest.skip(why)
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with hosts.Topology(1) as t:
                names = t.netns_names()
                raise exc("in the middle of a test")
        assert t.closed
        assert not any(n in netns_list() for n in names)


def test_cleanup_stale_removes_a_crashed_runs_names_only():
    ok, why = hosts.available()
    if not ok:
        pytest.skip(why)
    with hosts.Topology(1) as alive:  # a live run's names, which must stay
        # A run that dies without closing its topology (os._exit skips atexit).
        crashed = subprocess.run([PY, "-c", "import os, hosts; t = hosts.Topology(2); "
                                  "print(' '.join(t.netns_names()), flush=True); os._exit(0)"],
                                 cwd=os.path.dirname(hosts.__file__), capture_output=True, text=True, timeout=30)
        names = crashed.stdout.split()
        assert len(names) == 3, crashed.stderr
        assert set(names) <= set(netns_list().split())
        # Its holders saw their stdin close and ended.
        ids = {hosts._ns_id(f"{hosts.NETNS_DIR}/{n}") for n in names}
        deadline = time.monotonic() + 5
        while hosts._procs_in(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hosts._procs_in(ids) == []
        removed = hosts.cleanup_stale()
        assert set(names) <= set(removed)
        listed = netns_list()
        assert not any(n in listed for n in names)
        assert all(n in listed for n in alive.netns_names())
