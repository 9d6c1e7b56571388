"""Check the newest `bnlab train -m norm=none,batch` sweep: both runs completed and BN reached 95% test
accuracy in fewer iterations than no normalization (CI runs this after the README's main command)."""

import sys
from pathlib import Path

from bnlab.summarize import load_runs


def main(sweeps: Path) -> int:
    newest = max(p for p in sweeps.iterdir() if p.is_dir())
    runs = {s["config"]["norm"]["name"]: s for s in load_runs(newest)}
    for norm, s in sorted(runs.items()):
        print(f"{newest.name} norm={norm}: {s['status']}, iterations to test_acc: {s['iterations_to_threshold']}")
    bn, none = runs["batch"]["iterations_to_threshold"]["0.95"], runs["none"]["iterations_to_threshold"]["0.95"]
    ok = all(s["status"] == "completed" for s in runs.values()) and bn is not None and (none is None or bn < none)
    print("BN reaches 95% in fewer iterations than no BN:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
