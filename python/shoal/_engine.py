"""The engine's Python side. shoal-engine (a C program embedding CPython)
calls main(), which joins the node agent and hands the Engine to the task
loop in C (engine/loop.c, the built-in module _shoal_engine).

Joining: the engine connects to its agent's Unix socket, gets the arena's
fd, introduces itself, and gets its two rings (tasks in, completions out)
and the eventfd that wakes the agent. The C loop then waits on the rings,
handles their slots and writes the replies; for each task it calls
Engine.task(), which runs the task in the engine's persistent namespace
(unpickling its arguments, pickling its value). What must be Python lives
here: the namespace, the streams, the display hooks (_display), IPython's
cell syntax. docs/engine.md describes the formats.
"""

import argparse
import ast
import base64
import builtins
import io
import json
import os
import signal
import socket
import sys
import time
import traceback

from . import _display, serialize
from ._core import Arena
from ._msgblock import ABORTED, unpack_frames
from .error import TaskAborted

try:
    import _shoal_engine  # the task loop: built into shoal-engine, and only there
except ImportError:
    _shoal_engine = None

# Output of a running task goes out at most this often (seconds), or sooner
# when this much has gathered (characters).
OUTPUT_INTERVAL = 0.05
OUTPUT_CHUNK = 8192

_json_load = json.JSONDecoder().raw_decode  # json.loads without its look at the input's type and encoding
_json_dump = json.JSONEncoder(default=str).encode
_PLAIN_META = '{"status": "ok", "engine_id": %d, "started": %r, "buffers": [], "stdout": "", "stderr": "", ' \
    '"completed": %r}'


def recv_line(sock, want_fds=0):
    """One JSON line from the agent, with up to want_fds fds."""
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, got, _, _ = socket.recv_fds(sock, 4096, max(want_fds - len(fds), 1))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        data += chunk
        fds += got
    return json.loads(data.decode()), fds


CELL = "<shoal-cell>"  # the file name of an execute task's code in its traceback


def run_cell(code, ns):
    """Runs code in ns; returns the value of its last expression (None if
    none), as IPython does. A cell that is not plain Python (IPython's
    `%magic`, `!cmd`, `x = !cmd`, `%%cell magic`, `x?`) is first translated
    by IPython, as a kernel does, if IPython is installed: plain Python is
    only parsed, and never makes the engine's IPython shell."""
    try:
        tree = ast.parse(code, CELL, "exec")
    except SyntaxError as e:
        error = e
    else:
        error = None
    if error is not None:  # out of the except: a cell's own error, not one raised while handling ours
        tree = _ipython_tree(code, ns, error)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, CELL, "exec"), ns)
    if last is not None:
        return eval(compile(last, CELL, "eval"), ns)
    return None


def _ipython_tree(code, ns, error):
    """The syntax tree of a cell that Python could not parse, after IPython's
    input transformation (`%time f()` becomes
    `get_ipython().run_line_magic('time', 'f()')`); raises error, the
    cell's SyntaxError, without IPython."""
    shell = _display.shell()
    if shell is None:
        raise error
    try:
        python = shell.transform_cell(code)
    except Exception:
        raise error from None  # IPython could not read it either: Python's word on it
    if python.rstrip() == code.rstrip():
        raise error  # not IPython either (IPython only ended it with a newline)
    ns.setdefault("get_ipython", shell.get_ipython)  # the translation calls it (gone after a user's del)
    return ast.parse(python, CELL, "exec")  # the lines are IPython's as the user's: an error points at them


class _Stream(io.TextIOBase):
    """stdout or stderr of a running task: kept whole for the reply, and sent
    on to the client in pieces while the task runs."""

    def __init__(self, engine, name):
        self.engine, self.name = engine, name
        self.reset()

    def reset(self):
        """Empty, for the next task (one pair of streams serves every task)."""
        self.whole, self.pending = [], []
        self.npending, self.last = 0, 0.0

    def writable(self):
        return True

    def write(self, text):
        self.whole.append(text)
        self.pending.append(text)
        self.npending += len(text)
        if self.npending >= OUTPUT_CHUNK or "\n" in text:
            self.flush()
        return len(text)

    def flush(self):
        # Whole lines go out as they are written or flushed, but at most every
        # OUTPUT_INTERVAL (unless a chunk's worth has gathered): a task that
        # flushes every line must not flood its client.
        now = time.monotonic()
        if self.pending and (now - self.last >= OUTPUT_INTERVAL or self.npending >= OUTPUT_CHUNK):
            self.engine.send_output(self.name, "".join(self.pending))
            self.pending, self.npending = [], 0
            self.last = now

    def getvalue(self):
        return "".join(self.whole)


