"""Check the newest sweep of the README's main command (`bnlab train -m norm=none,batch optim.lr=0.01,0.1
seed=0,1,2 trainer.fuse=auto`): every run completed, and the sweep's verdict says that BN reaches 95 % test
accuracy in fewer steps than no normalization, each at its best lr (a speed-up above 1, exact or a lower
bound where no BN's seeds never got there). CI runs this after the README's main command."""

import sys
from pathlib import Path

from bnlab.record.summary import Status
from bnlab.results.analysis import load_sweep
from bnlab.results.summarize import fmt_iters


def main(sweeps: Path) -> int:
    newest = max(p for p in sweeps.iterdir() if p.is_dir())
    sweep = load_sweep(newest)
    for g in sweep.groups:
        reached = ", ".join(f"{t:g}: {fmt_iters(g.thresholds.get(t))}" for t in sweep.thresholds)
        print(f"{newest.name} {g.label}: {len(g.runs)} runs, iterations to {sweep.metric}: {reached}")
    completed = bool(sweep.runs) and all(r.summary.status == Status.COMPLETED for r in sweep.runs)
    print("every run completed:", completed)
    verdict = next((v for v in sweep.verdicts if v.arm == "norm=batch" and v.threshold == 0.95), None)
    faster = verdict is not None and verdict.speedup > 1 and verdict.bound in ("exact", "lower")
    said = "" if verdict is None else f"({verdict.speedup:.2f}x, {verdict.bound})"
    print("the verdict: BN needs fewer steps to 95%:", faster, said)
    return 0 if completed and faster else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
