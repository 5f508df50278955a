"""CI runs the README's set-up commands as a new user types them: the two command lines of the
README's "Set-up" section stand verbatim in ``.ci/run``, inside a fresh virtual environment."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def setup_commands(readme: str) -> list:
    """The command lines of the ```bash blocks in the README's ``## Set-up`` section."""
    m = re.search(r"^## Set-up\b.*?$(.*?)(?=^## )", readme, flags=re.M | re.S)
    assert m, "README.md has no '## Set-up' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", m.group(1), flags=re.M | re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _ci_lines() -> list:
    return [line.strip() for line in _read(".ci/run").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_has_the_two_setup_commands():
    cmds = setup_commands(_read("README.md"))
    assert len(cmds) == 2, cmds
    demo, tests = cmds
    assert demo.endswith("python -m planner demo") and "pip install" in demo
    assert "pytest" in tests and '".[test]"' in tests


def test_ci_runs_both_readme_commands_verbatim():
    lines = _ci_lines()
    for cmd in setup_commands(_read("README.md")):
        assert cmd in lines, f".ci/run does not run the README command {cmd!r} as written"
    demo, tests = setup_commands(_read("README.md"))
    assert lines.index(demo) < lines.index(tests)           # the demo first, as the README


def test_ci_uses_a_fresh_virtualenv():
    ci = _read(".ci/run")
    code = "\n".join(_ci_lines())
    assert "python -m venv" in code and "bin/activate" in code
    assert "system-site-packages" not in ci                 # would hide missing dependencies
    venv = code.index("python -m venv")
    for cmd in setup_commands(_read("README.md")):
        assert code.index(cmd) > venv


def test_ci_fails_when_pytest_collects_nothing():
    code = "\n".join(_ci_lines())
    assert re.search(r'"\$rc" -eq 5 \]; then\s*\n.*\n\s*exit 1', code), \
        ".ci/run must turn pytest's exit code 5 (no tests collected) into a failure"
