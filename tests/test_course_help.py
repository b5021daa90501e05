"""The course's help rules: every check has a test that feeds it an unknown wrong answer (and its message shows no
program text), predictions never print their answer headless, and the notebooks' settings are read in one line."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sd.course.checks
from sd.course import predict
from sd.course.checks.common import Case, check_function
from sd.runtime import env_choice, env_flag, env_float, env_int, env_path
from check_helpers import program_text, rejects_unrecognised

TESTS = Path(__file__).resolve().parent
CHECKS = [name for name in sd.course.checks.__all__ if name.startswith("check_")]


@pytest.mark.parametrize("check", CHECKS)
def test_every_check_has_a_test_with_a_wrong_answer_it_does_not_know(check):
    """Each check's tests call rejects_unrecognised(check_x, ...), which scans the message for program text."""
    pattern = re.compile(rf"rejects_unrecognised\(\s*(checks\.|sd\.course\.checks\.)?{check}\b")
    assert any(pattern.search(path.read_text(encoding="utf-8")) for path in TESTS.glob("test_*.py")), (
        f"no test calls rejects_unrecognised({check}, ...)")


@pytest.mark.parametrize("message, found", [
    ("Hint: return x * torch.sigmoid(1.702 * x)", "a Python keyword"),
    ("Hint: e = (x - x.max(dim=-1, keepdim=True).values).exp()", "a module or attribute access"),
    ("use scores.softmax(dim=-1)", "a method call"),
    ("index it as x[:, None]", "indexing"),
    ("sum with keepdim=True", "a keyword argument"),
    ("the weights are w @ v", "a matrix product"),
])
def test_program_text_is_recognised_in_a_message(message, found):
    assert found in program_text(message)


@pytest.mark.parametrize("message", [
    "the softmax runs over the first dimension: normalise over the last one, each row summing to 1",
    "exp overflows for large inputs (exp(1000) = inf): subtract each row's maximum; softmax(QKᵀ/√d)",
    "output differs from sd.attention.SelfAttention's: max difference 0.3 at index [0, 1] (yours 1.2, expected 0.9)",
])
def test_words_and_maths_are_not_program_text(message):
    assert program_text(message) is None


def test_an_unknown_mistake_points_to_the_hints_and_shows_no_code():
    cases = [Case({"x": torch.arange(6.0).view(2, 3)})]

    def check(fn):
        return check_function("check_demo", fn, lambda x: 2 * x, cases, hint="double every entry",
                              reference_name="the doubling",
                              exercise="0.9")

    message = rejects_unrecognised(check, lambda x: 3 * x, "0.9")
    assert "double every entry" in message and "max difference" in message


def test_a_crash_in_the_learners_code_names_its_line(capsys):
    source = "def broken(x):\n    y = x + 1\n    return y @ torch.ones(5, 5)\n"
    filename = "<ipython-input-1-demo>"
    import linecache
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"torch": torch}
    exec(compile(source, filename, "exec"), namespace)
    cases = [Case({"x": torch.ones(2, 3)})]
    with pytest.raises(AssertionError, match=r"in your cell, line 3: return y @ torch.ones\(5, 5\)"):
        check_function("check_demo", namespace["broken"], lambda x: x, cases, exercise="0.9",
                       reference_name="the identity")


def test_predict_headless_prints_the_question_and_choices_but_not_the_answer(capsys):
    predict("Without the scale, the softmax becomes", ["flatter", "peakier", "the same"], answer=1,
            why="dot products grow like the square root of d")
    out = capsys.readouterr().out
    assert "Predict before you run the next cell: Without the scale" in out
    assert "(a) flatter" in out and "(b) peakier" in out and "(c) the same" in out
    assert "square root" not in out and "right" not in out


@pytest.mark.parametrize("args, error, message", [
    (("", ["a", "b"], 0, "w"), TypeError, "the question as a non-empty string"),
    (("q", ["only one"], 0, "w"), TypeError, "at least two choices"),
    (("q", "ab", 0, "w"), TypeError, "at least two choices"),
    (("q", ["a", "b"], 2, "w"), ValueError, "0 to 1, got 2"),
    (("q", ["a", "b"], True, "w"), ValueError, "got True"),
])
def test_predict_refuses_bad_arguments_in_one_line(args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        predict(*args)


@pytest.mark.parametrize("value, message", [
    ("-5", "$SD_TRAIN_SECONDS must be a number of seconds > 0, got '-5'"),
    ("0", "$SD_TRAIN_SECONDS must be a number of seconds > 0, got '0'"),
    ("ten", "$SD_TRAIN_SECONDS must be a number of seconds > 0, got 'ten'"),
    ("nan", "$SD_TRAIN_SECONDS must be a number of seconds > 0, got 'nan'"),
    ("inf", "$SD_TRAIN_SECONDS must be a number of seconds > 0, got 'inf'"),
])
def test_a_bad_training_budget_is_refused_naming_the_variable(monkeypatch, value, message):
    monkeypatch.setenv("SD_TRAIN_SECONDS", value)
    with pytest.raises(ValueError, match=re.escape(message)):
        env_float("SD_TRAIN_SECONDS", 100, above=0, what="a number of seconds")


def test_settings_give_the_default_when_unset_and_the_value_when_set(monkeypatch, tmp_path):
    monkeypatch.delenv("SD_TRAIN_SECONDS", raising=False)
    assert env_float("SD_TRAIN_SECONDS", 100, above=0) == 100
    monkeypatch.setenv("SD_TRAIN_SECONDS", " 12.5 ")
    assert env_float("SD_TRAIN_SECONDS", 100, above=0) == 12.5
    monkeypatch.setenv("SD_FULL_SIDE", "64")
    assert env_int("SD_FULL_SIDE", 512, minimum=8, maximum=2048) == 64
    monkeypatch.setenv("SD_FULL_SIZE", "yes")
    assert env_flag("SD_FULL_SIZE") is True
    monkeypatch.setenv("SD_DTYPE", "float16")
    assert env_choice("SD_DTYPE", ["float32", "float16", "bfloat16"]) == "float16"
    monkeypatch.setenv("SD_CHECKPOINT", str(tmp_path))
    assert env_path("SD_CHECKPOINT") == tmp_path


@pytest.mark.parametrize("call, value, message", [
    (lambda: env_int("SD_FULL_SIDE", 512, minimum=8, maximum=2048, what="an image side in pixels"), "4.5",
     "$SD_FULL_SIDE must be an image side in pixels from 8 to 2048, got '4.5'"),
    (lambda: env_int("SD_FULL_SIDE", 512, minimum=8, maximum=2048, what="an image side in pixels"), "4096",
     "$SD_FULL_SIDE must be an image side in pixels from 8 to 2048, got '4096'"),
    (lambda: env_flag("SD_FULL_SIDE"), "maybe", "$SD_FULL_SIDE must be 1 or 0"),
    (lambda: env_choice("SD_FULL_SIDE", ["float32", "float16"]), "fp16",
     "$SD_FULL_SIDE must be one of float32, float16, got 'fp16'"),
    (lambda: env_path("SD_FULL_SIDE"), "/no/such/file.safetensors", "(not found)"),
])
def test_every_kind_of_setting_refuses_a_bad_value_in_one_line(monkeypatch, call, value, message):
    monkeypatch.setenv("SD_FULL_SIDE", value)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        call()
    assert "\n" not in str(info.value)
