"""Speed and memory of this package against diffusers on the same weights, measured in one run (not a test).

    python -m benchmarks.speed                                   # CPU: tiny and full-size UNet steps, tiny image
    python -m benchmarks.speed --device cuda --compile --image   # GPU: 512x512, float16, eager and compiled

For each configuration it prints seconds per guided denoising step (one UNet call on a batch of 2: unconditional +
conditional, 77 tokens), and with --image seconds per whole image (all steps plus the VAE decode), for both
implementations, interleaved (a, b, a, b, ...) so that both see the same machine state: the median, the spread
(min-max), achieved TFLOP/s for the full-size UNet, peak GPU memory, and the ratio ours / diffusers (<= 1.00: this
package is not slower). Weights: random of the real shapes (or --checkpoint), copied so both compute the same thing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import sd
from sd.io.checkpoint import build_models
from sd.io.diffusers import convert_diffusers
from sd.runtime.compile import compile_or_eager, default_compile_kwargs, inductor_settings
from sd.course import CHECKPOINT_ENV
from sd.pipeline import StableDiffusion
from tests.reference import diffusers_unet, diffusers_vae, randomize, transformers_clip

# One guided UNet step at 512x512 (batch 2, 64x64 latents, 77 tokens), counted with torch's FLOP counter (SD_FACTS).
FLOP_PER_GUIDED_STEP_512 = 1.607e12
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="leading")
PROMPT = "an astronaut riding a horse on the moon"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fns: dict, repeats: int, device) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per call of each candidate, interleaved; and each one's peak GPU memory in GB (0 on CPU)."""
    times, peak = {name: [] for name in fns}, {name: 0.0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 1e9)
    return times, peak


def report(label: str, times, peak, flop: float | None = None, unit: str = "step"):
    med = {k: statistics.median(v) for k, v in times.items()}
    for impl in ("sd", "diffusers"):
        v = times[impl]
        extra = f"  {flop / med[impl] / 1e12:6.2f} TFLOP/s" if flop else ""
        extra += f"  peak {peak[impl]:5.2f} GB" if peak[impl] else ""
        print(f"{label:32s} {impl:9s} {med[impl]:9.4f} s/{unit}  spread {min(v):.4f}-{max(v):.4f}{extra}")
    pairs = [a / b for a, b in zip(times["sd"], times["diffusers"])]
    print(f"{label:32s} ratio sd/diffusers = {med['sd'] / med['diffusers']:.3f}  "
          f"(pairwise {min(pairs):.3f}-{max(pairs):.3f})", flush=True)