class Engine:
    def __init__(self, path, index):
        self.index = index
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        greeting, fds = recv_line(self.sock, 1)
        if not fds:
            raise ConnectionError(f"the agent at {path} gave no arena")
        self.arena = Arena.attach(fds[0])
        os.close(fds[0])
        self.sock.sendall(json.dumps({"role": "engine", "index": index, "pid": os.getpid()}).encode() + b"\n")
        reply, fds = recv_line(self.sock, 1)
        if "error" in reply or not fds:
            raise ConnectionError(f"the agent refused engine {index}: {reply.get('error', 'no doorbell')}")
        self.id = reply["engine"]
        # What the loop (engine/loop.c) reads: the block of our two rings,
        # their size, the eventfd that wakes the agent, how long to spin.
        handle = tuple(reply["rings"])
        self.rings = self.arena.acquire_bytes(handle, 0, handle[1], readonly=False)
        self.nslots = reply["nslots"]
        self.doorbell = fds[0]
        self.spin = float(os.environ.get("SHOAL_ENGINE_SPIN", "5e-5"))
        self.out, self.err = _Stream(self, "stdout"), _Stream(self, "stderr")
        self.execution_count = 0  # execute tasks run, as IPython numbers cells
        self.running = False  # user code is running (a SIGINT interrupts it)
        # The engine's one namespace: __main__'s dict, which execute, push and
        # pull use, functions of the client's __main__ get as their globals,
        # and the IPython shell, once made, has as its user_ns (_display).
        main = sys.modules["__main__"]
        self.ns = main.__dict__
        self.ns.setdefault("__builtins__", builtins)

    def send_output(self, name, text):
        """Sends a piece of a running task's stdout or stderr to its client
        (best effort: the reply carries the whole text anyway)."""
        _shoal_engine.output(json.dumps({"name": name, "text": text}).encode())

    def publish_data(self, data):
        """datapub.publish_data: merges data (a dict) into the running
        task's published data, and sends what it is now to the client, as
        output is sent (best effort: the reply carries the last of it)."""
        if not isinstance(data, dict):
            raise TypeError(f"publish_data takes a dict, not {type(data).__name__}")
        self.data.update(data)
        pickled = base64.b64encode(serialize.dumps(self.data, reply=True).payload).decode()
        self.send_output("data", pickled)

    def task(self, task_id, handle, msg, payload, buffers, flags, in_arena, aborting):
        """Runs a task for the C loop, which has decoded its message block
        (handle): msg, its Block, and its payload and buffer frames
        (memoryviews of msg), and its flags; msg is None if the block
        could not be acquired, payload None if it is not a message block.
        Returns (meta, value payload, value frames, kept objects,
        stop_on_error), which the loop packs into the reply block. What the
        task raises is its result; an exception out of here stops the
        engine. in_arena: its client is on this node (large result buffers
        go into arena blocks, memmaps by reference); aborting: a cell before
        it failed (it answers TaskAborted)."""
        self.data = {}  # what the task published (datapub.publish_data)
        out, err = self.out, self.err
        out.reset()
        err.reset()
        meta = {"status": "ok", "engine_id": self.id, "started": time.time()}
        outputs = []
        _display.collect(outputs)  # what display() shows during the task
        value_payload, value_frames, keep = b"", [], None
        request, stop_on_error = {}, False
        try:
            if msg is None:
                msg = self.arena.acquire_bytes(handle, 0, handle[1])  # raises why it could not be
            if payload is None:
                payload, buffers = unpack_frames(msg)  # raises why it is not a message block
            if flags & ABORTED:
                raise TaskAborted(f"task {task_id} was aborted before it started")
            request = _json_load(bytes(payload[0]).decode())[0]
            if request.get("notes"):  # what the client was told to tell (a memmap sent by value, and why)
                meta["notes"] = list(request["notes"])
            if aborting:
                raise TaskAborted(f"task {task_id} was aborted: a cell before it failed (as a kernel stops on error)")
            kind = request.get("kind")
            if kind == "execute":
                # Counted as IPython counts cells: only code that is run.
                self.execution_count += 1
                meta["execution_count"] = self.execution_count
            # As contextlib's redirect_stdout and redirect_stderr, without their objects.
            saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = out, err
            self.running = True
            try:
                value = self.execute(request, payload, buffers)
            finally:
                self.running = False
                sys.stdout, sys.stderr = saved
            if kind == "execute":
                # A cell's value is shown, not returned, as by ipyparallel's
                # engines (an ExecuteReply on the client): its display data,
                # unless the cell is silent (execute's default; %px's are not).
                if value is not None and not request.get("silent", True):
                    meta["execute_result"] = _execute_result(value, self.execution_count)
                value = None
            # For a local client, large buffers of the result go into arena
            # blocks (or stay where they are, if they live there already),
            # which it views without a copy; for the agent, into the reply.
            # A memmap goes by reference to a client on this node (it maps the
            # file itself); through the agent the client may be on a machine
            # without the file, so its bytes go.
            if value is None:
                meta["buffers"] = []
            else:
                s = serialize.dumps(value, arena=self.arena if in_arena else None, reply=True,
                                    memmaps="reference" if in_arena else "value",
                                    memmaps_why="a result through the controller")
                value_payload, value_frames, keep = s.payload, s.frames, s.keep
                meta["buffers"] = s.buffers
                if s.notes:
                    meta.setdefault("notes", []).extend(s.notes)
        except BaseException as e:  # a task's failure, SystemExit included, is its result, not our end
            if type(e).__name__ == "UsageError" and type(e).__module__ == "IPython.core.error":
                tb = [f"UsageError: {e}\n"]  # a magic's misuse: its message is the story, as in IPython
            elif isinstance(e, SyntaxError) and e.filename == CELL:
                tb = traceback.format_exception_only(type(e), e)  # the cell's own: no frames to show
            else:
                tb = traceback.format_exception(type(e), e, e.__traceback__)
                # Drop the engine's own frames: the user's code starts at the cell or the function.
                tb = [line for line in tb if "shoal/_engine.py" not in line and "shoal/_display.py" not in line]
            meta.update(status="error", ename=type(e).__name__, evalue=str(e), traceback=tb)
            if getattr(e, "before_running", False) and getattr(e, "resendable", False):
                meta["resend_by_value"] = True
            # A cell that fails (not silent: %px's) aborts what is queued behind
            # it on this engine, as an IPython kernel's stop_on_error does.
            if not isinstance(e, TaskAborted) and request.get("kind") == "execute" and \
                    not request.get("silent", True):
                stop_on_error = True  # the loop answers the rest of the batch this task came in
        _display.collect(None)
        meta["stdout"], meta["stderr"] = out.getvalue(), err.getvalue()
        if outputs:
            meta["outputs"] = outputs
        if self.data:
            try:
                meta["data"] = base64.b64encode(serialize.dumps(self.data, reply=True).payload).decode()
            except Exception as e:
                print(f"shoal-engine {self.id}: the data task {task_id} published cannot be pickled: {e}",
                      file=sys.__stderr__)
        meta["completed"] = time.time()
        if len(meta) == 7 and meta["status"] == "ok" and not (meta["buffers"] or meta["stdout"] or meta["stderr"]):
            # A task that printed nothing and returned no buffers (the most
            # common): its metadata as json.dumps writes it, without its cost.
            text = _PLAIN_META % (self.id, meta["started"], meta["completed"])
        else:
            text = _json_dump(meta)
        return text.encode(), value_payload, value_frames, keep, stop_on_error

    def failed_reply(self, meta, error):
        """The metadata of a reply that says the task's reply (meta, JSON)
        could not be written (no arena memory for it, say)."""
        meta = json.loads(meta)
        return json.dumps({"status": "error", "engine_id": self.id, "ename": type(error).__name__,
                           "evalue": f"the reply could not be written: {error}", "traceback": [],
                           "stdout": "", "stderr": "", "started": meta.get("started"),
                           "completed": meta.get("completed")}).encode()

    def on_sigint(self, signum, frame):
        """SIGINT (Client.send_signal, %%px's Ctrl-C) interrupts the user
        code that runs, as KeyboardInterrupt: the task fails with it and the
        engine goes on. Between tasks it does nothing."""
        if self.running:
            raise KeyboardInterrupt

    def run_code(self, code, silent):
        """An execute task's cell. Once the engine has its IPython shell (a
        display(), a magic), the cell runs between the shell's execute
        events, as in a kernel: `%matplotlib inline` shows the cell's
        figures at its end (post_execute), and pre_run_cell and
        post_run_cell fire unless the cell is silent (%px's are not). Before
        that, a cell is only run_cell. The events cost ~3 us a silent cell
        (execute's default), ~10 us one that is not."""
        shell = _display.current()
        info = None
        if shell is not None:
            info = self._pre_execute(shell, code, silent)
        try:
            value = run_cell(code, self.ns)
        except BaseException as e:
            self._post_execute(info, code, silent, None, e)
            raise
        self._post_execute(info, code, silent, value, None)
        return value

    def _pre_execute(self, shell, code, silent):
        shell.execution_count = self.execution_count
        shell.events.trigger("pre_execute")
        if silent:
            return None
        info = _display.execution_info(code, silent)
        shell.events.trigger("pre_run_cell", info)
        return info

    def _post_execute(self, info, code, silent, value, error):
        """The shell's post-execute events (IPython prints a callback's
        error, it does not raise it); also after the cell that made the shell."""
        shell = _display.current()
        if shell is None:
            return
        shell.events.trigger("post_execute")
        if not silent:
            result = _display.execution_result(info or _display.execution_info(code, silent))
            result.execution_count, result.result, result.error_in_exec = self.execution_count, value, error
            shell.events.trigger("post_run_cell", result)

    def execute(self, request, payload, buffers):
        kind = request.get("kind")
        try:
            args = serialize.loads(payload[1], request.get("buffers", []), buffers, arena=self.arena) \
                if len(payload) > 1 and payload[1].nbytes else None
        except serialize.FileNotSame as e:
            # Before anything ran: the client may send the task again with the
            # memmap's bytes (its reply says so: meta "resend_by_value").
            e.before_running = True
            raise
        if kind == "execute":
            return self.run_code(request["code"], request.get("silent", True))
        if kind == "apply":
            f, fargs, fkwargs = args
            return f(*fargs, **fkwargs)  # a Reference among them was its value once unpickled here
        if kind == "push":
            for name, value in args.items():
                if name.isidentifier():
                    self.ns[name] = value
                else:  # an attribute or an item ("a.b", "a[0]"), as ipyparallel's push assigns it
                    self.ns["_shoal_push_value"] = value
                    try:
                        exec(f"{name} = _shoal_push_value", self.ns)
                    finally:
                        del self.ns["_shoal_push_value"]
            return None
        if kind == "shutdown":
            _shoal_engine.stop()  # once this reply is sent
            return None
        if kind == "clear":
            keep = {k: self.ns[k] for k in ("__name__", "__builtins__", "__doc__") if k in self.ns}
            self.ns.clear()
            serialize.forget_functions()  # functions sent before come anew, as from a new engine
            self.ns.update(keep)
            shell = _display.current()
            if shell is not None:  # as IPython's reset: its own names (get_ipython, In, Out) come back
                shell.user_ns_hidden.clear()
                shell.init_user_ns()
            return None
        if kind == "pull":
            names = request["names"]
            # A name, or any expression ("a.b", "a[0]"), as ipyparallel's pull evaluates it.
            values = [self.ns[n] if n in self.ns else _missing(n) if n.isidentifier() else eval(n, self.ns)
                      for n in names]
            return values[0] if request.get("single") else values
        raise ValueError(f"unknown task kind {kind!r}")


