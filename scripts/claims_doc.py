"""Write docs/claims.md, the claims ledger, from the claims (bnlab/claims/*.yaml) and their recorded runs
(docs/results/*.json), and each claim's figure (docs/figures/claims/NAME.png); tests/test_claims.py fails
while docs/claims.md is stale. Run it after recording a result or changing a claim:

    python scripts/claims_doc.py
"""

from __future__ import annotations

from pathlib import Path

from bnlab.results.claims import Verdict, judge_recorded, markdown
from bnlab.schema.claims import load_claims

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "results"


def verdicts() -> list[Verdict]:
    return [judge_recorded(c, RESULTS) for c in load_claims().values()]


def ledger() -> str:
    """docs/claims.md as it should read now."""
    return markdown(verdicts(), RESULTS)


if __name__ == "__main__":
    from bnlab.results.figures import DPI, claim

    (DOCS / "figures" / "claims").mkdir(parents=True, exist_ok=True)
    for v in verdicts():
        claim(v).savefig(DOCS / "figures" / "claims" / f"{v.claim.name}.png", dpi=DPI)
    (DOCS / "claims.md").write_text(ledger())
    print(f"wrote {DOCS / 'claims.md'} and docs/figures/claims/")
