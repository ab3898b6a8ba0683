"""N real "hosts" on this machine, for tests and benchmarks that need more
than one node: each host has its own network, its own /tmp, /dev/shm and
/run, its own hostname, and a link to the others that can be cut, shaped
and watched. Standard library only; needs root (see `available()`).

What a host is
--------------
- a named network namespace `shoal-<pid>-<serial>-h<i>` (`ip netns add`,
  so `ip -n NAME ...` works from outside) holding loopback (up) and one veth
  interface `eth0` with the address 10.<x>.0.<i+1>/24;
- a mount namespace, private in propagation, whose /tmp, /dev/shm and /run
  are fresh tmpfs mounts (with /run/user/<uid> made, mode 0700), so the
  files, Unix sockets and POSIX shm segments of one host are seen neither by
  the others nor by the real machine; the rest of the filesystem (/work with
  the .venv and the build trees, /usr, ...) is the machine's own;
- a UTS namespace whose hostname is the host's name, and an IPC namespace
  (System V shm and semaphores of its own);
- one long-lived "holder" process, started as
  `ip netns exec NAME unshare --mount --uts --ipc --propagation private -- sh -c HOLDER`,
  that made those mounts and that keeps the namespaces alive. It lives
  until its stdin closes: when the process that made the Topology dies,
  however it dies, its holders go with it.

Processes share the machine's PID namespace (pids are real pids) and its
cgroups. The host's /sys is a sysfs of its own network namespace (which
`ip netns exec` mounts), so /sys/class/net shows eth0 and lo only, and
there is no /sys/fs/cgroup in it.

All hosts' veth peers (`p<i>`) are ports of one Linux bridge `br0` in a
"bridge namespace" `shoal-<pid>-<serial>-br`. Nothing is added to the root
network namespace; each topology has a bridge of its own, so two topologies
(in one process or in two) never see each other, and the /24 they use only
has to avoid the machine's own routes.

Running a command in a host
---------------------------
`host.popen(args, **popen_kwargs)` and `host.run(args, **run_kwargs)` are
subprocess.Popen and subprocess.run through
`nsenter -t <holder pid> -m -u -i -n --wd=<cwd> -- args` (`host.command(args)`
gives that list, for callers who start the process themselves). nsenter
execs the command, so `Popen.pid` is the command's pid. The working
directory defaults to the caller's, or / where the host does not have it
(a path under the machine's /tmp, such as pytest's tmp_path: a host sees
its own /tmp instead; share files through a directory elsewhere). Entering
by the holder's pid is the dependable way: `ip netns exec` makes a fresh
mount namespace on every call, which would not have the host's tmpfs
mounts. From outside, `host.path("/tmp/x")` is the host's /tmp/x (through
/proc/<holder>/root). The environment is the caller's, or `env=`; the
module's own tools run with `tool_env()` (no LD_PRELOAD).

Cleanup
-------
`Topology.close()` (the context manager's exit; also run at interpreter
exit for a topology left open) is idempotent and defers Ctrl-C until it is
done. It stops the captures, then, for each host, sends SIGTERM (SIGKILL
after `grace` seconds) to every process it started with popen and to every
other process whose network or mount namespace is one this topology made
(found through /proc/*/ns by namespace inode: the children of those
processes too, and nothing else), ends the holders, and deletes exactly
the namespace names it made. `cleanup_stale()` (run by every new Topology)
removes the names that a crashed earlier run left: only names of this
module's scheme whose pid is that of a dead process.

The link
--------
`host.link_down()` takes the host's bridge port down: its eth0 loses its
carrier and every frame to or from it is dropped, so connections and
connects time out, as on a cut cable or a dead switch port; nothing fails
at once. `host.link_up()` joins it again. `host.link_bytes()` is
(rx_bytes, tx_bytes) of its eth0, read from the host's own sysfs. The links
are silent until used: no IPv6 link-local addresses, no multicast snooping
reports from the bridge.

`host.shape(rate)` puts a token bucket (tc tbf; netem is not in this
kernel) at the root of both ends of the host's link: egress of its eth0
(host to the others) and egress of the bridge port (the others to the
host), so the link is limited in both directions. The burst defaults to
rate/250 bytes (what the bucket refills in one tick of this kernel's
HZ=250: 500 KB at 1 Gbit/s, 5 MB at 10 Gbit/s), and at least 128 KiB so
that a whole 64 KiB GSO packet of the veth fits (a smaller bucket makes
tbf split every such packet); the queue holds `latency` (25 ms) worth of
traffic beyond the burst. `host.unshape()` removes both.

Capture
-------
`topo.capture()` records every frame that crosses the bridge (br0 in
promiscuous mode, which makes the bridge pass a copy of forwarded frames
to its own taps) until `stop()`, and returns the bytes of a pcap file (it
is also a context manager; `.data` holds them after): tcpdump if it is
installed, else a small AF_PACKET reader in Python. Enough to search for a
marker string sent in plaintext, or to open in Wireshark.

Using it
--------
    import hosts                       # tests/python is on sys.path
    ok, why = hosts.available()        # skip with `why` when not ok
    with hosts.Topology(3) as topo:
        h0, h1 = topo[0], topo[1]
        srv = h1.popen([sys.executable, "-m", "http.server", "8000"])
        h0.run([sys.executable, "-c", f"import urllib.request as u; u.urlopen('http://{h1.addr}:8000/')"],
               check=True, timeout=10)  # (once srv listens)
        h1.shape("1gbit"); h0.link_down(); h0.link_up()
        with topo.capture() as cap:
            ...
        assert b"marker" in cap.data

    topo = hosts.fixture(3)            # in a test module: a module-scoped
                                       # fixture that skips when unavailable

docs/hosts.md tells more: the topology, and how tests and benches use it.
"""

