"""The README's two commands are the newcomer's path: CI must run the test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert "pytest tests" in cmds[0]
    assert "nnfast train" in cmds[1] or "examples/" in cmds[1]


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# README test command (begin)\n")[1].split("\n# README test command (end)")[0]
    assert block.strip() == _readme_commands()[0].strip()
