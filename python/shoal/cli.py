"""The `shoal` command: start, stop and look at a cluster.

    shoal start -n 4 [--daemonize] [--profile NAME] [--ip ADDR] [--arena-size BYTES] [--prefault BYTES]
                [--retain BYTES] [--heartbeat-ms N] [--node-timeout-ms N] [--client-backlog BYTES]
                [--max-frame BYTES] [--max-payload BYTES]
    shoal agent [--join FILE] [-n N] [--daemonize] [--profile NAME] [--arena-size BYTES] [--prefault BYTES]
                [--retain BYTES] [--restart-engines]
    shoal stop [--profile NAME]
    shoal status [--profile NAME]
    shoal bench tradeoff [-n N] [--sizes 1K,1M,...] [--costs 0,1,4,16] [--reps R] [--png PATH | --no-png]
                         [--json PATH] [--profile NAME]
    shoal bench soak [-n N] [--tasks N] [--clients N] [--push-bytes BYTES] [--kill-every S] [--seconds S]
                     [--deadline S] [--json PATH] [--profile NAME]

`python -m shoal` is the same command.
"""

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from . import _bin, _core
from ._host import controller_here
from .client import Client, _alive, _connection_file, _profile_dir
from .local import who_listens


def _agent_said(log_path, offset, who="[shoal-agent "):
    """The lines the node agent (or, with who, another program) logged
    since offset in the cluster's log: why it stopped, when it did."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if who in line]


def _remove_stale_socket(path):
    """Removes the Unix socket at path if nobody listens on it any more (its
    agent was killed, and could not remove it); a socket that some process
    still listens on is left alone."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)
        except OSError:
            pass
    except OSError:
        pass  # gone already, or someone is there
    finally:
        s.close()


def start(args):
    pdir = _profile_dir(args.profile)
    conn = _connection_file(args.profile, None)
    if os.path.exists(conn):
        try:
            with open(conn) as f:
                info = json.load(f)
            pid = info["pid"]
            here = controller_here(info)
            if here is None and "boot_id" in info:
                print(f"shoal: profile '{args.profile}' has the connection file of a cluster of another machine "
                      f"({conn}, controller at {info.get('client')}): `shoal stop --profile {args.profile}` "
                      f"stops it, or use another profile", file=sys.stderr)
                return 1
            if here or (here is None and _alive(pid)):
                print(f"shoal: a cluster for profile '{args.profile}' is already running (controller pid {pid}); "
                      f"`shoal stop --profile {args.profile}` stops it", file=sys.stderr)
                return 1
        except (OSError, ValueError, KeyError, TypeError):
            pass
        os.unlink(conn)
    try:
        os.makedirs(pdir, mode=0o700, exist_ok=True)
    except OSError as e:
        print(f"shoal: cannot make the profile's directory {pdir}: {e.strerror} (is $SHOAL_DIR right?)",
              file=sys.stderr)
        return 1
    # Engines run the Python environment that started the cluster.
    env = dict(os.environ, SHOAL_PYTHON=sys.executable)
    detach = {"start_new_session": True} if args.daemonize else {}
    log = open(os.path.join(pdir, "cluster.log"), "ab")
    log_start = log.tell()
    out = log if args.daemonize else None
    policy = []
    for flag in ("heartbeat_ms", "node_timeout_ms", "client_backlog", "max_frame", "max_payload", "max_skew_ms"):
        if getattr(args, flag) is not None:
            policy += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.curve is not None:
        policy.append("--curve" if args.curve else "--no-curve")
    ctl = subprocess.Popen([_bin.find("shoal-controller"), "--profile", args.profile, "--ip", args.ip, *policy],
                           env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, **detach)
    deadline = time.monotonic() + 10
    while not os.path.exists(conn):
        if ctl.poll() is not None or time.monotonic() > deadline:
            if ctl.poll() is not None and args.daemonize:  # its words are in the log: show them
                for line in _agent_said(log.name, log_start, "shoal-controller")[-3:]:
                    print(line, file=sys.stderr)
            print(f"shoal: the controller did not start (see {log.name})", file=sys.stderr)
            return 1
        time.sleep(0.02)
    cmd = [_bin.find("shoal-agent"), "--profile", args.profile, "--engines", str(args.n)]
    if args.restart_engines:
        cmd.append("--restart-engines")
    if args.arena_size:
        cmd += ["--arena-size", str(args.arena_size)]
    if args.prefault is not None:
        cmd += ["--prefault", str(args.prefault)]
    if args.retain is not None:
        cmd += ["--retain", str(args.retain)]
    agent = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, **detach)
    rc = Client(profile=args.profile)
    try:
        deadline = time.monotonic() + args.timeout
        while len(rc.ids) < args.n:
            if agent.poll() is not None or time.monotonic() > deadline:
                if agent.poll() is not None and args.daemonize:  # its words are in the log: show them
                    for line in _agent_said(log.name, log_start)[-3:]:
                        print(line, file=sys.stderr)
                print(f"shoal: only {len(rc.ids)} of {args.n} engines started (see {log.name})", file=sys.stderr)
                rc.shutdown(hub=True)
                return 1
            time.sleep(0.05)
            rc.refresh()
        ids = rc.ids
    finally:
        rc.close()
    print(f"shoal: cluster '{args.profile}' running: engines {ids}", flush=True)
    if args.daemonize:
        return 0
    # Foreground: Ctrl-C (or SIGTERM) stops everything.
    stop_now = []
    signal.signal(signal.SIGTERM, lambda *a: stop_now.append(1))
    try:
        while ctl.poll() is None and not stop_now:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    print("shoal: stopping", flush=True)
    if ctl.poll() is None:
        ctl.send_signal(signal.SIGTERM)
    for p in (ctl, agent):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return 0


