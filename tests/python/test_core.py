"""shoal._core: arenas, zero-copy numpy views, and their lifetimes.

Every cross-process test starts a real second interpreter that attaches to
the arena from an inherited fd, as engines will.
"""

import errno
import gc
import io
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shoal

MiB = 1 << 20


@pytest.fixture
def arena():
    a = shoal.Arena(heap_size=256 * MiB, max_holders=16)
    yield a
    gc.collect()
    a.check()
    a.close()


def used_blocks(a):
    return a.stats()["used_blocks"]


def run_child(a, body, *args, check=True):
    """Runs `body` in a fresh interpreter that has attached the arena as `a`."""
    code = "import sys, numpy as np, shoal\na = shoal.Arena.attach(int(sys.argv[1]))\n" + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(a.fd), *map(str, args)],
        pass_fds=(a.fd,), capture_output=True, text=True, timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# ---- arrays in the arena --------------------------------------------------

def test_empty_array_lives_in_one_block_and_is_released_on_collection(arena):
    x = arena.empty((1000, 1000))
    assert x.flags.writeable and x.flags.c_contiguous
    assert isinstance(x.base, shoal.Block)
    x[:] = 1.5
    assert used_blocks(arena) == 1
    y = x[10:20]  # a view keeps the block alive
    del x
    gc.collect()
    assert used_blocks(arena) == 1
    assert y.sum() == 1.5 * 10 * 1000
    del y
    gc.collect()
    assert used_blocks(arena) == 0


def test_fortran_order_and_dtypes(arena):
    x = arena.empty((3, 4), dtype=np.int16, order="F")
    assert x.flags.f_contiguous and x.dtype == np.int16
    with pytest.raises(ValueError):
        arena.empty((2,), order="K")
    with pytest.raises(ValueError):
        arena.empty((-1, 2))


@pytest.mark.parametrize("dtype", ["?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8",
                                   "c8", "c16", ">i4", "M8[ns]", "m8[s]", "U7", "S5", "V16"])
def test_view_round_trips_every_common_dtype(arena, dtype):
    src = np.arange(60).reshape(3, 4, 5)
    x = arena.empty(src.shape, dtype=dtype)
    x[...] = src.astype(dtype) if np.dtype(dtype).kind != "V" else np.zeros(src.shape, dtype)
    h, d = arena.describe(x)
    v = arena.view(h, d)
    assert v.dtype == x.dtype and v.shape == x.shape
    np.testing.assert_array_equal(v, x)
    assert not v.flags.writeable


@pytest.mark.parametrize("make", [
    lambda x: x[::2, 1::3],          # strided
    lambda x: x.T,                   # transposed
    lambda x: x[::-1, ::-2],         # negative strides
    lambda x: x[3, 4, ...],          # 0-d view of one element
    lambda x: x[2:2],                # empty
    lambda x: np.asfortranarray(x),  # not in the arena: refused below
])
def test_view_round_trips_non_contiguous_layouts(arena, make):
    x = arena.empty((10, 12), dtype="f8")
    x[...] = np.arange(120).reshape(10, 12)
    s = make(x)
    if s is not x and isinstance(s, np.ndarray) and s.base is None:
        with pytest.raises(ValueError, match="does not live in this arena"):
            arena.describe(s)
        return
    h, d = arena.describe(s)
    v = arena.view(h, d)
    assert v.shape == s.shape and v.strides == s.strides
    np.testing.assert_array_equal(v, s)


def test_object_and_structured_arrays_are_refused(arena):
    with pytest.raises(TypeError, match="object arrays"):
        arena.empty((3,), dtype=object)
    with pytest.raises(TypeError, match="structured"):
        arena.empty((3,), dtype=[("a", "i4"), ("b", "f8")])


def test_arrays_outside_the_arena_are_refused(arena):
    with pytest.raises(ValueError, match="does not live in this arena"):
        arena.describe(np.zeros(10))
    other = shoal.Arena(heap_size=8 * MiB)
    y = other.empty(4)
    with pytest.raises(ValueError, match="does not live in this arena"):
        arena.describe(y)
    del y
    other.close()


# ---- read-only by default, writable by opt-in -------------------------------

