"""bnlab: run batch-normalization vs no-normalization experiments and read the answer."""

import os

__version__ = "0.1.0"

# Idle OpenMP threads of torch sleep instead of spinning on a core that another process (or another run of
# the same sweep) needs: beside one busy process a 2-thread run kept 2 % of its speed with spinning threads.
# libgomp reads this when torch loads, so it is set here, before any bnlab module imports torch; a value the
# user set stays. docs/performance.md has what it changes, measured.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
