"""The claims ledger's entries: one YAML file per claim in bnlab/claims/, each the claim as the literature
states it, its source, the preset that tests it, the recorded run that decides it (docs/results/SECTION.json)
and the comparisons that decide it, read into typed records here (no torch, no Hydra: `bnlab claims` reads
them without either). bnlab.results.claims decides each comparison on recorded numbers; docs/claims.md lists them all.

A comparison sets one group of the run (`arm`, by some of its keys) against another (`reference`) on a metric:
- `final.NAME`: a final metric (bnlab.schema.metrics), the difference of the means over seeds, arm minus
  reference, with Welch's 95 % interval;
- `diag.TAG`: a diagnostic in one number per run (its median over training), likewise;
- `steps.THRESHOLD`: the speed-up, the reference's median steps to the threshold over the arm's;
- `speed`: steps per second, the arm's over the reference's.
`expect` says what the claim predicts for the arm: `higher`, `lower` or `equal` (within `tolerance`: a
difference in the metric's units, or for the two ratios a factor such as 1.05). A comparison holds when its
interval lies on the predicted side and its estimate is at least `tolerance` from no effect (equal: the whole
interval within the tolerance); it does not hold when the interval rules the predicted effect out; otherwise
it is mixed (the seeds cannot tell). A claim holds when all its comparisons hold, does not hold when every
one of them does not, and is mixed otherwise.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bnlab.schema.config import ConfigError, check_choice

CLAIMS = Path(__file__).resolve().parents[1] / "claims"  # bnlab/claims/NAME.yaml
EXPECTATIONS = ("higher", "lower", "equal")
KINDS = ("final", "diag", "steps", "speed")  # a comparison's metric: KIND.NAME (speed alone)
RATIOS = ("steps", "speed")  # compared as ratios; the others as differences
HOLDS, FAILS, MIXED = "holds", "does not hold", "mixed"
VERDICTS = (HOLDS, FAILS, MIXED)
GROUPS = ("model", "norm", "data", "optim")  # a key `norm: batch` in a comparison means norm.name


@dataclass
class Comparison:
    metric: str  # final.NAME | diag.TAG | steps.THRESHOLD | speed
    arm: dict[str, Any]  # the arm's keys, as in the record's groups (norm: batch, optim.lr: 0.1, ...)
    reference: dict[str, Any]  # the reference group's keys
    expect: str  # higher | lower | equal: the arm's number against the reference's
    tolerance: float  # the smallest effect that counts: a difference (final, diag) or a factor >= 1 (steps, speed)
    reference_metric: str = ""  # final.NAME: the reference's own metric, when it differs (the same group, say)
    why: str = ""  # the comparison in a few words, for the ledger ("at lr 2, where no BN diverges")

    @property
    def kind(self) -> str:
        return self.metric.split(".", 1)[0]

    @property
    def ratio(self) -> bool:
        return self.kind in RATIOS


@dataclass
class Claim:
    claim: str  # one sentence, as the literature states it
    source: str  # paper or tutorial, with its year
    preset: str  # conf/experiment/PRESET.yaml: the sweep that tests it
    compare: list[Comparison]
    section: str = ""  # docs/results/SECTION.json: its recorded numbers (default: the preset's name)
    command: str = ""  # the command that reproduces the record, if not `bnlab train -m +experiment=PRESET`
    note: str = ""  # what the test covers and what it does not; what the full-size test would cost on a GPU
    name: str = field(default="", metadata={"from": "the file name"})

    @property
    def record(self) -> str:
        return self.section or self.preset

    @property
    def run(self) -> str:
        return self.command or f"bnlab train -m +experiment={self.preset}"


def group_keys(keys: dict[str, Any]) -> dict[str, str]:
    """A comparison's keys as the record's groups spell them (norm -> norm.name), values as strings."""
    return {(f"{k}.name" if k in GROUPS else k): str(v) for k, v in keys.items()}


def _check(name: str, claim: Claim) -> None:
    for c in claim.compare:
        if not (isinstance(c.tolerance, (int, float)) and isinstance(c.arm, dict) and isinstance(c.reference, dict)):
            raise ConfigError(f"{name}: a comparison's tolerance is a number, its arm and reference mappings of keys")
        check_choice(f"{name}: compare.metric", c.kind, KINDS, "kinds")
        check_choice(f"{name}: compare.expect", c.expect, EXPECTATIONS)
        if c.ratio and c.tolerance < 1:
            raise ConfigError(f"{name}: the tolerance of a ratio ({c.metric}) is a factor >= 1, not {c.tolerance}")
        if not c.ratio and c.tolerance < 0:
            raise ConfigError(f"{name}: the tolerance of a difference ({c.metric}) is >= 0, not {c.tolerance}")


def _build(cls: type, data: Any, where: str) -> Any:
    """A Claim or Comparison from a YAML mapping: unknown keys and missing ones refused by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a mapping of keys is expected, not {data!r}")
    known = {f.name: f for f in fields(cls) if "from" not in f.metadata}
    required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    if unknown := sorted(set(data) - set(known)):
        raise ConfigError(f"{where}: {', '.join(unknown)} is not a key; accepted keys: {', '.join(known)}")
    if missing := [n for n in required if n not in data]:
        raise ConfigError(f"{where}: {', '.join(missing)} is missing")
    return cls(**data)


def load_claims(folder: Path = CLAIMS) -> dict[str, Claim]:
    """Every claim of the ledger by name (its file's stem), in name order; a malformed file is refused by name."""
    claims = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {e}".splitlines()[0]) from e
        claim = _build(Claim, data, str(path))
        claim.compare = [_build(Comparison, c, f"{path}, compare") for c in claim.compare or []]
        claim.name = path.stem
        _check(path.stem, claim)
        claims[path.stem] = claim
    return claims