def test_views_are_read_only_and_stay_read_only(arena):
    x = arena.empty(100)
    x[:] = 7
    v = arena.view(*arena.describe(x))
    with pytest.raises(ValueError, match="read-only"):
        v[0] = 1
    with pytest.raises(ValueError):
        v.setflags(write=True)
    with pytest.raises((BufferError, TypeError), match="read-write|read-only"):
        io.BytesIO(b"x").readinto(v.base)  # asks for a writable buffer
    m = memoryview(v.base)
    assert m.readonly
    with pytest.raises(TypeError):
        m[0] = 1
    assert x[0] == 7


def test_writable_view_is_an_explicit_opt_in_seen_across_processes(arena):
    x = arena.empty(1000, dtype="i8")
    x[:] = 0
    h, d = arena.describe(x)
    run_child(arena, """
        h = tuple(int(v) for v in sys.argv[2].split(','))
        d = bytes.fromhex(sys.argv[3])
        v = a.view(h, d, readonly=False)
        v[:] = np.arange(1000)
    """, ",".join(map(str, h)), d.hex())
    np.testing.assert_array_equal(x, np.arange(1000))


# ---- across processes ----------------------------------------------------------

def test_child_sees_identical_data_without_copying(arena):
    x = arena.empty((2048, 4096))  # 64 MiB
    x[...] = np.random.default_rng(1).random(x.shape)
    h, d = arena.describe(x)
    proc = run_child(arena, """
        def anon_kib():
            for line in open('/proc/self/status'):
                if line.startswith('RssAnon:'):
                    return int(line.split()[1])
        h = tuple(int(v) for v in sys.argv[2].split(','))
        d = bytes.fromhex(sys.argv[3])
        before = anon_kib()
        v = a.view(h, d)
        s = float(v.sum())
        print(repr(s), anon_kib() - before)
    """, ",".join(map(str, h)), d.hex())
    s, grew_kib = proc.stdout.split()
    assert float(s) == float(x.sum())
    assert int(grew_kib) < 8 * 1024, f"the child's private memory grew by {grew_kib} KiB for a 64 MiB view"