import atexit
import contextlib
import ipaddress
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

NETNS_DIR = "/run/netns"
BRIDGE = "br0"  # in the bridge namespace
IFNAME = "eth0"  # in each host namespace

# Every name this module gives a namespace. cleanup_stale() removes only
# names that match it and whose pid is dead.
_NAME = re.compile(r"^shoal-(\d+)-(?:\d+-(?:h\d+|br)|probe)$")

_serial = 0
_serial_lock = threading.Lock()
_live = set()  # the open topologies, closed at exit if still open

# The holder: the tmpfs mounts, the hostname, then "ready", then a wait for
# the end of stdin. /run/netns is unmounted first (lazily, in this private
# namespace only), so the copies of other namespaces' bind mounts that came
# with the copy of the mount table do not keep those namespaces alive after
# `ip netns del`.
_HOLDER = r"""
set -e
umount -l /run/netns 2>/dev/null || true
mount -t tmpfs -o mode=1777 shoal-tmp /tmp
mount -t tmpfs -o mode=1777 shoal-shm /dev/shm
mount -t tmpfs -o mode=0755 shoal-run /run
mkdir -p -m 0700 "/run/user/$2"
printf '%s\n' "$1" > /proc/sys/kernel/hostname
echo ready
read _ || true
"""

# The Python capture: pcap on stdout of every frame br0 passes up, with the
# bridge in promiscuous mode; "listening on" on stderr once it is bound.
_PY_CAPTURE = r"""
import signal, socket, struct, sys, time
dev, snap = sys.argv[1], int(sys.argv[2])
stop = []
signal.signal(signal.SIGINT, lambda *a: stop.append(1))
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((dev, 3))  # ETH_P_ALL; Python puts it in network order itself
mreq = struct.pack("iHH8s", socket.if_nametoindex(dev), 1, 0, b"")
s.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC
s.settimeout(0.05)
out = sys.stdout.buffer
out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snap, 1))
out.flush()
print("listening on", dev, file=sys.stderr, flush=True)
while not stop:
    try:
        frame = s.recv(1 << 18)
    except (socket.timeout, InterruptedError):
        continue
    t = time.time()
    kept = frame[:snap]
    out.write(struct.pack("<IIII", int(t), int(t % 1 * 1e6), len(kept), len(frame)) + kept)
    out.flush()
"""


class HostsError(RuntimeError):
    """Setting up or tearing down a topology failed; the message says which
    step, which namespace, and what the command said."""


# ---- helpers ------------------------------------------------------------------------------


