"""README, .ci/run, pyproject.toml and environment.yml tell the same story."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_set_up_and_exactly_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    for command in _readme_block("Set-up"):
        assert command in ci, f"README set-up command missing from .ci/run: {command}"
    test_command = _readme_block("Test")
    assert len(test_command) == 1 and ci[-1] == test_command[0]


def test_environment_yml_agrees_with_pyproject_and_readme():
    env = (ROOT / "environment.yml").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", _readme_block("Set-up")[0]).group(1)
    assert f"torch=={torch_pin}" in env
    assert "-e .[test]" in env
    assert re.search(r"open-clip-torch==[\d.]+", env).group(0) in _readme_block("Set-up")[0]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "test" in extras and any("diffusers" in d for d in extras["test"])


def test_colab_set_up_cell_installs_the_open_clip_version_of_the_readme():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
    make_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebooks)
    pin = f"open-clip-torch=={make_notebooks.OPEN_CLIP_VERSION}"
    assert pin in make_notebooks.header_cells("notebooks", "00_start_here.ipynb")[1].source
    assert pin in _readme_block("Set-up")[0]
