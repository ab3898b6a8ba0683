"""ipyparallel's IPython magics: %px, %%px, %pxresult, %pxconfig, %autopx.

Registered by ``Client()`` inside IPython (for all engines, blocking), by
``Client.activate()`` / ``DirectView.activate(suffix)``, or by ``%load_ext
shoal`` (which connects to the default profile's cluster on first use).
Output is printed as ipyparallel prints it: ``[stdout:0]`` blocks of text,
then ``Out[0:1]: value`` for each engine's cell value (engine 0, its cell 1).
"""

import ast
import sys

from .error import AlreadyDisplayedError, CompositeError
from .outputs import GROUPBY, display_outputs, stream_outputs


def _target_text(targets):
    """targets as the verbose line shows them: a long list abbreviated."""
    if isinstance(targets, list) and len(targets) > 10:
        return str(targets[:4])[:-1] + ", ..., " + str(targets[-4:])[1:]
    return str(targets)


def _magics_class():
    # IPython is only needed once magics are asked for.
    from IPython.core import magic_arguments
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, no_var_expand

    def output_args(f):
        f = magic_arguments.argument("-o", "--out", dest="save_name", default=None,
                                     help="store the AsyncResult in this variable")(f)
        f = magic_arguments.argument("--group-outputs", dest="groupby", default="type", choices=GROUPBY,
                                     help="print outputs grouped by type (default), by engine, or in order")(f)
        f = magic_arguments.argument("-e", dest="groupby", action="store_const", const="engine", default="type",
                                     help="group outputs by engine")(f)
        f = magic_arguments.argument("-r", dest="groupby", action="store_const", const="order", default="type",
                                     help="group outputs in order")(f)
        return f

    def exec_args(f):
        f = magic_arguments.argument("--stream", dest="stream", action="store_const", const=True,
                                     help="print the engines' output as it arrives (when blocking)")(f)
        f = magic_arguments.argument("--no-stream", dest="stream", action="store_const", const=False,
                                     help="print it once the cell has finished everywhere (the default)")(f)
        f = magic_arguments.argument("--verbose", dest="set_verbose", action="store_const", const=True,
                                     help="say which engines run the code")(f)
        f = magic_arguments.argument("--no-verbose", dest="set_verbose", action="store_const", const=False,
                                     help="do not")(f)
        f = magic_arguments.argument("-t", "--targets", default=None,
                                     help="the engines: an id, a list ([0, 2]), a slice of the ids (1:3, ::2) "
                                          "or 'all'")(f)
        f = magic_arguments.argument("-a", "--noblock", dest="block", action="store_const", const=False,
                                     help="return an AsyncResult at once")(f)
        f = magic_arguments.argument("-b", "--block", dest="block", action="store_const", const=True,
                                     help="wait for the engines and print their outputs")(f)
        f = magic_arguments.argument("--progress-after", dest="progress_after", type=float, default=None,
                                     help="show a progress bar once the cell has run this many seconds "
                                          "(when blocking); -1: never (the default), 0: at once")(f)
        f = magic_arguments.argument("--signal-on-interrupt", dest="signal_on_interrupt", default=None,
                                     help="the signal Ctrl-C sends the engines while a blocking cell runs: "
                                          "a name or number (default SIGINT, which interrupts their code; "
                                          "0 interrupts none, as kill -0)")(f)
        return f

    class ParallelMagics(Magics):
        """%px and friends for one DirectView (ipyparallel's ParallelMagics)."""

        def __init__(self, shell, view=None, suffix="", connect=None):
            self.suffix = suffix
            self._view = view
            self._connect = connect  # makes the view on first use (%load_ext shoal)
            self.last_result = None
            self.verbose = False
            self.stream = False
            self.progress_after = -1  # seconds before a blocking cell shows a progress bar; -1: never
            self.signal_on_interrupt = "SIGINT"  # what Ctrl-C sends the engines while a cell blocks
            self._autopx = False
            super().__init__(shell)
            # The magics' names carry the suffix: %px_even for activate("_even").
            for kind in ("line", "cell"):
                self.magics[kind] = {n + suffix: meth for n, meth in self.magics[kind].items()}
            if not suffix:
                self.magics["line"]["result"] = self.pxresult  # ipyparallel keeps %result, the old name

        @property
        def view(self):
            if self._view is None:
                self._view = self._connect()
            return self._view

        def _targets(self, text):
            """A --targets argument as ipyparallel reads it: a slice of the
            client's ids ("1:3", "::2") as the list it gives, "all" as "all"
            (every engine, at each call), else an id or a list of them."""
            if ":" in text:
                try:
                    parts = [int(p) if p.strip() else None for p in text.strip().strip("[]").split(":")]
                    if len(parts) > 3:
                        raise ValueError(text)
                    return self.view.client.ids[slice(*parts)]
                except ValueError:
                    raise UsageError(f"--targets {text}: not a slice of the engine ids (such as 1:3 or ::2)") \
                        from None
            if "all" in text:
                return "all"
            try:
                return ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                raise UsageError(f"--targets {text}: not an engine id, a list of them, a slice or 'all'") from None

        @magic_arguments.magic_arguments()
        @exec_args
        def pxconfig(self, line):
            """Sets the defaults of %px: --targets, --block/--noblock, --verbose, --stream,
            --progress-after, --signal-on-interrupt."""
            args = magic_arguments.parse_argstring(self.pxconfig, line)
            if args.targets:
                self.view.targets = self._targets(args.targets)
            if args.block is not None:
                self.view.block = args.block
            if args.set_verbose is not None:
                self.verbose = args.set_verbose
            if args.stream is not None:
                self.stream = args.stream
            if args.progress_after is not None:
                self.progress_after = args.progress_after
            if args.signal_on_interrupt is not None:
                self.signal_on_interrupt = args.signal_on_interrupt

        @magic_arguments.magic_arguments()
        @output_args
        def pxresult(self, line=""):
            """Prints the outputs of the last %px again (raises its errors)."""
            args = magic_arguments.parse_argstring(self.pxresult, line)
            if self.last_result is None:
                raise UsageError("%pxresult recalls last %px result, which has not yet been used.")
            if args.save_name:
                self.shell.user_ns[args.save_name] = self.last_result
                return
            try:
                self.last_result.get()
            finally:
                display_outputs(self.last_result, args.groupby)

        @magic_arguments.magic_arguments()
        @exec_args
        @output_args
        @magic_arguments.argument("--local", action="store_true", help="also run the cell here")
        def cell_px(self, line="", cell=None):
            """Runs the cell on the engines (%%px [options]). The options'
            line expands {x} and $x from this namespace, as any magic's
            does; the cell is code for the engines, and is sent as written."""
            args = magic_arguments.parse_argstring(self.cell_px, line)
            verbose = self.verbose if args.set_verbose is None else args.set_verbose
            waiting = dict(progress_after=args.progress_after, signal_on_interrupt=args.signal_on_interrupt)
            if args.local:
                ar = self.parallel_execute(cell, block=False, targets=args.targets, verbose=verbose,
                                           save_name=args.save_name)
                self.shell.run_cell(cell)
                block = self.view.block if args.block is None else args.block
                if block:
                    self._block_on(ar, args.groupby, False, **waiting)
                    return None
                return ar
            return self.parallel_execute(cell, block=args.block, groupby=args.groupby, targets=args.targets,
                                         verbose=verbose, save_name=args.save_name,
                                         stream=self.stream if args.stream is None else args.stream, **waiting)

        @no_var_expand
        def px(self, line=""):
            """%px CODE runs CODE on the engines, with the defaults %pxconfig
            set. CODE is sent as written: {x} and $x are the engines' to
            read (in an f-string, say), not expanded from this namespace."""
            return self.parallel_execute(line, verbose=self.verbose)

        def parallel_execute(self, cell, block=None, groupby="type", targets=None, verbose=False,
                             save_name=None, stream=None, progress_after=None, signal_on_interrupt=None):
            view = self.view
            block = view.block if block is None else block
            saved = view.targets
            try:
                if targets:
                    view.targets = self._targets(targets)
                if verbose:
                    print(f"{'P' if block else 'Async p'}arallel execution on engine(s): "
                          f"{_target_text(view.targets)}")
                ar = view.execute(cell, silent=False, block=False)
            finally:
                view.targets = saved
            ar._fname = "%px"
            self.last_result = ar
            if save_name:
                self.shell.user_ns[save_name] = ar
            if not block:
                return ar
            self._block_on(ar, groupby, self.stream if stream is None else stream, progress_after,
                           signal_on_interrupt)
            return None

        def _block_on(self, ar, groupby, stream, progress_after=None, signal_on_interrupt=None):
            """Waits for a blocking cell and prints its outputs (or streams
            them). A progress bar after progress_after seconds; on Ctrl-C,
            signal_on_interrupt goes to the engines still running the cell
            (SIGINT interrupts their code; 0 is a signal that none receives,
            and the cell's engines run on), and what has arrived is shown.
            When streaming, the tracebacks are shown as they arrive: the
            CompositeError is raised as an AlreadyDisplayedError ("N errors")."""
            after = self.progress_after if progress_after is None else progress_after
            sig = self.signal_on_interrupt if signal_on_interrupt is None else signal_on_interrupt
            try:
                if stream:
                    stream_outputs(ar)
                elif after >= 0 and not ar.wait(after):
                    ar.wait_interactive()
                try:
                    ar.get()
                except CompositeError as e:
                    if stream:
                        raise AlreadyDisplayedError(e) from None
                    raise
            except KeyboardInterrupt:
                print(f"Received Keyboard Interrupt. Sending signal {sig} to engines...", file=sys.stderr)
                self.view.client.send_signal(sig, targets=[e for e in ar._targets if e not in ar._results])
                ar.wait(1)  # what the interrupted code printed comes with its reply
            finally:
                if not stream:
                    display_outputs(ar, groupby)

        def autopx(self, line=""):
            """Toggles running every cell on the engines (as %%px); %autopx again stops it."""
            transforms = self.shell.input_transformers_cleanup
            if self._autopx:
                if self._autopx_transform in transforms:
                    transforms.remove(self._autopx_transform)
                self._autopx = False
                print("%autopx disabled")
            else:
                transforms.append(self._autopx_transform)
                self._autopx = True
                print("%autopx enabled")

        def _autopx_transform(self, lines):
            """Turns a cell into %%px, unless it is the %autopx that ends it."""
            text = "".join(lines)
            first = text.lstrip().split("\n", 1)[0]
            if not text.strip() or first.startswith(("%autopx", "%%px", f"%autopx{self.suffix}")):
                return lines
            return [f"%%px{self.suffix}\n"] + lines

    # What @magics_class would record, by hand: the suffix is added per instance.
    ParallelMagics.magics = {"line": {"px": "px", "pxresult": "pxresult", "pxconfig": "pxconfig",
                                      "autopx": "autopx"},
                             "cell": {"px": "cell_px"}}
    ParallelMagics.registered = True
    return ParallelMagics


def register(view=None, suffix="", connect=None):
    """Registers the magics for view (or for the view connect() makes on first
    use) in the running IPython; returns them, or None outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    if ip is None:
        return None
    magics = _magics_class()(ip, view=view, suffix=suffix, connect=connect)
    ip.register_magics(magics)
    return magics


def load_ipython_extension(ip, connect):
    """%load_ext shoal (shoal.load_ipython_extension): the magics, for the
    view connect() makes on first use (every engine of the default
    profile's cluster, blocking)."""
    magics = _magics_class()(ip, connect=connect)
    ip.register_magics(magics)


__all__ = ["display_outputs", "register", "load_ipython_extension"]
