"""Publishing data from a running task, as ipyparallel's datapub: on an
engine, publish_data(dict) merges the dict into what the task has
published, and its client sees the whole of it in AsyncResult.data while
the task runs, and once it has finished."""

from . import _engine


def publish_data(data):
    """Publishes data (a dict of picklable values) from the task that runs
    on this engine. Raises RuntimeError anywhere but on an engine."""
    if _engine.current is None:
        raise RuntimeError("publish_data works on an engine, in a task (not in the client)")
    _engine.current.publish_data(data)
