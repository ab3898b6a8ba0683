"""The user's ipyparallel walk-through (../shared/seed), cell by cell, on shoal.

The cells are the walk-through's own, with two changes only: `import shoal as
ipp` in place of `import ipyparallel as ipp`, and `shoal start` in place of
`ipcluster start`. This script runs them in an IPython shell, printing each
cell and what it shows, as the notebook does:

    python examples/walkthrough.py            # starts a 4-engine cluster (profile default)
    python examples/walkthrough.py --write-notebook examples/walkthrough.ipynb

The cluster it starts keeps running afterwards, as in the walk-through;
`shoal stop` stops it. walkthrough.ipynb holds the same cells as a notebook.
"""

import json
import sys

CELLS = [
    """\
# You can also use the IPython magic shell command. but errors are harder to see and stopping the cluster can be janky.
!shoal start -n 4 --daemon""",
    """\
import shoal as ipp
rc = ipp.Client()""",
    """\
rc.ids # list the ids of the engine the client can communicate with""",
    """\
dv = rc[:]
dv""",
    """\
def get_engine_pid():
    import os
    return os.getpid()
    
dv.apply_sync(get_engine_pid)""",
    """\
%%px
import os
os.getpid()""",
    """\
%%px
foo = 'bar on pid {}'.format(os.getpid())""",
    """\
%%px
foo""",
    """\
dv['foo']""",
    """\
dv['foo'] = 'bar'
dv['foo']""",
    """\
# start with a list of ids to work on
user_ids = list(range(1000))
dv.scatter('user_id_chunk', user_ids)""",
    """\
dv.scatter('user_id_chunk', user_ids).get()""",
    """\
%%px
print("Len", len(user_id_chunk))
print("Max", max(user_id_chunk))""",
    """\
%%px --local
def the_most_interesting_transformation_ever(user_id):
    \"\"\"
    This function is really interesting
    \"\"\"
    return "ID:{}".format(user_id * 3)""",
    """\
the_most_interesting_transformation_ever(1)""",
    """\
%%px
transformed_user_ids = list(map(the_most_interesting_transformation_ever, user_id_chunk))""",
    """\
all_transformed_user_ids = dv.gather('transformed_user_ids').get()""",
    """\
print(len(all_transformed_user_ids))
print(all_transformed_user_ids[0:10])""",
    """\
%%px --local
import random
import time
def fake_external_io(url):
    # Simulate variable complexity/latency
    time.sleep(random.random())
    return "HTML for URL: {}".format(url)""",
    """\
%time fake_external_io(1)""",
    """\
%time fake_external_io(1)""",
    """\
lview = rc.load_balanced_view()
lview""",
    """\
@lview.parallel()
@ipp.require('time', 'random')
def p_fake_external_io(url):
    # Simulate variable complexity/latency
    time.sleep(random.random())
    return "HTML for URL: {}".format(url)""",
    """\
urls = ['foo{}.com'.format(i) for i in range(100)]""",
    """\
# Naive single threaded
%time res = list(map(fake_external_io, urls))""",
    """\
dv.scatter('urls', urls).get()""",
    """\
# Naive aassignment
%time %px results = list(map(fake_external_io, urls))""",
    """\
# Load balanced version
%time res = p_fake_external_io.map(urls).get()""",
]


def notebook():
    """The cells as a Jupyter notebook (nbformat 4)."""
    cells = [{"cell_type": "markdown", "metadata": {}, "source": [
        "# The ipyparallel walk-through, on shoal\n",
        "\n",
        "The user's own walk-through, with two changes: `import shoal as ipp` and `shoal start` "
        "in place of `ipcluster start`. `examples/walkthrough.py` runs the same cells.",
    ]}]
    for text in CELLS:
        lines = text.splitlines(keepends=True)
        cells.append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                      "source": lines})
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def run():
    """Runs every cell in an IPython shell; returns the number of cells that failed."""
    from IPython.testing.globalipapp import start_ipython
    ip = start_ipython()
    ip.colors = "nocolor"
    failed = 0
    for n, text in enumerate(CELLS, 1):
        print(f"In [{n}]:")
        print(text)
        print(flush=True)
        result = ip.run_cell(text, store_history=True)
        sys.stdout.flush()
        if not result.success:
            failed += 1
        print()
    return failed


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-notebook":
        with open(sys.argv[2], "w") as f:
            json.dump(notebook(), f, indent=1)
            f.write("\n")
        sys.exit(0)
    failed = run()
    print(f"walk-through: {len(CELLS)} cells, {failed} failed")
    sys.exit(1 if failed else 0)