def _ending(proc, timeout=10):
    """Stops proc (SIGTERM, then SIGKILL) and reaps it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _install_connection(conn, profile):
    """A 0600 copy of the connection file conn at the profile's place, so that
    `shoal status` and `shoal stop` of this machine find the cluster that an
    agent joined with --join; unless the profile has a file already (one of
    its own, or the same copy), which is left as it is."""
    dest = _connection_file(profile, None)
    if os.path.abspath(conn) == os.path.abspath(dest) or os.path.exists(dest):
        return
    with open(conn, "rb") as f:
        data = f.read()
    tmp = f"{dest}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.rename(tmp, dest)


def agent(args):
    """Starts a node agent and its engines on this machine, joining the
    cluster of a connection file (--join: a copy of the file that `shoal
    start --ip ADDR` wrote where the controller runs; else the profile's
    own; the copy is also put at the profile's place, for `shoal status`
    and `shoal stop`, where the profile has none). In the foreground until
    the agent ends (Ctrl-C or SIGTERM stops it), exiting with its status;
    with --daemonize, returns once its engines are registered."""
    conn = args.join or _connection_file(args.profile, None)
    try:
        with open(conn) as f:
            info = json.load(f)
        endpoint = info["agent"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not a shoal connection file"
        print(f"shoal: cannot read the connection file {conn}: {why}"
              + ("" if args.join else f" (is a cluster running for profile '{args.profile}'? on another "
                                       f"machine, give --join a copy of its connection file)"), file=sys.stderr)
        return 1
    if endpoint.startswith("tcp://127.") and controller_here(info) is None:
        print(f"shoal: warning: the controller of {conn} listens on loopback ({endpoint}) and does not run on "
              f"this machine: start it with `shoal start --ip ADDR` (an address this machine reaches)",
              file=sys.stderr)
    pdir = _profile_dir(args.profile)
    os.makedirs(pdir, mode=0o700, exist_ok=True)
    _install_connection(conn, args.profile)
    env = dict(os.environ, SHOAL_PYTHON=sys.executable)
    cmd = [_bin.find("shoal-agent"), "--profile", args.profile, "--join", os.path.abspath(conn), "--engines",
           str(args.n)]
    if args.restart_engines:
        cmd.append("--restart-engines")
    for flag in ("arena_size", "prefault", "retain"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    stop_now = []  # SIGTERM, from now on, stops the agent too (below)
    signal.signal(signal.SIGTERM, lambda *a: stop_now.append(1))
    with open(os.path.join(pdir, "cluster.log"), "ab") as log:
        log_start = log.tell()
        detach = {"start_new_session": True, "stdout": log, "stderr": log} if args.daemonize else {}
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, **detach)
    joined = False
    try:
        with Client(url_file=conn, timeout=min(args.timeout, 30)) as rc:
            deadline = time.monotonic() + args.timeout
            node, ids = None, []
            while not stop_now:
                reg = rc._control(_core.MSG_REGISTER)
                # Our child: its pid, and the agent id that its socket says
                # (another machine's node may have the same pid and path).
                if node is None:
                    for n in reg["nodes"]:
                        if n["alive"] and n["pid"] == proc.pid and n.get("socket") and \
                                who_listens(n["socket"])[1] == n.get("agent_id"):
                            node = n
                ids = [e["id"] for e in reg["engines"] if node and e["node"] == node["id"] and e["alive"]]
                if node and len(ids) >= args.n:
                    joined = True
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    if args.daemonize:
                        for line in _agent_said(log.name, log_start)[-3:]:
                            print(line, file=sys.stderr)
                    print(f"shoal: the agent {'exited' if proc.poll() is not None else 'did not register'} with "
                          f"{len(ids)} of {args.n} engines (see {log.name if args.daemonize else 'above'})",
                          file=sys.stderr)
                    return 1
                time.sleep(0.05)
    except (OSError, RuntimeError) as e:
        print(f"shoal: cannot reach the controller of {conn}: {e}", file=sys.stderr)
        return 1
    finally:
        if not joined:
            _ending(proc)
    print(f"shoal: node {node['id']} ({node['host']}, agent pid {proc.pid}) joined the cluster of {conn}: "
          f"engines {ids}", flush=True)
    if args.daemonize:
        return 0
    try:
        while proc.poll() is None and not stop_now:
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_now.append(1)
    _ending(proc)
    return 0 if stop_now else proc.returncode


def _local_nodes(nodes):
    """The nodes whose agents run on this machine (lost ones too): each
    one's socket is here, and the agent that listens on it says the id the
    node registered with; an agent that is stopped or wedged says nothing,
    and is known by its pid (the listener's, as this machine sees it)."""
    mine = []
    for n in nodes:
        if n.get("socket") and os.path.exists(n["socket"]):
            pid, agent_id = who_listens(n["socket"])
            if agent_id is not None:
                if agent_id == n.get("agent_id"):
                    mine.append(n)
            elif pid == n["pid"]:
                mine.append(n)
    return mine


def _pidfds(pids):
    """Pidfds of those of pids that run (the processes themselves: a pid
    reused later is not signalled through them)."""
    fds = []
    for p in pids:
        try:
            fds.append(os.pidfd_open(p))
        except OSError:
            pass
    return fds


def _wait_pidfds(fds, timeout):
    """Waits until every process of fds has ended; whether they all did."""
    deadline = time.monotonic() + timeout
    left = list(fds)
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0:
            return False
        ready, _, _ = select.select(left, [], [], wait)
        left = [fd for fd in left if fd not in ready]
    return True


def stop(args):
    """Stops the cluster of the profile: the controller tells every agent,
    on every host, to stop its engines and itself. Here, it waits for the
    processes of this machine (the controller, if it runs here, and the
    agents and engines of this machine's nodes) and kills what is left of
    them; a pid of another machine is never signalled here."""
    conn = _connection_file(args.profile, None)
    try:
        with open(conn) as f:
            info = json.load(f)
        ctl_pid = info["pid"]
    except (OSError, ValueError, KeyError):
        print(f"shoal: no cluster is running for profile '{args.profile}'", file=sys.stderr)
        return 1
    here = controller_here(info)
    if here is None and "boot_id" not in info and (info.get("ip") or "").startswith("127."):
        here = _alive(ctl_pid)  # a file that does not say, of a controller on loopback
    if here is False:
        os.unlink(conn)
        print(f"shoal: the controller of profile '{args.profile}' (pid {ctl_pid}) is not running: removed its "
              f"stale connection file {conn}", file=sys.stderr)
        return 1
    fds = _pidfds([ctl_pid]) if here else []
    sockets = []  # the agents' sockets, to remove if an agent could not
    try:
        with Client(profile=args.profile, timeout=5) as rc:
            reg = rc._control(_core.MSG_REGISTER)
            mine = _local_nodes(reg["nodes"])
            ids = {n["id"] for n in mine}
            fds += _pidfds([n["pid"] for n in mine] +
                           [e["pid"] for e in reg["engines"] if e["alive"] and e["node"] in ids])
            # Any node's socket here that nobody listens on is a dead agent's
            # of this machine (_remove_stale_socket leaves a live one alone).
            sockets = [n["socket"] for n in reg["nodes"] if n.get("socket") and os.path.exists(n["socket"])]
            rc.shutdown(hub=True)
            for n in mine:  # a lost node's agent is not told by the controller
                if not n["alive"] and _alive(n["pid"]):
                    os.kill(n["pid"], signal.SIGTERM)
    except Exception as e:  # the controller may be wedged: fall back to a signal
        if not here:
            print(f"shoal: the controller did not answer ({e}), and it does not run on this machine",
                  file=sys.stderr)
            return 1
        print(f"shoal: the controller did not answer ({e}); sending SIGTERM", file=sys.stderr)
        if fds:
            signal.pidfd_send_signal(fds[0], signal.SIGTERM)
    try:
        if not _wait_pidfds(fds, 15):
            for fd in fds:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _wait_pidfds(fds, 5)
    finally:
        for fd in fds:
            os.close(fd)
    for path in sockets:  # a killed agent leaves its socket behind
        _remove_stale_socket(path)
    print(f"shoal: cluster '{args.profile}' stopped")
    return 0


def status(args):
    try:
        rc = Client(profile=args.profile, timeout=5)
    except (OSError, ValueError) as e:  # no cluster; a connection file that is not usable
        print(f"shoal: {e}", file=sys.stderr)
        return 1
    with rc:
        st = rc.cluster_status()
        print(f"cluster '{args.profile}': {sum(n['alive'] for n in st['nodes'])} node(s), "
              f"{sum(e['alive'] for e in st['engines'])} engine(s), {st['tasks_pending']} task(s) pending")
        for n in st["nodes"]:
            print(f"  node {n['id']}: {n['host']}, agent pid {n['pid']}, loop {n.get('loop', '?')}"
                  f"{'' if n['alive'] else ' (lost)'}")
        for e in st["engines"]:
            q = st["queue"][e["id"]] if e["id"] < len(st["queue"]) else 0
            print(f"  engine {e['id']}: node {e['node']}, pid {e['pid']}, "
                  f"{'running' if e['alive'] else 'dead'}, {q} queued")
        if rc.arena is not None:
            a = rc.arena.stats()
            print(f"  arena: {a['used_bytes'] / 2**20:.1f} MiB used in {a['used_blocks']} block(s) of "
                  f"{a['heap_size'] / 2**30:.1f} GiB, {a['committed_bytes'] / 2**20:.0f} MiB committed, "
                  f"{a['holders']} process(es) attached")
    return 0


def bench_tradeoff(args):
    """Serialization and transport against compute (shoal.tradeoff, docs/tradeoff.md)."""
    from . import tradeoff
    # SIGTERM ends the run as Ctrl-C does: through the clean-up that stops the cluster.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        tradeoff.run(args.sizes, args.costs, n_engines=args.n, profile=args.profile, reps=args.reps,
                     png=None if args.no_png else args.png, json_path=args.json)
    except tradeoff.ClusterError as e:
        print(f"shoal bench tradeoff: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # matplotlib missing, a path that computed a wrong result
        print(f"shoal bench tradeoff: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Done with signals: one more Ctrl-C or SIGTERM must not turn this
        # clean exit into a death by SIGINT (seen once, in the sanitizer pass
        # of the tests: exit status -2 after this message).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("shoal bench tradeoff: interrupted" + ("" if args.profile else "; its cluster was stopped"),
              file=sys.stderr)
        return 130
    return 0


def bench_soak(args):
    """Many tasks and pushes by several clients while engines are killed (shoal.soak)."""
    from . import soak
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: through the clean-up
    try:
        summary = soak.run(tasks=args.tasks, clients=args.clients, push_bytes=args.push_bytes,
                           kill_every=args.kill_every, seconds=args.seconds, n_engines=args.n,
                           profile=args.profile, deadline=args.deadline, json_path=args.json)
    except (soak.ClusterError, RuntimeError) as e:  # no cluster; a client that died
        print(f"shoal bench soak: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("shoal bench soak: interrupted" + ("" if args.profile else "; its cluster was stopped"),
              file=sys.stderr)
        return 130
    if not summary["ok"]:
        print(f"shoal bench soak: FAILED: {summary['lost']} task(s) lost, {summary['wrong']} wrong value(s), "
              f"{summary['unexpected_failures']} failure(s) other than {', '.join(soak.EXPECTED)} "
              f"(see the lines above)", file=sys.stderr)
        return 1
    return 0


def _arg_type(parse, what):
    """An argparse type from a parser that raises ValueError, whose message
    (after argparse's "argument --sizes:") says what is wanted."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = what
    return convert


def _bench_parser(sub):
    from . import soak, tradeoff
    b = sub.add_parser("bench", help="measurements that help decide how to use the cluster")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    t = bsub.add_parser("tradeoff", help="moving the data against computing on it: where parallel starts to pay",
                        description="For each array size and compute cost, times the kernel serially in this "
                                    "process, and scattered to the engines with the result gathered back: through "
                                    "shoal's arena, and through plain loopback sockets for comparison. Prints a "
                                    "table and draws a PNG (docs/tradeoff.md).")
    t.add_argument("-n", type=int, default=None,
                   help="engines (default: one per core, or all of --profile's); as many socket workers")
    t.add_argument("--sizes", type=_arg_type(tradeoff.parse_sizes, "--sizes"),
                   default=list(tradeoff.DEFAULT_SIZES),
                   help="array sizes in bytes, comma-separated, with K, M or G (powers of 1024) "
                        "(default: 1K,16K,256K,4M,64M,256M)")
    t.add_argument("--costs", type=_arg_type(tradeoff.parse_passes, "--costs"),
                   default=list(tradeoff.DEFAULT_PASSES),
                   help="compute costs, as passes of np.sin over the array, comma-separated; 0 (moving the data "
                        "only) is always measured; the ns per element are measured (default: 0,1,4,16)")
    t.add_argument("--reps", type=int, default=3, help="runs of each case; the table shows medians (at least 3)")
    t.add_argument("--png", default="tradeoff.png", help="where to draw the plot (default: tradeoff.png)")
    t.add_argument("--no-png", action="store_true", help="draw no plot (matplotlib not needed)")
    t.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    t.add_argument("--profile", default=None,
                   help="measure on the running cluster of this profile (default: start one for the run "
                        "and stop it at the end)")
    k = bsub.add_parser("soak", help="many tasks and pushes from several clients while engines are killed",
                        description="Starts a cluster with --restart-engines and several client processes (by "
                                    "lanes, through the controller, mixed) that submit --tasks tiny tasks in all "
                                    "and push --push-bytes of arrays, while an engine is killed every --kill-every "
                                    "seconds. Reports, per client and in all, the tasks answered, failed (by "
                                    "reason) and lost, and the memory of every process at the start and the end. "
                                    "Exits 1 if a task was lost, a value was wrong, or a task failed other than "
                                    "with EngineError.")
    k.add_argument("-n", type=int, default=None, help="engines (default: one per core, at least 2)")
    k.add_argument("--tasks", type=int, default=1_000_000, help="tasks in all (default 1000000)")
    k.add_argument("--clients", type=int, default=3,
                   help="client processes (default 3: lanes, controller, mixed, in turn)")
    k.add_argument("--push-bytes", type=_arg_type(soak.parse_bytes, "--push-bytes"), default=2 << 30,
                   help="bytes of arrays pushed in all, with K, M or G (default 2G)")
    k.add_argument("--kill-every", type=float, default=5.0,
                   help="seconds between two engines killed (SIGKILL; default 5; 0: none)")
    k.add_argument("--seconds", type=float, default=None, help="stop submitting after this many seconds")
    k.add_argument("--deadline", type=float, default=120.0,
                   help="seconds a task may take from its submission before it counts as lost (default 120)")
    k.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    k.add_argument("--profile", default=None,
                   help="soak the running cluster of this profile, killing its engines (default: start one "
                        "with --restart-engines and stop it at the end)")
    return b, t, k


def main(argv=None):
    p = argparse.ArgumentParser(prog="shoal", description="Start, stop and look at a shoal cluster.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a controller, a node agent and its engines")
    s.add_argument("-n", type=int, default=os.cpu_count(), help="engines (default: one per core)")
    s.add_argument("--daemonize", action="store_true", help="return once the engines are ready")
    s.add_argument("--ip", default="127.0.0.1", help="address the controller listens on (default 127.0.0.1)")
    s.add_argument("--arena-size", type=int, default=0, help="bytes of shared memory (default: half of RAM, or of the memory cgroup's "
                        "limit where that is lower)")
    s.add_argument("--prefault", type=int, default=None,
                   help="bytes of fresh shared memory kept faulted in ahead of use "
                        "(default: an eighth of the arena, at most 1 GiB; 0 for none)")
    s.add_argument("--retain", type=int, default=None,
                   help="bytes of freed arena memory kept for reuse before larger frees go back to the "
                        "system (default: half of the arena; 0 for none)")
    s.add_argument("--timeout", type=float, default=60, help="seconds to wait for the engines")
    s.add_argument("--restart-engines", action="store_true",
                   help="start a new engine (with a new id) in place of one that dies")
    # The controller's policies (docs/controller.md): passed on as they are.
    for flag, what in (("--heartbeat-ms", "milliseconds between the controller's heartbeats (default 1000)"),
                       ("--node-timeout-ms", "milliseconds a node may be silent before it is declared lost and "
                                             "its tasks fail (default 30000)"),
                       ("--client-backlog", "bytes of results the controller keeps for a client that does not "
                                            "read (default 1 GiB); past it they fail with an error that says why"),
                       ("--max-frame", "the largest frame a message to the controller may have, in bytes "
                                       "(default 1 GiB)"),
                       ("--max-payload", "the largest payload (the signed part) a message to the controller may "
                                         "have, in bytes (default 256 MiB)"),
                       ("--max-skew-ms", "how far from the controller's clock a message's stamp may be before it "
                                         "is refused as a replay (default 300000; 0: unchecked)")):
        s.add_argument(flag, type=int, default=None, help=what)
    enc = s.add_mutually_exclusive_group()
    enc.add_argument("--curve", dest="curve", action="store_true", default=None,
                     help="encrypt and authenticate the controller's TCP sockets with CurveZMQ (the default when "
                          "--ip is not loopback)")
    enc.add_argument("--no-curve", dest="curve", action="store_false",
                     help="plaintext even beyond loopback (warned of: only on a network you trust)")
    g = sub.add_parser("agent", help="start a node agent and its engines here, joining a cluster (on another "
                                     "machine: give --join a copy of its connection file)")
    g.add_argument("--join", default=None, metavar="FILE",
                   help="the cluster's connection file (default: the profile's own); `shoal start --ip ADDR` "
                        "makes a cluster that other machines can join")
    g.add_argument("-n", type=int, default=os.cpu_count(), help="engines (default: one per core)")
    g.add_argument("--daemonize", action="store_true", help="return once the engines are registered")
    g.add_argument("--arena-size", type=int, default=None, help="bytes of shared memory (default: as shoal start)")
    g.add_argument("--prefault", type=int, default=None, help="as shoal start")
    g.add_argument("--retain", type=int, default=None, help="as shoal start")
    g.add_argument("--restart-engines", action="store_true", help="as shoal start")
    g.add_argument("--timeout", type=float, default=60, help="seconds to wait for the engines")
    for name in ("stop", "status"):
        sub.add_parser(name, help=f"{name} the cluster")
    for sp in sub.choices.values():
        sp.add_argument("--profile", default="default")
    _, tradeoff_parser, soak_parser = _bench_parser(sub)
    args = p.parse_args(argv)
    if args.cmd in ("start", "agent") and args.n < 1:
        p.error("-n must be at least 1")
    if args.cmd == "bench" and args.bench_cmd == "soak":
        for name in ("n", "tasks", "clients"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                soak_parser.error(f"--{name} must be at least 1" if name != "n" else "-n must be at least 1")
        if args.kill_every < 0 or (args.seconds is not None and args.seconds <= 0) or args.deadline <= 0:
            soak_parser.error("--kill-every must be 0 or more, --seconds and --deadline more than 0")
        return bench_soak(args)
    if args.cmd == "bench":
        if args.n is not None and args.n < 1:
            tradeoff_parser.error("-n must be at least 1")
        if args.reps < 3:
            tradeoff_parser.error(f"--reps must be at least 3 (the table shows medians), not {args.reps}")
        return bench_tradeoff(args)
    return {"start": start, "agent": agent, "stop": stop, "status": status}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
