"""Shared machinery of the exercise checks: run the learner's code and the reference on the same inputs, compare.

Every check in `sd.course.checks` follows one pattern:

1. build a few random inputs (`Case`s) under a fixed seed, so a check always sees the same numbers;
2. for a module, build the reference `sd` module and the learner's with the same constructor arguments and
   copy the reference's weights into the learner's (`copy_weights`: same state-dict names and shapes, or a
   message that lists the names expected);
3. call both, compare every output (type, shape, dtype, values); on a mismatch, run each `Mistake` (the
   reference computed the typical wrong way: without the 1/sqrt(d) scale, heads split the wrong way, ...)
   and, if the learner's output equals one of them, name that mistake in the `AssertionError`;
4. on success print ONE line, "✅ check_x passed: matches sd.y on N random inputs (max diff ...)",
   and return True.

Adding a topic (`sd/course/checks/vae.py`, say) takes one function per exercise:

    from ...vae_blocks import VAE_ResidualBlock
    from .common import Case, Mistake, check_module, randn, seeded

    def check_vae_residual_block(cls) -> bool:
        '''Exercise 2.1: the VAE's residual block.'''
        with seeded():
            cases = [Case({"x": randn(2, 32, 8, 8)}, init={"in_channels": 32, "out_channels": 64})]
        mistakes = [Mistake("the skip connection is missing: return skip + h, not h",
                            lambda ref, case: ref.conv2(...))]
        return check_module("check_vae_residual_block", cls, VAE_ResidualBlock, cases, mistakes)

then re-export it in `sd/course/checks/__init__.py`, and prove in `tests/test_checks_<topic>.py` that the reference
passes and that wrong implementations are rejected with the mistake named.

In a notebook, `pick(check, impl, reference=...)` runs a check and returns the implementation to go on with:
the learner's when it passes, else the reference, so a stuck learner can still finish the notebook.
"""
from __future__ import annotations

import contextlib
import functools
import linecache
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

# Every check draws its random inputs and reference weights from this seed: the same numbers on every run.
SEED = 0
# float32 on a CPU: explicit softmax(QK^T)V and the fused kernel differ by ~1e-7; real mistakes by > 1e-2.
ATOL = 1e-5
RTOL = 1e-4
# Messages list at most this many parameter names.
MAX_LISTED = 24
# A fresh module sets some parameters to one constant (LayerNorm/GroupNorm scale 1, shift 0): every norm then
# computes the same thing and swapping two would go unnoticed. The checks move such parameters by this much
# random noise (about their own size) before copying them into the learner's module.
CONSTANT_JITTER = 0.3


@dataclass
class Case:
    """One random input: named positional inputs, keyword arguments, and (for a module) its constructor arguments."""
    inputs: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)

    def call(self, fn: Callable) -> Any:
        """fn(*inputs, **kwargs) on fresh copies, so an in-place change cannot leak into the next call."""
        args = [_clone(v) for v in self.inputs.values()]
        return fn(*args, **{k: _clone(v) for k, v in self.kwargs.items()})

    def describe(self) -> str:
        parts = [f"{name} {_brief(value)}" for name, value in self.inputs.items()]
        parts += [f"{name} {_brief(value)}" for name, value in self.kwargs.items()]
        return ", ".join(parts)


@dataclass
class Mistake:
    """A typical wrong implementation: `compute(reference, case)` gives its output, `hint` says what went wrong."""
    hint: str
    compute: Callable[[Any, Case], Any]


