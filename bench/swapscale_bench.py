"""bench/swapscale_bench: the swap workload of bench/swap_bench.py at 2x and 4x the data.

Owns: only the choice of sizes (2x and 4x of swap_bench's 512 MiB in a 128 MiB cgroup, the limit
scaled alike; ``--quick``: 2x of the quick size).  Everything else -- the child, the cgroup,
zcached and zram as the only swap, the figures, the clean-up -- is bench/swap_bench.py.
``MAX_REPEAT = 1``: the runner runs it once whatever ``--repeat`` says (a 4x run takes ~20 min
on the 2-CPU VM), so these figures have no spread; the 1x figures in ``swap`` do.
"""

from __future__ import annotations

from typing import Any

from bench.swap_bench import run_factors, summary

MAX_REPEAT = 1

__all__ = ["MAX_REPEAT", "run", "summary"]


def run(quick: bool) -> dict[str, Any]:
    return run_factors(quick, (2,) if quick else (2, 4))
