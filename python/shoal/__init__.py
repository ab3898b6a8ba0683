"""shoal: an interactive parallel-computing cluster for Python.

shoal keeps IPython Parallel's API (``import shoal as ipp``) over a C core
built for fat nodes: engines on one node share large numpy arrays through a
shared-memory arena instead of each receiving a private copy.

What exists today is the arena itself (:class:`Arena`): a memfd that every
process on a node maps once, a multi-process allocator of 64-byte-aligned
blocks, and numpy arrays that view those blocks without copying. The cluster
(controller, node agent, engines, client) is built on it next.
"""

from ._core import ALIGN, CHUNK, Arena, Block, Ring, Socket, WireError, keygen

__all__ = ["Arena", "Block", "Ring", "Socket", "WireError", "keygen", "ALIGN", "CHUNK"]
__version__ = "0.1.0"
