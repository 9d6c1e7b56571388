"""The README's two set-up commands are what CI runs."""

import re
from pathlib import Path

from helpers import MESSAGES

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readmes_two_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = first_block.strip().splitlines()
    assert len(commands) == 2 and "bnlab train -m norm=none,batch optim.lr=" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(c in ci for c in commands)


def test_the_readme_quotes_what_the_tool_prints():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert [m for m in MESSAGES.values() if m not in readme] == []