def tool_env():
    """The environment for the machine's own tools (ip, tc, tcpdump, and the
    holders): os.environ less LD_PRELOAD. The sanitizer run of the tests
    preloads ASan into every process it starts, and `ip route` aborts under
    it (an overlapping strncpy of iproute2's own)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def _sh(args, *, input=None, timeout=10, what=None):
    """Runs a setup command; raises HostsError with its stderr if it fails."""
    try:
        r = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout, env=tool_env())
    except subprocess.TimeoutExpired:
        raise HostsError(f"{what or args[0]}: `{' '.join(args)}` did not finish in {timeout} s") from None
    if r.returncode != 0:
        raise HostsError(f"{what or args[0]}: `{' '.join(args)}` failed ({r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


def _ns_id(path):
    """'net:[inode]' of a namespace file, as /proc/PID/ns/net reads; None if gone."""
    try:
        return f"net:[{os.stat(path).st_ino}]"
    except FileNotFoundError:
        return None


def _procs_in(ns_ids):
    """Pids of the live processes (zombies have no namespaces) any of whose
    net or mnt namespace is in ns_ids, this process excepted."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        for kind in ("net", "mnt"):
            try:
                if os.readlink(f"/proc/{entry.name}/ns/{kind}") in ns_ids:
                    found.append(int(entry.name))
                    break
            except OSError:
                break  # gone, or a zombie
    return found


def _kill_all(ns_ids, popens=(), grace=1.0, spare=None):
    """SIGTERM to the popens and to every process in ns_ids but `spare`;
    SIGKILL to those still there after `grace` s; until none is left (they
    may fork meanwhile). Reaps the popens."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    for _ in range(2000):
        pids = {p.pid for p in popens if p.poll() is None}
        pids.update(pid for pid in _procs_in(ns_ids) if pid != spare)
        if not pids:
            break
        if time.monotonic() >= deadline:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.01)
    else:
        raise HostsError(f"processes in {sorted(ns_ids)} would not die: {sorted(pids)}")
    for p in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names():
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _netns_del(names):
    """Deletes the named network namespaces that exist; returns those that
    could not be deleted."""
    names = [n for n in names if os.path.exists(f"{NETNS_DIR}/{n}")]
    if names:
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names),
                       capture_output=True, text=True, timeout=30, env=tool_env())
    return [n for n in names if os.path.exists(f"{NETNS_DIR}/{n}")]


@contextlib.contextmanager
def _sigint_deferred():
    """Ctrl-C during the block is raised after it (main thread only: that is
    where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    if signal.getsignal(signal.SIGINT) is None:  # a handler not set from Python: leave it be
        yield
        return
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got and old is not signal.SIG_IGN:
            if callable(old):
                old(signal.SIGINT, None)
            else:
                raise KeyboardInterrupt


_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


def bits_per_second(rate):
    """A rate in bit/s from an int (bit/s) or a tc-style string: "200mbit",
    "2gbit", "10kbit", or bytes: "25mbps" (tc's bps is bytes per second)."""
    if isinstance(rate, (int, float)):
        bps = float(rate)
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(rate))
        unit = m and (m.group(2).lower() or "bit")
        if not m or unit not in _UNITS:
            raise ValueError(f"rate {rate!r}: give bit/s as a number, or a string like '200mbit' or '2gbit'")
        bps = float(m.group(1)) * _UNITS[unit]
    if bps < 8:
        raise ValueError(f"rate {rate!r} is below 8 bit/s")
    return int(bps)


