"""Check the newest `bnlab train -m norm=none,batch` sweep: every run completed, BN reached 95% test accuracy
in fewer iterations than no normalization, and the sweep's verdict says so: BN's speed-up over none at 0.95,
each at its best lr, above 1 (exact, or a lower bound where no BN never got there). CI runs this after the
README's main command."""

import sys
from pathlib import Path

from bnlab.record.summary import Status
from bnlab.results.analysis import load_runs, load_sweep


def main(sweeps: Path) -> int:
    newest = max(p for p in sweeps.iterdir() if p.is_dir())
    runs = {r.summary.norm: r.summary for r in load_runs(newest)}
    for norm, s in sorted(runs.items()):
        reached = ", ".join(f"{t:g}: {i}" for t, i in s.iterations_to_threshold.items())
        print(f"{newest.name} norm={norm}: {s.status.value}, iterations to {s.threshold_metric}: {reached}")
    bn, none = (runs[norm].iterations_to_threshold.get(0.95) for norm in ("batch", "none"))
    ok = all(s.status == Status.COMPLETED for s in runs.values()) and bn is not None and (none is None or bn < none)
    print("BN reaches 95% in fewer iterations than no BN:", ok)
    sweep = load_sweep(newest)
    verdict = next((v for v in sweep.verdicts if v.arm == "norm=batch" and v.threshold == 0.95), None)
    faster = verdict is not None and verdict.speedup > 1 and verdict.bound in ("exact", "lower")
    print(
        "the verdict: BN needs fewer steps to 95%:",
        faster,
        "" if verdict is None else f"({verdict.speedup:.2f}x, {verdict.bound})",
    )
    return 0 if ok and faster else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
