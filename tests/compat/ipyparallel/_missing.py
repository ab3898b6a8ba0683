"""The adapter's two helpers.

alias(ns, source, *names): binds each name that shoal's module `source` has
into the adapter module's namespace `ns`; a name it lacks stays unbound.

placeholder(qualname, why): for the few names that a test module imports
at its top (so that without them the whole module could not be collected).
It stands for nothing: calling it, or making an instance of it, raises
NotImplementedError naming what shoal lacks, and no object of shoal's is
ever an instance of it. They are:

    ipyparallel.AsyncHubResult             test_client.py, test_view.py
    ipyparallel.serialize.can, .uncan      test_dependency.py
"""


def alias(ns, source, *names):
    for name in names:
        if hasattr(source, name):
            ns[name] = getattr(source, name)


def placeholder(qualname, why):
    module, _, name = qualname.rpartition(".")
    message = f"shoal has no {qualname} ({why}); the compat adapter names it only so that the test module imports"

    def refuse(*args, **kwargs):
        raise NotImplementedError(message)

    if name[:1].isupper():
        thing = type(name, (), {"__init__": refuse, "__doc__": message})
    else:
        thing = refuse
        thing.__name__ = thing.__qualname__ = name
        thing.__doc__ = message
    thing.__module__ = module
    return thing
