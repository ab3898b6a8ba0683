"""Shared by every Python test."""

import signal

# A shell that starts the tests in the background (`./scripts/test.sh &`)
# starts them with SIGINT ignored, and every process they start would inherit
# that: the tests that deliver a Ctrl-C (to `shoal start`, to %%px, to
# `shoal bench tradeoff`) would see nothing happen. A handler of our own is
# reset to the default on exec, so the processes we start get SIGINT's
# normal behaviour again.
signal.signal(signal.SIGINT, signal.default_int_handler)
