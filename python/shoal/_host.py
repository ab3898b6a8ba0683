"""Which machine, which process: what tells a process of this machine from
one of another, when a pid or a hostname cannot.

A connection file copied to another machine names the controller's pid
there; a hostname is shared by containers; the machine and boot ids are
shared by namespaces and containers on one kernel. The controller writes
its boot id and its start time into the connection file, which together
with its pid name one process of one boot; each agent has an id of its own
(agent_id), which it says on its socket and registers with the controller.
"""

import os


def alive(pid):
    """Whether process pid runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def boot_id():
    """This kernel's boot id, or None."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def started(pid):
    """When process pid started, in clock ticks after boot, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_namespace():
    """This process's pid namespace ("pid:[inode]"), or None."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def controller_here(info):
    """Whether the controller that a connection file names is a process of
    this machine: True (it runs here), False (it ran here and is gone:
    the file is stale), None (another machine's, a container's of its own
    pid namespace, or a file that does not say). The file's pid alone
    cannot tell: on another machine, a copy of the file names a pid of that
    one; the controller's boot id, pid namespace and start time can."""
    pid, boot, start = info.get("pid"), info.get("boot_id"), info.get("start_time")
    if not isinstance(pid, int) or pid <= 0 or not boot or not start or boot != boot_id() \
            or info.get("pid_ns", pid_namespace()) != pid_namespace():
        return None
    return started(pid) == start and alive(pid)