def default_burst(rate_bps):
    """The tbf bucket for a rate: one HZ=250 tick's worth, at least 128 KiB."""
    return max(rate_bps // 8 // 250, 128 * 1024)


# ---- availability and leftovers ---------------------------------------------------------


_available = None


def available():
    """(True, "") if hosts can be made here, else (False, reason): root, the
    tools (ip, unshare, nsenter, mount), and a trial namespace with a holder."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe():
    if os.geteuid() != 0:
        return False, "hosts need root (network and mount namespaces)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux"),
                          ("mount", "mount"), ("sh", "dash")):
        if shutil.which(tool) is None:
            return False, f"hosts need `{tool}` on PATH (Debian's {package})"
    name = f"shoal-{os.getpid()}-probe"
    try:
        _sh(["ip", "netns", "add", name], what="making a trial network namespace")
        _sh(["ip", "netns", "exec", name, "unshare", "--mount", "--uts", "--ipc", "--propagation", "private",
             "--", "sh", "-c", "mount -t tmpfs shoal-probe /tmp && echo shoal-probe > /proc/sys/kernel/hostname"],
            what="a trial host")
    except HostsError as e:
        return False, str(e)
    finally:
        _netns_del([name])
    return True, ""


def cleanup_stale():
    """Removes what a crashed earlier run of this module left: network
    namespaces named by this module's scheme (shoal-<pid>-...) whose pid is
    not alive, after ending the processes still in them. Returns the names
    it deleted."""
    stale = []
    for n in _netns_names():
        m = _NAME.match(n)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            stale.append(n)
    if not stale:
        return []
    ids = {i for i in (_ns_id(f"{NETNS_DIR}/{n}") for n in stale) if i}
    _kill_all(ids, grace=0.5)
    left = _netns_del(stale)
    return [n for n in stale if n not in left]


# ---- hosts --------------------------------------------------------------------------------


class Host:
    """One host of a Topology; see the module's docstring for what it is.

    Attributes: index, name (of its network namespace, and its hostname),
    hostname, netns, addr ("10.x.0.<index+1>"), ifname ("eth0"), port (its
    bridge port's name in the bridge namespace), holder_pid, root (a Path to
    its filesystem as seen from outside)."""

    def __init__(self, topo, index, name, addr):
        self.topology = topo
        self.index = index
        self.name = self.netns = self.hostname = name
        self.addr = addr
        self.ifname = IFNAME
        self.port = f"p{index}"
        self.holder_pid = None
        self.root = None
        self._holder = None
        self._ns_ids = set()
        self._popens = []
        self._shaped = False

    def __repr__(self):
        return f"<Host {self.name} {self.addr} holder={self.holder_pid}>"

    # -- commands

    def command(self, args, *, cwd=None, shell=False):
        """The argument list that runs `args` in this host (nsenter into the
        holder's namespaces), with cwd as its working directory (default:
        the caller's, if the host has it, else /). A string is one program,
        or a shell command with shell=True."""
        if isinstance(args, (str, bytes, os.PathLike)):
            args = ["/bin/sh", "-c", args] if shell else [args]
        elif shell:
            args = ["/bin/sh", "-c", *args]
        if cwd is None:
            cwd = os.getcwd()
            if not self.path(cwd).is_dir():
                cwd = "/"  # under the machine's /tmp, say, which the host does not see
        wd = os.fspath(cwd)
        return ["nsenter", "-t", str(self.holder_pid), "-m", "-u", "-i", "-n", f"--wd={wd}", "--",
                *map(os.fspath, args)]

    def popen(self, args, *, cwd=None, shell=False, **kwargs):
        """subprocess.Popen of args inside this host; the topology ends it
        (and what it started in the host) when it closes."""
        self._check_open()
        if "executable" in kwargs:
            raise TypeError("Host.popen runs nsenter; give the program in args, not as executable")
        self._popens = [p for p in self._popens if p.poll() is None]
        p = subprocess.Popen(self.command(args, cwd=cwd, shell=shell), **kwargs)
        self._popens.append(p)
        return p

    def run(self, args, *, cwd=None, shell=False, **kwargs):
        """subprocess.run of args inside this host (check, timeout, input,
        capture_output, text, env, ... as there); a CompletedProcess."""
        self._check_open()
        if "executable" in kwargs:
            raise TypeError("Host.run runs nsenter; give the program in args, not as executable")
        return subprocess.run(self.command(args, cwd=cwd, shell=shell), **kwargs)

    def path(self, p):
        """The host's file p (an absolute path inside the host) as a path
        the caller can open: /proc/<holder>/root/<p>."""
        return self.root / os.fspath(p).lstrip("/")

    # -- the link

    def link_down(self):
        """Cuts the host off: its bridge port goes down. Its eth0 loses its
        carrier; frames from and to it are dropped (no error is reported to
        either side at once: connections time out)."""
        self._check_open()
        _sh(["ip", "-n", self.topology.bridge_netns, "link", "set", self.port, "down"], what=f"{self.name}: link down")

    def link_up(self):
        """Joins the host again (undoes link_down)."""
        self._check_open()
        _sh(["ip", "-n", self.topology.bridge_netns, "link", "set", self.port, "up"], what=f"{self.name}: link up")

    def shape(self, rate, *, burst=None, latency="25ms"):
        """Limits the host's link to `rate` (bit/s, or "200mbit", "2gbit") in
        each direction, with a tbf at the root of eth0 and of its bridge
        port; burst in bytes (default: default_burst(rate)). Replaces an
        earlier shape()."""
        self._check_open()
        bps = bits_per_second(rate)
        burst = int(burst) if burst is not None else default_burst(bps)
        for ns, dev in ((self.netns, self.ifname), (self.topology.bridge_netns, self.port)):
            _sh(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{bps}bit",
                 "burst", str(burst), "latency", str(latency)], what=f"{self.name}: shaping {dev} in {ns}")
        self._shaped = True

    def unshape(self):
        """Removes what shape() put on the link (nothing if it was not shaped)."""
        self._check_open()
        if not self._shaped:
            return
        for ns, dev in ((self.netns, self.ifname), (self.topology.bridge_netns, self.port)):
            _sh(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], what=f"{self.name}: unshaping {dev} in {ns}")
        self._shaped = False

    def link_bytes(self):
        """(rx_bytes, tx_bytes) of the host's eth0, from its own sysfs."""
        self._check_open()
        stats = self.path(f"/sys/class/net/{self.ifname}/statistics")
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    # -- life

    def _check_open(self):
        if self.topology.closed:
            raise HostsError(f"{self.name}: its topology is closed")

    def _start_holder(self):
        uid = os.geteuid()
        self._holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--ipc", "--propagation",
             "private", "--", "sh", "-c", _HOLDER, "holder", self.hostname, str(uid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())

    def _await_holder(self, deadline):
        """Waits for the holder's "ready"; then its pid is the host's."""
        p = self._holder
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            line = b""
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise HostsError(f"{self.name}: its holder did not get ready in time")
                chunk = os.read(p.stdout.fileno(), 64)
                if not chunk:
                    break
                line += chunk
        if line.strip() != b"ready":
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)
            err = p.stderr.read().decode(errors="replace").strip() if p.poll() is not None else ""
            raise HostsError(f"{self.name}: its holder failed ({line!r}): {err or 'no message'}")
        p.stdout.close()
        p.stderr.close()
        self.holder_pid = p.pid
        self.root = Path(f"/proc/{p.pid}/root")
        # ip netns exec and unshare (no --fork) exec in place, so the pid is the holder's.
        mnt = os.readlink(f"/proc/{p.pid}/ns/mnt")
        if mnt == os.readlink("/proc/self/ns/mnt"):
            raise HostsError(f"{self.name}: the holder (pid {p.pid}) is not in a mount namespace of its own")
        self._ns_ids = {mnt, _ns_id(f"{NETNS_DIR}/{self.netns}")}

    def _stop(self, grace):
        """Ends everything in the host, the holder last (by closing its stdin)."""
        ids = {i for i in self._ns_ids if i} or {i for i in [_ns_id(f"{NETNS_DIR}/{self.netns}")] if i}
        holder = self._holder
        _kill_all(ids, self._popens, grace, spare=holder.pid if holder else None)
        self._popens = []
        if holder is not None:
            with contextlib.suppress(OSError):
                holder.stdin.close()
            try:
                holder.wait(timeout=2)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait(timeout=5)
            for f in (holder.stdout, holder.stderr):
                f.close()
        # Anything that entered the host while the holder was ending.
        _kill_all(ids, grace=0)


# ---- the topology -------------------------------------------------------------------------


def _free_subnet():
    """10.x.0.0/24 for the first x from 77 that overlaps none of the
    machine's IPv4 routes and addresses."""
    taken = []
    for args in (["ip", "-j", "-4", "route", "show", "table", "all"], ["ip", "-j", "-4", "addr", "show"]):
        try:
            data = json.loads(_sh(args) or "[]")
        except (HostsError, ValueError):
            continue
        for r in data:
            dsts = [r.get("dst")] if "dst" in r else [f"{a['local']}/{a['prefixlen']}" for a in r.get("addr_info", [])]
            for d in dsts:
                if d and d != "default":
                    with contextlib.suppress(ValueError):
                        taken.append(ipaddress.ip_network(d, strict=False))
    for x in list(range(77, 255)) + list(range(1, 77)):
        net = ipaddress.ip_network(f"10.{x}.0.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise HostsError("every 10.x.0.0/24 overlaps a route of this machine: give Topology a subnet")


class Topology:
    """n hosts on one bridge (see the module's docstring). A context manager;
    close() ends it. subnet: an IPv4 /24 or larger as a string (default: a
    free 10.x.0.0/24); host i is its address i+1."""

    def __init__(self, n, *, subnet=None, start_timeout=10.0, grace=1.0):
        global _serial
        if not 1 <= n <= 250:
            raise ValueError(f"a topology has 1 to 250 hosts, not {n}")
        self.closed = False
        self._pid = os.getpid()
        self.grace = grace
        self.hosts = []
        self._made = []  # the netns names this topology made, in order
        self._captures = []
        with _serial_lock:
            _serial += 1
            serial = _serial
        self.prefix = f"shoal-{os.getpid()}-{serial}-"
        self.bridge_netns = self.prefix + "br"
        self.bridge = BRIDGE
        self.subnet = ipaddress.ip_network(subnet) if subnet else _free_subnet()
        if self.subnet.num_addresses < n + 2:
            raise ValueError(f"subnet {self.subnet} is too small for {n} hosts")
        _live.add(self)
        try:
            cleanup_stale()
            self._setup(n, start_timeout)
        except BaseException:
            self.close()
            raise

    def _setup(self, n, start_timeout):
        plen = self.subnet.prefixlen
        for i in range(n):
            self.hosts.append(Host(self, i, f"{self.prefix}h{i}", str(self.subnet.network_address + i + 1)))
        names = [self.bridge_netns] + [h.netns for h in self.hosts]
        for name in names:
            if os.path.exists(f"{NETNS_DIR}/{name}"):
                raise HostsError(f"network namespace {name} exists already (another topology of this pid?)")
        # Recorded before it is made, so that close() deletes even a half-made one.
        self._made.extend(names)
        _sh(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names), what="making namespaces")
        # No IPv6 link-local addresses (no router solicitations or MLD
        # reports) and no multicast snooping on the bridge (no IGMP and MLD
        # reports of its own): the links are silent until used, which keeps
        # their counters and the captures to what the tests send.
        br = [f"link add {BRIDGE} type bridge mcast_snooping 0", f"link set {BRIDGE} addrgenmode none",
              f"link set {BRIDGE} up"]
        for h in self.hosts:
            br += [f"link add {h.port} type veth peer name {IFNAME} netns {h.netns}",
                   f"link set {h.port} addrgenmode none", f"link set {h.port} master {BRIDGE}",
                   f"link set {h.port} up"]
        _sh(["ip", "-n", self.bridge_netns, "-batch", "-"], input="\n".join(br) + "\n", what="wiring the bridge")
        for h in self.hosts:
            cmds = ["link set lo up", f"link set {IFNAME} addrgenmode none",
                    f"addr add {h.addr}/{plen} dev {IFNAME}", f"link set {IFNAME} up"]
            _sh(["ip", "-n", h.netns, "-batch", "-"], input="\n".join(cmds) + "\n", what=f"{h.name}: its link")
        for h in self.hosts:
            h._start_holder()
        deadline = time.monotonic() + start_timeout
        for h in self.hosts:
            h._await_holder(deadline)

    # -- access

    def __getitem__(self, i):
        return self.hosts[i]

    def __len__(self):
        return len(self.hosts)

    def __iter__(self):
        return iter(self.hosts)

    def __repr__(self):
        return f"<Topology {self.prefix}* {len(self.hosts)} hosts on {self.subnet}{' closed' if self.closed else ''}>"

    def netns_names(self):
        """The network namespace names this topology made (bridge first)."""
        return list(self._made)

    def capture(self, *, tool=None, snaplen=65535):
        """Starts recording every frame that crosses the bridge; a Capture,
        whose stop() returns the pcap bytes. tool: "tcpdump" or "python"
        (default: tcpdump if installed)."""
        if self.closed:
            raise HostsError(f"{self.prefix}*: the topology is closed")
        return Capture(self, tool=tool, snaplen=snaplen)

    # -- life

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Ends every process in the topology's namespaces and deletes the
        namespaces it made. Idempotent; Ctrl-C waits until it is done."""
        if self.closed or os.getpid() != self._pid:
            return  # a forked child does not tear down its parent's topology
        with _sigint_deferred():
            self.closed = True
            problems = []
            for c in self._captures:
                try:
                    c.stop()
                except Exception as e:  # noqa: BLE001 - go on cleaning up
                    problems.append(f"capture: {e}")
            for h in self.hosts:
                try:
                    h._stop(self.grace)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{h.name}: {e}")
            try:
                bridge_id = _ns_id(f"{NETNS_DIR}/{self.bridge_netns}")
                if bridge_id:
                    _kill_all({bridge_id}, grace=self.grace)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{self.bridge_netns}: {e}")
            left = _netns_del(self._made)
            if left:
                problems.append(f"network namespaces not deleted: {left} (delete them with `ip netns del NAME`)")
            _live.discard(self)
            if problems:
                raise HostsError("closing the topology: " + "; ".join(problems))


class Capture:
    """A recording of the frames crossing a topology's bridge; made by
    Topology.capture(). stop() (or the end of a with block) returns the
    bytes of a pcap file, kept in .data."""

    def __init__(self, topo, *, tool=None, snaplen=65535):
        tool = tool or ("tcpdump" if shutil.which("tcpdump") else "python")
        enter = ["nsenter", f"--net={NETNS_DIR}/{topo.bridge_netns}", "--"]
        if tool == "tcpdump":
            # -U with --immediate-mode: each frame is written when it comes.
            cmd = ["tcpdump", "-i", BRIDGE, "-n", "-U", "--immediate-mode", "-s", str(snaplen), "-w", "-"]
        elif tool == "python":
            cmd = [sys.executable, "-c", _PY_CAPTURE, BRIDGE, str(snaplen)]
        else:
            raise ValueError(f"capture tool {tool!r}: 'tcpdump' or 'python'")
        self.tool = tool
        self.where = topo.bridge_netns
        self.data = None
        self._file = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(enter + cmd, stdout=self._file, stderr=subprocess.PIPE, env=tool_env())
        topo._captures.append(self)  # stopped by close(), even if it never gets ready
        # Ready when it says it listens (both print "listening on" to stderr).
        self._err = b""
        deadline = time.monotonic() + 10
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stderr, selectors.EVENT_READ)
            while b"listening on" not in self._err:
                left = deadline - time.monotonic()
                chunk = os.read(self._proc.stderr.fileno(), 4096) if left > 0 and sel.select(left) else None
                if not chunk:
                    self._end(0)
                    raise HostsError(f"capture with {tool} in {self.where} " +
                                     ("failed" if chunk == b"" else "was not listening after 10 s") +
                                     f": {self._err.decode(errors='replace').strip()}")
                self._err += chunk

    def stop(self, settle=0.2):
        """Stops recording (after `settle` s, for frames still on their way
        to the recorder) and returns the pcap bytes. Idempotent. Raises
        HostsError if the recorder had stopped by itself."""
        if self.data is not None:
            return self.data
        failed = self._proc.poll()
        self._end(settle)
        if failed:
            raise HostsError(f"capture with {self.tool} in {self.where} had stopped ({failed}): "
                             f"{self._err.decode(errors='replace').strip()}")
        return self.data

    def _end(self, settle):
        if self._proc.poll() is None:
            time.sleep(settle)
            self._proc.send_signal(signal.SIGINT)  # both recorders flush and exit 0 on it
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._err += self._proc.stderr.read()
        self._proc.stderr.close()
        self._file.seek(0)
        self.data = self._file.read()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def fixture(n, *, scope="module", **kwargs):
    """A pytest fixture that yields a Topology(n, **kwargs) and closes it,
    or skips the test with available()'s reason. In a test module:
    `topo = hosts.fixture(3)`."""
    import pytest

    @pytest.fixture(scope=scope)
    def topology():
        ok, why = available()
        if not ok:
            pytest.skip(why)
        with Topology(n, **kwargs) as t:
            yield t

    return topology


@atexit.register
def _close_all():
    for t in list(_live):
        with contextlib.suppress(Exception):
            t.close()