def test_references_are_held_across_processes(arena):
    x = arena.empty(10)
    x[:] = 3
    h, d = arena.describe(x)
    # The child takes a reference and keeps it while we drop ours.
    code = """
        h = tuple(int(v) for v in sys.argv[2].split(','))
        v = a.view(h, bytes.fromhex(sys.argv[3]))
        print('ready', flush=True)
        sys.stdin.readline()
        print(int(v.sum()), flush=True)
    """
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, numpy as np, shoal\na = shoal.Arena.attach(int(sys.argv[1]))\n"
         + textwrap.dedent(code), str(arena.fd), ",".join(map(str, h)), d.hex()],
        pass_fds=(arena.fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        del x
        gc.collect()
        assert used_blocks(arena) == 1, "the child's reference keeps the block"
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "30"
    finally:
        child.communicate(timeout=60)
    assert child.returncode == 0
    assert used_blocks(arena) == 0
    assert arena.stats()["holders"] == 1


def test_killed_child_is_reclaimed(arena):
    x = arena.empty(10)
    h, d = arena.describe(x)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, shoal
            a = shoal.Arena.attach(int(sys.argv[1]))
            h = tuple(int(v) for v in sys.argv[2].split(','))
            keep = [a.view(h, bytes.fromhex(sys.argv[3])) for _ in range(5)]
            keep += [a.empty(1000) for _ in range(3)]
            print('ready', flush=True)
            sys.stdin.readline()
        """), str(arena.fd), ",".join(map(str, h)), d.hex()],
        pass_fds=(arena.fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    assert used_blocks(arena) == 4
    with pytest.raises(OSError) as e:
        arena.reclaim(child.pid)
    assert e.value.errno == errno.EBUSY
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdin.close()
    child.stdout.close()
    assert arena.reclaim(child.pid) == 8
    assert used_blocks(arena) == 1  # ours
    del x
    gc.collect()
    assert used_blocks(arena) == 0


def test_forked_child_must_attach_again(arena):
    pid = os.fork()
    if pid == 0:
        try:
            arena.empty(4)
        except OSError as e:
            os._exit(0 if e.errno == errno.ECHILD else 2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---- bad input ---------------------------------------------------------------------

def test_bad_handles_raise_clear_errors(arena):
    x = arena.empty(100)
    (off, length, gen), d = arena.describe(x)
    cases = [
        ((off + 8, length, gen), errno.EINVAL),
        ((off, length, 0), errno.EINVAL),
        ((1 << 50, length, gen), errno.ERANGE),
        ((off, length, gen + 1), errno.ESTALE),
    ]
    for h, code in cases:
        with pytest.raises(OSError) as e:
            arena.view(h, d)
        assert e.value.errno == code, (h, e.value)
        assert "handle" in str(e.value)
    with pytest.raises(TypeError):
        arena.view((1, 2), d)
    del x
    gc.collect()
    with pytest.raises(OSError) as e:
        arena.view((off, length, gen), d)
    assert e.value.errno == errno.ESTALE, "a freed block's handle is stale"
    assert used_blocks(arena) == 0


def test_bad_descriptors_raise_clear_errors(arena):
    x = arena.empty((4, 4))
    h, d = arena.describe(x)
    with pytest.raises(OSError) as e:
        arena.view(h, d[:-1])
    assert e.value.errno == errno.EPROTO
    with pytest.raises(OSError) as e:
        arena.view(h, b"\x00" * len(d))
    assert e.value.errno == errno.EPROTO
    y = arena.empty(2)
    hy, _ = arena.describe(y)
    with pytest.raises(OSError) as e:
        arena.view(hy, d)  # 128 bytes of view over a 16-byte block
    assert e.value.errno == errno.ERANGE
    bad = bytearray(d)
    bad[8:24] = b"<f4".ljust(16, b"\0")  # itemsize in the descriptor still says 8
    with pytest.raises(ValueError, match="itemsize"):
        arena.view(h, bytes(bad))
    assert used_blocks(arena) == 2, "failed views took no reference"


def test_alloc_errors(arena):
    with pytest.raises(OSError) as e:
        arena.alloc(0)
    assert e.value.errno == errno.EINVAL
    first = arena.alloc(200 * MiB)
    with pytest.raises(OSError) as e:
        arena.alloc(200 * MiB)
    assert e.value.errno == errno.ENOMEM
    assert "allocation failed" in str(e.value)
    del first


def test_close_refuses_while_arrays_live_and_closed_arena_is_unusable():
    a = shoal.Arena(heap_size=8 * MiB)
    x = a.empty(10)
    with pytest.raises(BufferError, match="still use it"):
        a.close()
    del x
    a.close()
    a.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        a.empty(1)
    with pytest.raises(ValueError, match="closed"):
        a.fd


def test_attach_rejects_files_that_are_not_arenas(tmp_path):
    f = tmp_path / "junk"
    f.write_bytes(b"\0" * 65536)
    with open(f, "rb") as fh:
        with pytest.raises(OSError) as e:
            shoal.Arena.attach(fh.fileno())
    assert e.value.errno == errno.EPROTO
    with pytest.raises(OSError) as e:
        shoal.Arena.attach(-1)
    assert e.value.errno == errno.EBADF


def test_stats_and_context_manager():
    with shoal.Arena(heap_size=16 * MiB) as a:
        s = a.stats()
        assert s["heap_size"] == 16 * MiB and s["used_blocks"] == 0 and s["holders"] == 1
        b = a.alloc(1000)
        assert b.handle[1] == 1000 and not b.readonly
        assert a.stats()["used_bytes"] >= 1000
        del b
    with pytest.raises(ValueError):
        a.stats()


def test_prefault_thread_commits_ahead_and_populate_can_be_turned_off():
    import time
    with shoal.Arena(heap_size=64 * MiB, prefault=True) as a:
        deadline = time.monotonic() + 30
        while a.stats()["committed_bytes"] < 32 * MiB and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.stats()["committed_bytes"] >= 32 * MiB, "the prefault thread ran ahead of use"
    with shoal.Arena(heap_size=64 * MiB, populate=False) as a:
        x = a.empty(4 * MiB // 8)
        assert a.stats()["committed_bytes"] >= 4 * MiB  # committed in the books...
        x[:] = 1  # ...and faulted in by this write instead of by the allocator
        assert x.sum() == len(x)
        del x


def test_rings_in_an_arena_block_across_processes(arena):
    size = shoal.Ring.size(64)
    block = arena.alloc(2 * size)
    ping, pong = shoal.Ring(block, 64), shoal.Ring(block, 64, offset=size)
    code = """
        h = tuple(int(v) for v in sys.argv[2].split(','))
        b = a.acquire_bytes(h, 0, h[1], readonly=False)
        size = shoal.Ring.size(64)
        ping, pong = shoal.Ring(b), shoal.Ring(b, offset=size)
        while True:
            try:
                if not ping.wait(timeout=10):
                    sys.exit(3)
                got = ping.pop()
            except BrokenPipeError:  # closed and empty
                break
            while pong.push(got) == 0:
                pass
    """
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, numpy as np, shoal\na = shoal.Arena.attach(int(sys.argv[1]))\n"
         + textwrap.dedent(code), str(arena.fd), ",".join(map(str, block.handle))],
        pass_fds=(arena.fd,))
    for i in range(1000):
        slot = i.to_bytes(8, "little") * 8
        assert ping.push(slot) == 1
        assert pong.wait(timeout=10)
        assert pong.pop(1) == slot
    ping.close()
    assert child.wait(timeout=30) == 0
    assert len(ping) == 0
    with pytest.raises(ValueError, match="64 bytes"):
        ping.push(b"short")
    with pytest.raises(OSError):
        shoal.Ring(arena.alloc(1000))  # no ring there
    with pytest.raises(OSError):
        shoal.Ring(arena.alloc(100), 64)  # too small for 64 slots


def test_pop_into_keeps_the_slots_in_the_callers_list(arena):
    r = shoal.Ring(arena.alloc(shoal.Ring.size(64)), 64)
    inbox = []
    assert r.pop_into(inbox) == 0 and inbox == [], "nothing popped, nothing appended"
    slots = [bytes([i]) * 64 for i in range(5)]
    for slot in slots:
        assert r.push(slot) == 1
    assert r.pop_into(inbox, 3) == 3 and inbox == [b"".join(slots[:3])]
    assert r.pop_into(inbox) == 2 and inbox == [b"".join(slots[:3]), b"".join(slots[3:])]
    with pytest.raises(TypeError):
        r.pop_into((), 1)  # a list, to append to
    r.close()
    with pytest.raises(OSError):
        r.pop_into(inbox)  # closed and empty
    assert len(inbox) == 2


def test_doorbell_wait_sleeps_until_the_wanted_push(arena):
    """Doorbell.wait(want=k) (a client waiting for k engines) is woken by the
    k-th push into its rings, not by each one."""
    import threading
    import time
    from shoal._core import Doorbell
    size = shoal.Ring.size(64)
    block = arena.alloc(64 + 2 * size)
    bell = Doorbell(block, 0, clear=True)
    rings = [shoal.Ring(block, 64, offset=64), shoal.Ring(block, 64, offset=64 + size)]
    for r in rings:
        r.set_doorbell(block, 0)

    def push_later(*delays):
        def run():
            for i, d in enumerate(delays):
                time.sleep(d)
                assert rings[i].push(bytes([i]) * 64) == 1
        t = threading.Thread(target=run)
        t.start()
        return t

    t0 = time.monotonic()
    pusher = push_later(0.05, 0.15)
    assert bell.wait(rings, timeout=5, spin=0, want=2)
    took = time.monotonic() - t0
    pusher.join()
    assert took >= 0.19, "woken by the first push"
    assert [len(r) for r in rings] == [1, 1]
    for r in rings:
        r.pop()
    # Wanting one more than comes: asleep until the timeout, then it says
    # something is there.
    t0 = time.monotonic()
    pusher = push_later(0.02)
    assert bell.wait(rings, timeout=0.3, spin=0, want=2)
    assert time.monotonic() - t0 >= 0.29
    pusher.join()
    assert len(rings[0]) == 1
    with pytest.raises(ValueError, match="want"):
        bell.wait(rings, timeout=0, want=0)


def test_copy_splits_between_threads_and_checks_lengths():
    src = np.random.default_rng(1).integers(0, 255, (48 << 20) + 12345, dtype=np.uint8)
    for threads in (0, 1, 2, 3, 64):
        dst = bytearray(len(src) + 100)
        shoal._core.copy(dst, src, threads=threads)
        assert dst[:len(src)] == src.tobytes() and dst[len(src):] == bytes(100), threads
    with pytest.raises(ValueError, match="shorter"):
        shoal._core.copy(bytearray(10), b"x" * 11)
    with pytest.raises(TypeError):
        shoal._core.copy(b"read-only", b"x")