@contextlib.contextmanager
def seeded(seed: int = SEED) -> Iterator[None]:
    """Fix torch's random numbers inside the block, without touching the learner's own random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randn(*shape: int) -> torch.Tensor:
    """A float32 standard-normal tensor (draw inside `seeded()`)."""
    return torch.randn(*shape, dtype=torch.float32)


def qualified_name(obj: Any) -> str:
    """'sd.attention.SelfAttention' for the class or function `obj` (with its arguments for a functools.partial)."""
    if isinstance(obj, functools.partial):
        args = [repr(a) for a in obj.args] + [f"{k}={v!r}" for k, v in obj.keywords.items()]
        return f"{qualified_name(obj.func)}({', '.join(args)})"
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


# ----------------------------------------------------------------------------------------------------------
# The two kinds of checks: a function, and a module class (whose weights are copied from the reference).
# ----------------------------------------------------------------------------------------------------------

def check_function(check_name: str, fn: Callable, reference: Callable, cases: Sequence[Case],
                   mistakes: Sequence[Mistake] = (), hint: str = "", reference_name: str | None = None,
                   atol: float = ATOL, rtol: float = RTOL, exercise: str | None = None) -> bool:
    """Compare fn(*case) with reference(*case) on every case; print one pass line or raise AssertionError.

    `hint` (words, never code) is said when the output differs in a way no `Mistake` explains; `exercise` ("0.1")
    is the exercise whose staged help the message points to.
    """
    require_callable(check_name, fn, "a function")
    runs = ((case, (lambda c: c.call(fn)), reference) for case in cases)
    return _run(check_name, reference_name or qualified_name(reference), runs, len(cases), mistakes, hint,
                atol, rtol, exercise)


def check_module(check_name: str, cls: type, reference_cls: type, cases: Sequence[Case],
                 mistakes: Sequence[Mistake] = (), hint: str = "", reference_name: str | None = None,
                 atol: float = ATOL, rtol: float = RTOL, exercise: str | None = None) -> bool:
    """Build cls(**case.init) and reference_cls(**case.init), copy the weights, compare forward on every case."""
    require_callable(check_name, cls, "a class (the nn.Module itself, not an instance)")

    def runs():
        for i, case in enumerate(cases):
            with seeded(SEED + i):
                reference = reference_cls(**case.init).eval()
                randomise_constant_parameters(reference)
            try:
                learner = build_learner_module(cls, case.init)
                copy_weights(learner, reference, cls.__name__)
            except AssertionError as e:
                raise AssertionError(f"{check_name} failed: {e}") from e.__cause__
            yield case, (lambda c, m=learner: c.call(m)), reference

    return _run(check_name, reference_name or qualified_name(reference_cls), runs(), len(cases), mistakes, hint,
                atol, rtol, exercise)


def build_learner_module(cls: type, init: dict[str, Any]) -> nn.Module:
    """cls(**init) in eval mode, or an AssertionError that says how the check tried to build it."""
    call = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in init.items())})"
    try:
        module = cls(**init)
    except NotImplementedError:
        raise
    except Exception as e:
        raise AssertionError(f"building your module as {call} raised {type(e).__name__}: {e}\n"
                             f"  Hint: keep the constructor's signature as given in the exercise cell.") from e
    if not isinstance(module, nn.Module):
        raise AssertionError(f"{call} gave a {type(module).__name__}, expected a torch.nn.Module")
    return module.eval()


def randomise_constant_parameters(module: nn.Module) -> list[str]:
    """Add CONSTANT_JITTER noise to every parameter whose entries are all equal (norm scales and shifts).

    With the fresh 1 and 0, norm1 and norm2 are the same function and a learner who swaps them passes;
    with their own random values each norm's place shows in the output. Returns the names changed.
    """
    changed = []
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.is_floating_point() and param.numel() > 0 and bool((param == param.flatten()[0]).all()):
                param.add_(CONSTANT_JITTER * torch.randn_like(param))
                changed.append(name)
    return changed


def copy_weights(learner: nn.Module, reference: nn.Module, name: str = "your module") -> None:
    """Load the reference's state dict into the learner's module; AssertionError listing the expected names if they differ."""
    expected = reference.state_dict()
    got = learner.state_dict()
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong_shape = [k for k in expected if k in got and got[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"{name}'s parameters differ from the reference's, so the check cannot copy the reference weights in.",
                 "  expected: " + _listing([f"{k} {_shape(v)}" for k, v in expected.items()])]
        if missing:
            lines.append("  missing in yours: " + _listing(missing))
        if unexpected:
            lines.append("  unexpected in yours: " + _listing([f"{k} {_shape(got[k])}" for k in unexpected]))
        for k in wrong_shape[:MAX_LISTED]:
            lines.append(f"  wrong shape: {k} is {_shape(got[k])}, expected {_shape(expected[k])}")
        lines.append("  Hint: name the layers as in the exercise cell (the reference's names, which the package's "
                     "loader maps to SD's checkpoint keys), with the shapes listed above.")
        raise AssertionError("\n".join(lines))
    with torch.no_grad():
        learner.load_state_dict(expected)


# ----------------------------------------------------------------------------------------------------------
# For notebooks: run a check without stopping the notebook, and go on with the learner's code or the reference.
# ----------------------------------------------------------------------------------------------------------

def try_check(check: Callable[[Any], bool], impl: Any) -> bool:
    """Run check(impl); print what happened instead of raising, and return whether it passed."""
    try:
        return bool(check(impl))
    except NotImplementedError as e:
        exercise = re.match(r"Exercise (\d+\.\d+):", str(e))
        more = f' (more help: hint("{exercise.group(1)}"))' if exercise else ""
        print(f"⏭️  not done yet: {e}{more}")
    except AssertionError as e:
        print(f"❌ {e}")
    except Exception as e:  # a crash inside the learner's code: report it, keep the notebook going
        print(f"❌ {getattr(check, '__name__', 'the check')}: your code raised {type(e).__name__}: {e}"
              f"{_crash_line(e)}")
    return False


def pick(check: Callable[[Any], bool], impl: Any, *, reference: Any) -> Any:
    """The learner's `impl` if `check` passes, else `reference` (saying so), so the notebook can go on either way."""
    ref_name = qualified_name(reference)
    if impl is reference:
        print(f"ℹ️  this is already the reference {ref_name}: run your exercise cell again to check your own.")
        return reference
    if try_check(check, impl):
        return impl
    print(f"➡️  using the reference {ref_name} for the rest of this notebook "
          f"(fix yours and run the cells again to use it instead).")
    return reference


