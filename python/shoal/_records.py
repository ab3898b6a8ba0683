"""What the client keeps of each task it sent, kept small: a million tasks
must not cost the client gigabytes (docs/ipyparallel.md, "Memory").

Shared by the client, the views and the results, below all of them.
"""


class History(list):
    """Client.history and a view's history: msg_ids in the order they were
    sent, the last `limit` of them (Client.history_limit; None keeps every
    one, as ipyparallel does). Older ones leave in batches, once an eighth
    more than limit have gathered, so that an append stays O(1): between
    batches it holds up to limit + limit // 8."""

    __slots__ = ("limit",)

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def append(self, msg_id):
        list.append(self, msg_id)
        limit = self.limit
        if limit is not None and len(self) > limit + (limit >> 3):
            del self[:len(self) - limit]


def ending(ok, engines):
    """How a task ended, as Client._ended keeps it: for the usual task (one
    engine, an id >= 0) one int, 2 * engine + ok (a small int is shared,
    not allocated); else (ok, frozenset of engines)."""
    if len(engines) == 1:
        (e,) = engines
        if isinstance(e, int) and e >= 0:
            return 2 * e + bool(ok)
    return bool(ok), frozenset(engines)


def ending_of(v):
    """(ok, set of engines) of a Client._ended value (ending)."""
    if isinstance(v, int):
        return bool(v & 1), {v >> 1}
    return v[0], set(v[1])


# A reply's status, one shared string each (json.loads makes a new one per reply).
_STATUS = {"ok": "ok", "error": "error", "aborted": "aborted"}


class Reply:
    """What an engine's reply said about a task (AsyncResult._meta[engine]),
    read as the dict it came as (get, [], in): status, started, completed
    (the engine's clock), received (ours), and the rarer fields (ename,
    evalue, traceback, execution_count, execute_result, outputs) in a dict
    of their own only when there are any. The reply's JSON dict, kept
    whole, cost about 1 KiB a task (a fresh string for each key, every
    time); this, under 200 bytes."""

    __slots__ = ("status", "started", "completed", "received", "more")

    # What a reply holds that is kept elsewhere (stdout, stderr: the
    # AsyncResult's own; data: published data) or known (engine_id: its key).
    _ELSEWHERE = frozenset(("stdout", "stderr", "buffers", "data", "engine_id"))

    def __init__(self, meta, received):
        status = meta.get("status")
        self.status = _STATUS.get(status, status)
        self.started = meta.get("started")
        self.completed = meta.get("completed")
        self.received = received
        more = {k: v for k, v in meta.items() if k not in self._ELSEWHERE and k not in self.__slots__}
        self.more = more or None

    def get(self, key, default=None):
        if key in self.__slots__ and key != "more":
            value = getattr(self, key)
            return default if value is None else value
        return self.more.get(key, default) if self.more else default

    def __getitem__(self, key):
        value = self.get(key)
        if value is None and key not in self:
            raise KeyError(key)
        return value

    def __contains__(self, key):
        if key in self.__slots__ and key != "more":
            return getattr(self, key) is not None
        return bool(self.more) and key in self.more

    def __repr__(self):
        fields = {k: getattr(self, k) for k in self.__slots__[:-1]} | (self.more or {})
        return f"Reply({fields})"
