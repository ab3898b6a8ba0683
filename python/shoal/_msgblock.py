"""What engines, agents and local clients put in the arena for each other:
ring slots, message blocks and lanes (docs/engine.md has the byte tables).
"""

import struct

from . import _core
from ._core import RING_BELL_OFFSET, Ring

# A ring slot: task_id, kind, flags, block offset, length, generation, sender.
SLOT = struct.Struct("<QIIQQQI20x")
assert SLOT.size == 64
KIND_TASK, KIND_SHUTDOWN, KIND_RESULT, KIND_RELEASE, KIND_OUTPUT, KIND_LANE, KIND_POOL = 1, 2, 3, 4, 5, 6, 7
# Slots in a lane's pool (a client's load-balanced tasks, which whichever
# engine is idle takes) hold KIND_TASK slots too; a pool keeps each slot's
# last 8 bytes for itself (docs/rings.md, "Pools").
POOL_SLOTS = 4096

# A message block: magic, frame count, payload-frame count, flags, then the lengths.
FRAMES_MAGIC = 0x464D4853  # "SHMF"
FRAMES_HDR = struct.Struct("<IIII")
ABORTED = 1  # flags: the sender aborted the task; an engine that has not started it answers TaskAborted


def pack_frames(arena, payload, buffers=()):
    """Writes frames into one new arena block (Arena.pack, in C); returns
    the Block (one reference)."""
    return arena.pack(list(payload) + list(buffers), len(payload))


# unpack_frames(buf) -> (payload frames, buffer frames): zero-copy
# memoryviews of a message block's frames (in C). The block is input:
# raises ValueError if it does not add up.
unpack_frames = _core.unpack_frames


# A lane's header: magic, version, engine id, slots per ring, the client's
# doorbell block, the engine's rings block, the engine's pid, why the agent
# closed it.
LANE_MAGIC = 0x454E414C  # "LANE"
LANE_HDR = struct.Struct("<IIiI3Q3QiI")
LANE_OPEN, LANE_ENGINE_DIED, LANE_ENGINE_STOPPED, LANE_CLIENT_GONE = 0, 1, 2, 3
LANE_HDR_SIZE = 128


class Lane:
    """A local client's direct path to one engine, as either side sees it.

    One arena block made by the agent: a header, then ``sq`` (client →
    engine: tasks, releases) and ``cq`` (engine → client: results, output).
    Both sides point ``sq`` at the engine's doorbell and ``cq`` at the
    client's, so each waits on one doorbell for all its rings. The lane holds
    a reference to every block it uses; drop it to let them go.
    """

    def __init__(self, arena, handle):
        handle = tuple(handle)
        self.handle = handle
        self.block = arena.acquire_bytes(handle, 0, handle[1], readonly=False)
        if handle[1] < LANE_HDR_SIZE:
            raise ValueError("not a lane")
        magic, version, self.engine_id, nslots, *rest = LANE_HDR.unpack_from(self.block)
        if magic != LANE_MAGIC or version != 1 or not 2 <= nslots <= 1 << 20 or nslots & (nslots - 1):
            raise ValueError("not a lane")
        size = Ring.size(nslots)
        if LANE_HDR_SIZE + 2 * size > handle[1]:
            raise ValueError("a lane's rings run past its block")
        self.engine_pid = rest[6]
        self.client_bell = arena.acquire_bytes(tuple(rest[0:3]), 0, rest[1], readonly=False)
        self.engine_bell = arena.acquire_bytes(tuple(rest[3:6]), 0, rest[4], readonly=False)
        self.sq = Ring(self.block, offset=LANE_HDR_SIZE)
        self.cq = Ring(self.block, offset=LANE_HDR_SIZE + size)
        self.sq.set_doorbell(self.engine_bell, RING_BELL_OFFSET)
        self.cq.set_doorbell(self.client_bell, 0)

    def closed_why(self):
        """Why the agent closed the lane (LANE_ENGINE_DIED, ...), LANE_OPEN if it has not."""
        return LANE_HDR.unpack_from(self.block)[-1]