# ----------------------------------------------------------------------------------------------------------
# Internals: run the cases, compare outputs, diagnose.
# ----------------------------------------------------------------------------------------------------------

def _run(check_name: str, ref_name: str, runs, n_cases: int, mistakes: Sequence[Mistake], hint: str,
         atol: float, rtol: float, exercise: str | None = None) -> bool:
    max_diff = 0.0
    # the learner's random state stays as it was: building modules here draws from a forked generator
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for i, (case, learner_call, reference) in enumerate(runs):
            where = f"{check_name} failed on random input {i + 1} of {n_cases} ({case.describe()})"
            expected = case.call(reference)
            try:
                got = learner_call(case)
            except NotImplementedError:
                raise
            except Exception as e:
                raise AssertionError(f"{where}: your code raised {type(e).__name__}: {e}{_crash_line(e)}"
                                     + _hint_line(_diagnose_crash(hint)) + _more_help(exercise)) from e
            problem, diff = _compare(got, expected, ref_name, atol, rtol)
            if problem is not None:
                named = _diagnose(got, reference, case, mistakes, atol, rtol)
                raise AssertionError(f"{where}:\n  {problem}" + (_hint_line(named) if named else
                                     _hint_line(hint) + _unknown_mistake(exercise)))
            max_diff = max(max_diff, diff)
    print(f"✅ {check_name} passed: matches {ref_name} on {n_cases} random inputs (max diff {max_diff:.1g})")
    return True


def _compare(got: Any, expected: Any, ref_name: str, atol: float, rtol: float,
             what: str = "the output") -> tuple[str | None, float]:
    """(None, max difference) when got matches expected, else (what differs, 0)."""
    if isinstance(expected, (tuple, list)):
        # the exercise states the container: a list where a tuple is asked for (or the reverse) is a mistake
        container = type(expected).__name__
        if type(got) is not type(expected) or len(got) != len(expected):
            return (f"{what} should be a {container} of {len(expected)} items, as the exercise states, "
                    f"got {_kind(got)}"), 0.0
        worst = 0.0
        for j, (g, e) in enumerate(zip(got, expected)):
            problem, diff = _compare(g, e, ref_name, atol, rtol, what=f"output [{j}]")
            if problem is not None:
                return problem, 0.0
            worst = max(worst, diff)
        return None, worst
    if not isinstance(got, torch.Tensor):
        return f"{what} should be a tensor of shape {_shape(expected)}, got {_kind(got)}", 0.0
    if got.shape != expected.shape:
        return f"{what} has shape {_shape(got)}, expected {_shape(expected)}", 0.0
    if got.dtype != expected.dtype:
        return f"{what} has dtype {got.dtype}, expected {expected.dtype} (keep the inputs' dtype)", 0.0
    got = got.detach().float().cpu()
    expected = expected.detach().float().cpu()
    if torch.isnan(got).any() and not torch.isnan(expected).any():
        n = int(torch.isnan(got).sum())
        return f"{what} contains {n} NaN values, the reference none", 0.0
    if torch.allclose(got, expected, atol=atol, rtol=rtol):
        return None, float((got - expected).abs().max()) if got.numel() else 0.0
    diff = (got - expected).abs()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return (f"{what} differs from {ref_name}'s: max difference {float(diff.max()):.3g} at index {list(worst)} "
            f"(yours {float(got[worst]):.4g}, expected {float(expected[worst]):.4g}; "
            f"tolerance {atol:g} + {rtol:g} x |expected|)"), 0.0


