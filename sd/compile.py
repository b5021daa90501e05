"""torch.compile with a safety net: where compilation fails (no compiler, unsupported platform), run eager."""
from __future__ import annotations

import warnings

import torch
from torch import nn

# Inductor "freezing" folds the weights into the compiled graph as constants and lays them out for oneDNN: on a
# CPU it turns compilation from slower than eager into faster (SD v1.5 UNet step at 256x256 on 2 cores: eager
# 2.2-3.0 s, compiled 3.8 s, compiled with freezing 2.0 s). The price: later changes to the weights are not seen,
# which suits a pipeline that only samples. GPUs gain little from it, so it is used on CPUs only.
CPU_INDUCTOR_OPTIONS = {"freezing": True}


def default_compile_kwargs(device: torch.device | str) -> dict:
    """torch.compile arguments for an inference-only model on `device`."""
    return {"options": dict(CPU_INDUCTOR_OPTIONS)} if torch.device(device).type == "cpu" else {}


class CompiledOrEager(nn.Module):
    """Calls the compiled module; on the first failure warns once and uses the eager module from then on."""

    def __init__(self, module: nn.Module, **compile_kwargs):
        super().__init__()
        self.module = module
        self.config = getattr(module, "config", None)
        self._compiled = torch.compile(module, **compile_kwargs)
        self._failed = False

    def forward(self, *args, **kwargs):
        if not self._failed:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as e:  # compilation problems surface at the first call
                self._failed = True
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "running the UNet eagerly")
        return self.module(*args, **kwargs)


def compile_or_eager(module: nn.Module, **compile_kwargs) -> nn.Module:
    if not hasattr(torch, "compile"):
        warnings.warn("this torch has no torch.compile; running eagerly")
        return module
    return CompiledOrEager(module, **compile_kwargs)
