"""README, .ci/run, pyproject.toml, environment.yml and the Colab set-up cell tell the same story."""
import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = re.compile(r"torch==([\d.]+)")
PYTORCH_CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
FRONT_ENDS = {"jupyterlab", "notebook"}


def _readme_blocks(heading: str) -> list[list[str]]:
    """The non-empty lines of each ```bash block of the README's section `heading` (up to the next ## heading)."""
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n## ", text.split(f"## {heading}", 1)[1], maxsplit=1)[0]
    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def _readme_block(heading: str) -> list[str]:
    return _readme_blocks(heading)[0]


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _requirements(extra: str) -> set[str]:
    """The package names an extra installs, following `sd-from-scratch[other]` to the other extra."""
    names = set()
    for requirement in _extras()[extra]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        inner = re.search(r"\[(\w+)\]", requirement)
        names |= _requirements(inner.group(1)) if name == "sd-from-scratch" else {name.lower()}
    return names


def _colab_set_up_cell() -> str:
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tools" / "make_notebooks.py")
    make_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebooks)
    return make_notebooks.header_cells("notebooks", "00_start_here.ipynb")[1].source


def test_ci_runs_the_readme_set_up_and_exactly_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    for command in _readme_block("Set-up"):
        assert command in ci, f"README set-up command missing from .ci/run: {command}"
    test_command = _readme_block("Test")
    assert len(test_command) == 1 and ci[-1] == test_command[0]


def test_ci_installs_torch_from_the_ordinary_index_at_the_readme_pin():
    ci = (ROOT / ".ci/run").read_text()
    pin = TORCH_PIN.search(_readme_block("Set-up")[0]).group(1)
    assert f"pip install torch=={pin}\n" in ci
    assert "download.pytorch.org" not in ci


def test_readme_gives_a_cpu_only_torch_line_with_the_same_pin():
    default, *others = _readme_blocks("Set-up")
    cpu_lines = [line for block in others for line in block if PYTORCH_CPU_INDEX in line]
    assert len(cpu_lines) == 1, "the README's Set-up should give one CPU-only torch line"
    assert TORCH_PIN.search(cpu_lines[0]).group(1) == TORCH_PIN.search(default[0]).group(1)
    assert cpu_lines[0].startswith("pip install torch==")


def test_nothing_installs_open_clip_any_more():
    # CLIP's merges file ships in sd/assets (tests/test_tokenizer.py checks its bytes)
    for where, text in [("README set-up", "\n".join(sum(_readme_blocks("Set-up"), []))),
                        (".ci/run", (ROOT / ".ci/run").read_text()),
                        ("environment.yml", (ROOT / "environment.yml").read_text()),
                        ("the Colab set-up cell", _colab_set_up_cell())]:
        assert "open-clip" not in text and "open_clip" not in text, f"{where} still installs open-clip-torch"


def test_environment_yml_agrees_with_pyproject_and_readme():
    env = (ROOT / "environment.yml").read_text()
    torch_pin = TORCH_PIN.search(_readme_block("Set-up")[0]).group(1)
    assert f"torch=={torch_pin}" in env
    assert "-e .[test]" in env
    assert "test" in _extras() and any("diffusers" in d for d in _extras()["test"])


def test_course_extra_brings_a_jupyter_front_end_and_the_tests_install_the_course():
    assert FRONT_ENDS <= _requirements("course")
    assert _requirements("course") <= _requirements("test")


def test_readme_runs_the_course_locally_in_two_commands_ending_in_jupyter_lab():
    text = (ROOT / "README.md").read_text()
    local = text.split("**Locally**", 1)[1]
    commands = [line for line in re.search(r"```bash\n(.*?)```", local, re.S).group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0] == 'pip install -e ".[course]"'
    assert commands[1].startswith("jupyter lab notebooks/")


def test_colab_set_up_cell_installs_the_notebooks_libraries_without_a_front_end():
    source = _colab_set_up_cell()
    extra = re.search(r"\[(\w+)\] @ git\+", source)
    assert extra, "the Colab set-up cell should install the package with an extra"
    installed = _requirements(extra.group(1))
    # Colab pins its own front end (google-colab requires notebook 6.5): installing one over it breaks the runtime
    assert not installed & FRONT_ENDS, f"Colab's set-up installs {installed & FRONT_ENDS}"
    assert installed == _requirements("course") - FRONT_ENDS, "Colab should get every library the notebooks use"
