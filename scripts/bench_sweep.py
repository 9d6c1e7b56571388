"""Wall time of a 4-run sweep with the joblib launcher (2 workers) vs Hydra's basic launcher (one run
at a time), measured back to back in one invocation. Not a test: the ratio depends on the machine.

    python scripts/bench_sweep.py                      # MNIST MLP, 1,000 steps per run
    python scripts/bench_sweep.py data=synthetic trainer.max_steps=300
"""

import subprocess
import sys
import tempfile
import time

SWEEP = ["norm=none,batch", "seed=0,1", "trainer.max_steps=1000"]
LAUNCHERS = {"basic": [], "joblib (2 workers)": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


def wall_time(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-c",
            "from bnlab.face.cli import main; main()",
            "train",
            "-m",
            *overrides,
            f"hydra.sweep.dir={tmp}/sweep",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
        return time.perf_counter() - start


def main() -> None:
    overrides = [*SWEEP, *sys.argv[1:]]
    times = {name: wall_time([*overrides, *extra]) for name, extra in LAUNCHERS.items()}
    print(f"4-run sweep: {' '.join(overrides)}")
    for name, t in times.items():
        print(f"  {name:20s} {t:7.1f} s")
    print(f"  speed-up of joblib over basic: {times['basic'] / times['joblib (2 workers)']:.2f}x")


if __name__ == "__main__":
    main()
