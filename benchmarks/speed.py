"""Speed of this package against diffusers on the same weights, measured in one run (not a test).

    python -m benchmarks.speed                      # tiny config and full-size SD v1.5 UNet, CPU, eager
    python -m benchmarks.speed --configs full --latent 64 --device cuda --dtype float16 --compile

Prints seconds per guided denoising step (one UNet call on a batch of 2: unconditional + conditional) for both
implementations, interleaved so that both see the same machine state, with the median, the spread (min-max) and
the ratio ours / diffusers (<= 1.00: this package is not slower). Random weights of the real shapes, copied from
diffusers into `sd`, so both do exactly the same arithmetic.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sd
from sd.checkpoint import build_models, convert_diffusers
from tests.reference import diffusers_unet

# One guided UNet step at 512x512 (batch 2, 64x64 latents, 77 tokens), counted with torch's FLOP counter (SD_FACTS).
FLOP_PER_GUIDED_STEP_512 = 1.607e12


def build_pair(cfg: sd.UNetConfig, device, dtype):
    ref = diffusers_unet(cfg)
    parts = convert_diffusers(ref.state_dict(), {}, {})
    ours = sd.DiffusionUNET(cfg)
    ours.load_state_dict(parts["unet"], strict=True)
    return (ref.to(device, dtype).eval().requires_grad_(False),
            ours.to(device, dtype).eval().requires_grad_(False))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fns: dict, repeats: int, device) -> dict[str, list[float]]:
    """Interleave the candidates (a, b, a, b, ...) so drifts in machine load hit both alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def bench_config(name: str, cfg: sd.UNetConfig, latent: int, repeats: int, device, dtype, compile_: bool):
    ref, ours = build_pair(cfg, device, dtype)
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)          # uncond + cond
    ctx = torch.randn(2, 77, cfg.context_dim, device=device, dtype=dtype)
    t = torch.tensor(981, device=device)
    ref_step = lambda: ref(x, t, encoder_hidden_states=ctx).sample  # noqa: E731
    our_step = lambda: ours(x, ctx, t)                               # noqa: E731
    with torch.no_grad():
        diff = (our_step() - ref_step()).abs().max().item()
        rows = [("eager", {"diffusers": ref_step, "sd": our_step})]
        if compile_:
            ref_c, ours_c = torch.compile(ref), torch.compile(ours)
            rows.append(("compiled", {"diffusers": lambda: ref_c(x, t, encoder_hidden_states=ctx).sample,
                                      "sd": lambda: ours_c(x, ctx, t)}))
        for mode, fns in rows:
            time_calls(fns, 1, device)            # warm-up (and compilation)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = time_calls(fns, repeats, device)
            med = {k: statistics.median(v) for k, v in times.items()}
            flop = FLOP_PER_GUIDED_STEP_512 * (latent / 64) ** 2 if name == "full" else None
            for impl in ("sd", "diffusers"):
                v = times[impl]
                tflops = f"{flop / med[impl] / 1e12:7.2f}" if flop else "      -"
                print(f"{name:5s} {mode:8s} {impl:9s} latent {latent:3d}  {med[impl]:8.4f} s/step  "
                      f"spread {min(v):.4f}-{max(v):.4f}  TFLOP/s {tflops}")
            ratios = [a / b for a, b in zip(times["sd"], times["diffusers"])]
            print(f"{name:5s} {mode:8s} ratio sd/diffusers = {med['sd'] / med['diffusers']:.3f} "
                  f"(per-pair ratios {min(ratios):.3f}-{max(ratios):.3f}); max |difference| {diff:.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=["tiny", "full"], default=["tiny", "full"])
    p.add_argument("--latent", type=int, default=None,
                   help="latent side (64 = 512x512 images); default 64 on CUDA, 32 for full size on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.configs:
        cfg = sd.UNetConfig.tiny() if name == "tiny" else sd.UNetConfig()
        latent = args.latent or (16 if name == "tiny" else 64 if device.type == "cuda" else 32)
        repeats = args.repeats or (20 if name == "tiny" else 3 if device.type == "cpu" else 20)
        bench_config(name, cfg, latent, repeats, device, dtype, args.compile)


if __name__ == "__main__":
    main()
