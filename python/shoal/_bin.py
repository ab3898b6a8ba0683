"""Finding shoal's C programs (shoal-controller, later shoal-agent and shoal-engine)."""

import os
import shutil
import sys
import sysconfig


def find(name):
    """The path of program `name`.

    Looks in $SHOAL_BIN_DIR (a list of directories, like PATH: the tests use
    it to run the sanitizer builds), then where this Python installs scripts
    (the virtual environment's bin/, where `pip install` puts them), then
    next to the interpreter, then on PATH.
    """
    dirs = [d for d in os.environ.get("SHOAL_BIN_DIR", "").split(os.pathsep) if d]
    dirs += [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for d in dirs:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    p = shutil.which(name)
    if p:
        return p
    raise FileNotFoundError(f"{name} is not installed: run scripts/setup.sh (or `pip install .`) "
                            f"in the environment of {sys.executable}")
