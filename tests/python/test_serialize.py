"""shoal.serialize: pickle protocol 5 with large buffers in the arena or in frames."""

import gc
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shoal
from shoal import serialize

MiB = 1 << 20


@pytest.fixture
def arena():
    a = shoal.Arena(heap_size=512 * MiB)
    yield a
    gc.collect()
    a.check()
    a.close()


def round_trip(obj, arena, **kw):
    s = serialize.dumps(obj, arena=arena)
    return s, serialize.loads(s.payload, s.buffers, s.frames, arena=arena, **kw)


@pytest.mark.parametrize("obj", [
    None, 0, -1, 2**100, 3.5, "text", b"bytes", [1, [2, (3, {"four": 4})]], {1, 2}, {"a": None},
    np.arange(10), np.float32(1.5),
])
def test_plain_objects_round_trip_in_band(arena, obj):
    s, back = round_trip(obj, arena)
    assert s.buffers == [] and s.keep == []
    if isinstance(obj, np.ndarray):
        np.testing.assert_array_equal(back, obj)
    else:
        assert back == obj and type(back) is type(obj)


@pytest.mark.parametrize("dtype", ["?", "i1", "u2", "i4", "u8", "f2", "f4", "f8", "c16", ">i8", "U3", "S4"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_large_arrays_go_to_the_arena_once_and_come_back_as_views(arena, dtype, order):
    a = np.asarray((np.arange(200_000) % 100).reshape(400, 500), order=order).astype(dtype)
    used = arena.stats()["used_blocks"]
    s, back = round_trip(a, arena)
    assert len(s.buffers) == 1 and s.buffers[0][0] == "arena"
    assert arena.stats()["used_blocks"] == used + 1, "one block, written once"
    np.testing.assert_array_equal(back, a)
    assert back.dtype == a.dtype and back.flags.f_contiguous == a.flags.f_contiguous
    assert not back.flags.writeable, "read-only by default"
    assert serialize._owner_block(back) is not None, "a view of the arena, not a copy"


def test_non_contiguous_object_and_small_arrays_stay_in_band(arena):
    big = np.arange(1_000_000.0)
    # numpy pickles datetimes in band whatever their size.
    dates = np.arange(100_000).astype("M8[us]")
    for obj in (big[::2], np.array([{"x": 1}, None], dtype=object), np.arange(100), np.float64(2.0), dates):
        s, back = round_trip(obj, arena)
        assert s.buffers == [], type(obj)
        if isinstance(obj, np.ndarray) and obj.dtype == object:
            assert back[0] == {"x": 1} and back[1] is None
        else:
            np.testing.assert_array_equal(back, obj)


def test_an_array_already_in_the_arena_is_not_copied(arena):
    x = arena.empty((1000, 1000))
    x[:] = 2.0
    used = arena.stats()["used_blocks"]
    s, back = round_trip(x[100:200], arena)  # a contiguous slice, inside the block
    assert arena.stats()["used_blocks"] == used, "no new block"
    (kind, handle, start, nbytes), = s.buffers
    assert handle == x.base.handle and start == 100 * 1000 * 8 and nbytes == 100 * 1000 * 8
    assert back.shape == (100, 1000) and (back == 2.0).all()
    x[150, 0] = 7.0
    assert back[50, 0] == 7.0, "the same memory"


def test_writable_views_are_an_opt_in(arena):
    x = np.zeros(100_000)
    s = serialize.dumps(x, arena=arena)
    a = serialize.loads(s.payload, s.buffers, arena=arena, readonly=False)
    b = serialize.loads(s.payload, s.buffers, arena=arena)
    a[0] = 5.0
    assert b[0] == 5.0 and not b.flags.writeable


def test_frames_without_an_arena(arena):
    x = np.random.default_rng(0).random(100_000)
    s = serialize.dumps({"x": x, "n": 3}, arena=None)
    assert s.buffers == [("frame", 0)] and len(s.frames) == 1 and s.keep == []
    wire = [bytes(f) for f in s.frames]  # what a socket would deliver
    back = serialize.loads(s.payload, s.buffers, wire)
    np.testing.assert_array_equal(back["x"], x)
    assert back["n"] == 3


def test_functions_and_lambdas_travel_by_value(arena):
    k = 10
    s = serialize.dumps([lambda v: v + k, np.add.reduce], arena=arena)
    f, g = serialize.loads(s.payload, s.buffers, arena=arena)
    assert f(1) == 11 and g([1, 2]) == 3


def test_references_are_released_when_everyone_is_done(arena):
    s = serialize.dumps(np.ones(1_000_000), arena=arena)
    views = [serialize.loads(s.payload, s.buffers, arena=arena) for _ in range(3)]
    assert arena.stats()["used_blocks"] == 1
    del s
    gc.collect()
    assert arena.stats()["used_blocks"] == 1, "the views keep it"
    del views
    gc.collect()
    assert arena.stats()["used_blocks"] == 0


def test_stale_and_bad_references_are_clear_errors(arena):
    s = serialize.dumps(np.ones(100_000), arena=arena)
    kind, handle, start, nbytes = s.buffers[0]
    with pytest.raises(OSError, match="outside its block"):
        serialize.loads(s.payload, [(kind, handle, start, nbytes + 8)], arena=arena)
    with pytest.raises(ValueError, match="no arena"):
        serialize.loads(s.payload, s.buffers)
    with pytest.raises(ValueError, match="unknown buffer kind"):
        serialize.loads(s.payload, [("disk", 0)], arena=arena)
    s.keep.clear()
    gc.collect()
    with pytest.raises(OSError) as e:
        serialize.loads(s.payload, s.buffers, arena=arena)
    assert "handle" in str(e.value)


def test_another_process_rebuilds_without_copying(arena):
    x = np.random.default_rng(1).random((4096, 2048))  # 64 MiB
    s = serialize.dumps({"x": x, "f": lambda a: float(a.sum())}, arena=arena)
    code = textwrap.dedent("""
        import pickle, sys
        import shoal
        from shoal import serialize
        def anon():
            for line in open('/proc/self/status'):
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024
        a = shoal.Arena.attach(int(sys.argv[1]))
        payload, buffers = pickle.loads(bytes.fromhex(sys.stdin.read()))
        before = anon()
        obj = serialize.loads(payload, buffers, arena=a)
        print(repr(obj["f"](obj["x"])), anon() - before, obj["x"].flags.writeable)
    """)
    msg = pickle.dumps((s.payload, s.buffers)).hex()
    p = subprocess.run([sys.executable, "-c", code, str(arena.fd)], input=msg, pass_fds=(arena.fd,),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    total, grew, writeable = p.stdout.split()
    assert float(total) == float(x.sum())
    assert int(grew) < 16 * MiB, f"the child's private memory grew by {grew} bytes for a 64 MiB array"
    assert writeable == "False"


def test_plain_values_skip_cloudpickle_and_read_back_the_same():
    import cloudpickle
    for v in (None, True, False, 0, -7, 2**100, 1.5, float("inf"), 2j, "", "é" * 100):
        s = serialize.dumps(v)
        assert s.payload == cloudpickle.dumps(v, protocol=5) and not s.buffers
        assert serialize.loads(s.payload) == v and type(serialize.loads(s.payload)) is type(v)

    class Count(int):  # not plain: by value, through cloudpickle
        pass
    back = serialize.loads(serialize.dumps(Count(3)).payload)
    assert back == 3 and type(back).__name__ == "Count"