_formatter = None  # IPython's DisplayFormatter, made on first use


def _execute_result(value, count):
    """What a cell's value shows, as an IPython kernel's execute_result:
    {"data": {mime type: ...}, "metadata": {...}, "execution_count": n};
    its repr alone without IPython, or if formatting fails."""
    global _formatter
    try:
        if _formatter is None:
            from IPython.core.formatters import DisplayFormatter
            _formatter = DisplayFormatter()
        data, md = _formatter.format(value)
        data, md = _display._jsonable(data), _display._jsonable(md)
    except Exception:  # ImportError, or a _repr_*_ that raises
        data, md = {}, {}
    if "text/plain" not in data:
        try:
            data["text/plain"] = repr(value)
        except Exception as e:
            data["text/plain"] = f"<{type(value).__name__}: repr failed: {e}>"
    return {"data": data, "metadata": md, "execution_count": count}


def _missing(name):
    raise NameError(f"name {name!r} is not defined on this engine")


def main():
    p = argparse.ArgumentParser(prog="shoal-engine")
    p.add_argument("--agent-socket", required=True)
    p.add_argument("--index", type=int, required=True)
    args = p.parse_args(sys.argv[1:])
    # A SIGINT before the engine is up (a Ctrl-C under %%px that signals
    # every engine, say) must not kill it: ignored until the handler is set.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _display.install()
    try:
        engine = Engine(args.agent_socket, args.index)
    except (OSError, ValueError) as e:
        print(f"shoal-engine {args.index}: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGINT, engine.on_sigint)
    global current
    current = engine
    return _shoal_engine.serve(engine)


current = None  # this process's Engine, once it is up (datapub finds it here)