def build(name: str, device, dtype, checkpoint: str | None):
    """diffusers and `sd` pipelines holding the same weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    import transformers
    from tests.test_tokenizer import _clip_merges_gz, _write_standard_clip_tokenizer_folder
    import tempfile
    from pathlib import Path
    tiny = name == "tiny"
    cfgs = (sd.UNetConfig.tiny(), sd.VAEConfig.tiny(), sd.CLIPConfig.tiny()) if tiny else \
        (sd.UNetConfig(), sd.VAEConfig(), sd.CLIPConfig())
    if checkpoint:
        from sd.io.safe_read import read_tensors, unwrap_state_dict
        from tests.reference import diffusers_from_single_file
        ref = diffusers_from_single_file(unwrap_state_dict(read_tensors(checkpoint)[0]), *cfgs)
    else:
        ref = {"unet": randomize(diffusers_unet(cfgs[0])), "vae": randomize(diffusers_vae(cfgs[1])),
               "clip": randomize(transformers_clip(cfgs[2]))}
    ours = build_models(convert_diffusers(ref["unet"].state_dict(), ref["vae"].state_dict(), ref["clip"].state_dict()),
                        {"unet": {"heads": cfgs[0].heads}, "clip": {"heads": cfgs[2].heads}})
    for key, m in ours.items():
        m.to(device, torch.float32 if key in ("encoder", "decoder") else dtype).eval().requires_grad_(False)
    folder = _write_standard_clip_tokenizer_folder(_clip_merges_gz(), Path(tempfile.mkdtemp()) / "tokenizer")
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)
    ref_pipe = StableDiffusionPipeline(vae=ref["vae"], text_encoder=ref["clip"], tokenizer=hf_tok, unet=ref["unet"],
                                       scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    ref_pipe.to(device, dtype)
    ref_pipe.set_progress_bar_config(disable=True)
    ours_pipe = StableDiffusion(**ours, tokenizer=sd.CLIPTokenizer(folder), device=device, dtype=dtype)
    return ref_pipe, ours_pipe


def bench(name, args, device, dtype):
    ref, ours = build(name, device, dtype, args.checkpoint if name == "full" else None)
    latent = args.latent or (16 if name == "tiny" else 64 if device.type == "cuda" else 32)
    repeats = args.repeats or (20 if name == "tiny" or device.type == "cuda" else 3)
    d = ours.unet.config.context_dim
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)          # uncond + cond
    ctx = torch.randn(2, 77, d, device=device, dtype=dtype)
    t = torch.tensor(981, device=device)
    flop = FLOP_PER_GUIDED_STEP_512 * (latent / 64) ** 2 if name == "full" else None
    modes = [("eager", ref.unet, ours.unet)]
    if args.compile:
        options = default_compile_kwargs(device)    # the same for both: freezing on a CPU (sd/runtime/compile.py)
        modes.append(("compiled", compile_or_eager(ref.unet, **options), compile_or_eager(ours.unet, **options)))
    with torch.no_grad():
        weights = args.checkpoint if name == "full" and args.checkpoint else "random, same in both"
        print(f"# {name}: weights {weights}; max |sd - diffusers| of one UNet step: "
              f"{(ours.unet(x, ctx, t) - ref.unet(x, t, encoder_hidden_states=ctx).sample).abs().max().item():.2e}")
        for mode, ref_unet, our_unet in modes:
            fns = {"diffusers": lambda: ref_unet(x, t, encoder_hidden_states=ctx).sample,
                   "sd": lambda: our_unet(x, ctx, t)}
            time_calls(fns, 2, device)                     # warm-up (and compilation)
            if any(getattr(unet, "_failed", False) for unet in (ref_unet, our_unet)):
                print(f"# {name} {mode}: compilation failed, these figures are eager")
            report(f"{name} {mode} UNet step, latent {latent}", *time_calls(fns, repeats, device), flop)
    if not args.image or (name == "full" and device.type == "cpu" and not args.image_full_on_cpu):
        return
    size, steps = latent * 8, args.steps
    noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    for mode, compiled in [("eager", False)] + ([("compiled", True)] if args.compile else []):
        settings = default_compile_kwargs(device).get("inductor_config") if compiled else None
        if compiled:
            ref.unet = torch.compile(ref.unet)      # diffusers' pipeline wants its own module type here
            ours.compile_unet()

        def run_diffusers():
            with inductor_settings(settings):       # what compile_unet() does for ours (freezing on a CPU)
                return ref(PROMPT, height=size, width=size, num_inference_steps=steps,
                           latents=noise.to(device, dtype), output_type="pt").images
        fns = {"diffusers": run_diffusers,
               "sd": lambda: ours.generate(PROMPT, height=size, width=size, num_inference_steps=steps,
                                           latents=noise, output_type="pt", progress=False)}
        time_calls(fns, 1, device)
        report(f"{name} {mode} {steps}-step {size}px image", *time_calls(fns, max(1, repeats // 4), device),
               unit="image")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=["tiny", "full"], default=["tiny", "full"])
    p.add_argument("--latent", type=int, default=None,
                   help="latent side (64 = 512x512 images); default 64 on CUDA, 32 (full) / 16 (tiny) on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd UNets")
    p.add_argument("--image", action="store_true", help="also time whole images (all steps + VAE decode)")
    p.add_argument("--image-full-on-cpu", action="store_true", help="whole full-size images on CPU too (slow)")
    p.add_argument("--steps", type=int, default=50, help="steps per image (default 50)")
    p.add_argument("--checkpoint", default=os.environ.get(CHECKPOINT_ENV),
                   help=f"real SD v1.5 single-file weights for the full config (default: ${CHECKPOINT_ENV} if set)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# device {device} ({name}), {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for config in args.configs:
        bench(config, args, device, dtype)


if __name__ == "__main__":
    main()