def _diagnose(got: Any, reference: Any, case: Case, mistakes: Sequence[Mistake],
              atol: float, rtol: float) -> str | None:
    """The hint of the first typical mistake whose output equals the learner's, if any."""
    for mistake in mistakes:
        try:
            wrong = mistake.compute(reference, case)
        except Exception:
            continue   # this mistake cannot happen with this input (e.g. a shape that does not fit)
        if wrong is not None and _same(got, wrong, atol, rtol):
            return mistake.hint
    return None


def _diagnose_crash(hint: str) -> str:
    return hint or "read the shapes in the error above; the exercise cell lists the shape of each tensor"


def _same(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, atol, rtol) for x, y in zip(a, b))
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    return torch.allclose(a.detach().float().cpu(), b.detach().float().cpu(), atol=atol, rtol=rtol, equal_nan=True)


def _hint_line(hint: str | None) -> str:
    return f"\n  Hint: {hint}" if hint else ""


def _more_help(exercise: str | None) -> str:
    return f'\n  More help, one step at a time: hint("{exercise}")' if exercise else ""


def _unknown_mistake(exercise: str | None) -> str:
    """The message's end when no known mistake explains the difference: where to look next, never the answer."""
    where = f'hint("{exercise}")' if exercise else "the exercise's hints"
    return (f"\n  This is not one of the mistakes this check knows. Compare your steps with the exercise's "
            f"text, or ask {where} for help one step at a time.")


def _crash_line(error: BaseException) -> str:
    """' (your line 12: `q = ...`)' for the deepest frame of the learner's own code (a notebook cell), if any."""
    frame = None
    tb = error.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "ipykernel" in filename or filename.startswith("<ipython-input") or filename.startswith("<cell"):
            frame = tb
        tb = tb.tb_next
    if frame is None:
        return ""
    text = linecache.getline(frame.tb_frame.f_code.co_filename, frame.tb_lineno).strip()
    return f" (in your cell, line {frame.tb_lineno}: {text})" if text else f" (in your cell, line {frame.tb_lineno})"


def require_callable(check_name: str, obj: Any, what: str = "a function") -> None:
    """AssertionError unless `obj` can be called (and is a class, when `what` asks for one)."""
    if not callable(obj):
        raise AssertionError(f"{check_name} expects {what}, got {_kind(obj)}")
    if what.startswith("a class") and not isinstance(obj, type):
        raise AssertionError(f"{check_name} expects {what}, got {_kind(obj)}: pass the class, e.g. "
                             f"{check_name}(SelfAttention), not SelfAttention(...)")


def _listing(items: Sequence[str]) -> str:
    """Comma-separated, cut after MAX_LISTED items (a UNet has hundreds of weights)."""
    more = f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _brief(value: Any) -> str:
    """A tensor's shape, a number's or string's value, else the kind of object (never a module's whole repr)."""
    if isinstance(value, torch.Tensor):
        return _shape(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (tuple, list)) and len(value) <= MAX_LISTED and all(
            isinstance(v, (bool, int, float, str)) for v in value):
        return repr(value)
    return f"<{type(value).__name__}>"


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {_shape(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"{type(value).__name__} {value!r}"[:120]
