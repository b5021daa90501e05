"""Peak GPU memory of SD v1.5 at 512 x 512 in float16, this package against diffusers (not a test).

    python -m benchmarks.memory             # estimate, on any machine (no GPU, no weights, about 20 s)
    python -m benchmarks.memory --measure   # on a GPU: also measured, with real generate() calls

Without a GPU the figures are estimated: the full-size models are built of fake tensors (shapes and dtypes, no
data: torch's FakeTensorMode) and each stage of `generate` (the text encoder on the prompts, one guided UNet
step, the VAE decode) runs on them while a dispatch mode adds up the bytes of the tensors alive, rounded up to
the CUDA allocator's 512-byte blocks, as `torch.cuda.max_memory_allocated` counts them. Peak = the weights on the GPU +
the largest stage. Attention runs through the flash kernel's shapes where CUDA would use it (float16/bfloat16,
head width a multiple of 8 up to 256), else through the explicit softmax(QK^T)V (an upper bound).
Not counted: the CUDA context and cuBLAS workspace (about 0.3-0.5 GB outside max_memory_allocated), and the
allocator's fragmentation (reserved minus allocated).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sd
from sd.config import LATENT_SCALE
from sd.pipeline import StableDiffusion
from tests.reference import diffusers_unet, diffusers_vae, transformers_clip

BLOCK_BYTES = 512            # the CUDA caching allocator rounds every allocation up to 512 bytes
FLASH_HEAD_DIMS = range(8, 257, 8)
GB = 1e9
TARGETS_GB = {1: 4.0, 8: 15.0}   # issue 6: one image within 4 GB, 8 images within 15 GB
LATENT = 64                  # 512 x 512 images
TOKENS = 77
# The fake tensors live on the CPU: this torch may have no CUDA, and fake CUDA tensors cannot cross devices there.
# The kernels' memory is that of CUDA's: same shapes, same dtypes, attention chosen as CUDA would.
FAKE_DEVICE = "cpu"


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside this mode and still alive; `peak` is the highest seen."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for ref in [ref for ref in self.live if ref.expired()]:   # freed since the last op
            self.now -= self.live.pop(ref)
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new was allocated
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == FAKE_DEVICE:
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.live and ref not in inputs:
                    size = -(-t.untyped_storage().nbytes() // BLOCK_BYTES) * BLOCK_BYTES
                    self.live[ref] = size
                    self.now += size
        self.peak = max(self.peak, self.now)
        return out


class CudaAttentionKernels(TorchFunctionMode):
    """Attention with the memory of the kernel CUDA would pick: flash (no (T, T) score matrix) for float16 and
    bfloat16 with head widths it supports, else the explicit softmax(QK^T)V (an upper bound: CUDA may still find a
    memory-efficient kernel)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None:
            q, k, v = args[:3]
            causal = kwargs.get("is_causal", False)
            if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in FLASH_HEAD_DIMS:
                return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[0]
            return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, causal)[0]
        return func(*args, **kwargs)


def stage_peak(fn) -> int:
    """Peak bytes allocated by `fn()` on top of what was already there."""
    with torch.no_grad(), CudaAttentionKernels(), LiveBytes() as counter:
        fn()
    return counter.peak


def fake_weights(build, dtype) -> torch.nn.Module:
    """`build()` on the meta device (no memory, no init), then every weight as an empty fake tensor."""
    with torch.device("meta"):
        module = build()
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=FAKE_DEVICE),
                                                         requires_grad=False)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, device=FAKE_DEVICE,
                                               dtype=dtype if b.is_floating_point() else b.dtype)
    return module.eval()


def weight_bytes(*models) -> int:
    return sum(t.untyped_storage().nbytes() for m in models for t in list(m.parameters()) + list(m.buffers()))


def guided_inputs(batch: int, dtype):
    """What one guided step of `batch` images sees: 2 x batch latents (uncond + cond), timesteps, CLIP's output,
    token ids (all made here: fake tensors cannot cross devices)."""
    x = torch.randn(2 * batch, 4, LATENT, LATENT, device=FAKE_DEVICE, dtype=dtype)      # (2B, 4, 64, 64)
    t = torch.full((2 * batch,), 981, device=FAKE_DEVICE)     # (2B,): the first of 50 DDIM steps
    context = torch.randn(2 * batch, TOKENS, sd.CLIPConfig().width, device=FAKE_DEVICE, dtype=dtype)  # (2B, 77, 768)
    ids = torch.zeros(2 * batch, TOKENS, dtype=torch.long, device=FAKE_DEVICE)          # (2B, 77)
    return x, t, context, ids


def ours(batch: int, dtype, savers: tuple[str, ...]) -> dict[str, int]:
    unet_cfg, vae_cfg, clip_cfg = sd.UNetConfig(), sd.VAEConfig(), sd.CLIPConfig()
    # as sd.load_checkpoint places them: the VAE in float32
    pipe = StableDiffusion(unet=fake_weights(lambda: sd.DiffusionUNET(unet_cfg), dtype),
                           encoder=fake_weights(lambda: sd.VAE_Encoder(vae_cfg), torch.float32),
                           decoder=fake_weights(lambda: sd.VAE_Decoder(vae_cfg), torch.float32),
                           clip=fake_weights(lambda: sd.CLIP(clip_cfg), dtype),
                           tokenizer=sd.CLIPTokenizer(), device=FAKE_DEVICE, dtype=dtype)
    for saver in savers:
        getattr(pipe, f"enable_{saver}")()
    x, t, context, ids = guided_inputs(batch, dtype)
    pipe.clip._check_tokens = lambda tokens: None     # it reads the ids' values, and fake tensors hold none
    return {"weights": {name: weight_bytes(m) for name, m in pipe.models().items()},
            "text": stage_peak(lambda: pipe.clip(ids).to(dtype)),
            "unet": stage_peak(lambda: pipe.unet(x, context, t)),
            "decode": stage_peak(lambda: pipe.decode(x[:batch]))}


def diffusers(batch: int, dtype, savers: tuple[str, ...]) -> dict[str, int]:
    # StableDiffusionPipeline.to("cuda", float16): the VAE in float16 too
    unet = fake_weights(lambda: diffusers_unet(sd.UNetConfig()), dtype)
    vae = fake_weights(lambda: diffusers_vae(sd.VAEConfig()), dtype)
    clip = fake_weights(lambda: transformers_clip(sd.CLIPConfig()), dtype)
    if "vae_slicing" in savers:
        vae.enable_slicing()
    x, t, context, ids = guided_inputs(batch, dtype)
    return {"weights": {"unet": weight_bytes(unet), "decoder": weight_bytes(vae), "clip": weight_bytes(clip)},
            "text": stage_peak(lambda: clip(ids)),
            "unet": stage_peak(lambda: unet(x, t, encoder_hidden_states=context)),
            "decode": stage_peak(lambda: vae.decode(x[:batch] / LATENT_SCALE))}


def total(parts: dict, offload: bool) -> int:
    """Peak of a whole generate(): every model on the GPU plus the largest stage; with CPU offload, only the
    model of the running stage (the VAE encoder never runs in text-to-image)."""
    w = parts["weights"]
    if offload:
        return max(w["clip"] + parts["text"], w["unet"] + parts["unet"], w["decoder"] + parts["decode"])
    return sum(w.values()) + max(parts["text"], parts["unet"], parts["decode"])


# (images at once, memory savers): the two targets, and what each saver buys
RUNS = [(1, ()), (1, ("attention_slicing",)), (1, ("model_cpu_offload",)), (8, ()), (8, ("vae_slicing",))]


def in_diffusers_too(savers: tuple[str, ...]) -> bool:
    """Runs compared with diffusers: its attention slicing swaps in another attention, and offload needs accelerate."""
    return set(savers) <= {"vae_slicing"}


def label(library: str, savers: tuple[str, ...]) -> str:
    return f"{library} " + ("+ " + ", ".join(savers) if savers else "(defaults)")


def verdict(batch: int, peak: int) -> str:
    return f"<= {TARGETS_GB[batch]:.0f} GB " + ("ok" if peak <= TARGETS_GB[batch] * GB else "OVER")


def estimate(dtype) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    print(f"# {'images':>6s}  {'implementation, options':44s} {'weights':>8s} {'text':>7s} {'unet':>7s} "
          f"{'decode':>7s} {'peak':>7s}  target")
    with FakeTensorMode(allow_non_fake_inputs=True):
        for batch, savers in RUNS:
            rows = [(label("sd", savers), ours(batch, dtype, savers))]
            if in_diffusers_too(savers):
                rows.append((label("diffusers", savers), diffusers(batch, dtype, savers)))
            for name, parts in rows:
                peak = total(parts, "model_cpu_offload" in savers)
                weights = sum(parts["weights"].values())
                print(f"  {batch:6d}  {name:44s} {weights / GB:8.2f} " + " ".join(
                      f"{parts[k] / GB:7.2f}" for k in ("text", "unet", "decode")) +
                      f" {peak / GB:7.2f}  {verdict(batch, peak)}", flush=True)


def measured_peak(run, resident: int) -> int:
    """`resident` bytes of weights on the GPU + the most `run()` allocated on top of what was there."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return resident + torch.cuda.max_memory_allocated() - before


def measure(dtype) -> None:
    """The same runs as real generate() calls (2 steps: the peak is per step) on random full-size weights."""
    from benchmarks.speed import PROMPT, build
    ref, ours = build("full", torch.device("cuda"), dtype, None)
    kw = dict(height=8 * LATENT, width=8 * LATENT, num_inference_steps=2, output_type="pt")
    print(f"# measured on {torch.cuda.get_device_name()}:")
    print(f"# {'images':>6s}  {'implementation, options':44s} {'peak':>7s}  target")
    for batch, savers in RUNS:
        for saver in savers:
            getattr(ours, f"enable_{saver}")()
        resident = 0 if "model_cpu_offload" in savers else weight_bytes(*ours.models().values())
        peak = measured_peak(lambda: ours.generate(PROMPT, num_images=batch, progress=False, **kw), resident)
        print(f"  {batch:6d}  {label('sd', savers):44s} {peak / GB:7.2f}  {verdict(batch, peak)}", flush=True)
        ours.enable_attention_slicing(None).enable_vae_slicing(False).enable_model_cpu_offload(False)
        if not in_diffusers_too(savers):
            continue
        if "vae_slicing" in savers:
            ref.vae.enable_slicing()
        resident = weight_bytes(ref.unet, ref.vae, ref.text_encoder)
        peak = measured_peak(lambda: ref(PROMPT, num_images_per_prompt=batch, **kw), resident)
        print(f"  {batch:6d}  {label('diffusers', savers):44s} {peak / GB:7.2f}  {verdict(batch, peak)}", flush=True)
        ref.vae.disable_slicing()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--measure", action="store_true",
                   help="on a CUDA GPU, also measure the same runs with real generate() calls")
    args = p.parse_args()
    if args.measure and not torch.cuda.is_available():
        p.error("--measure needs a CUDA GPU; without one, the estimate alone is printed (drop --measure)")
    dtype = getattr(torch, args.dtype)
    print(f"# peak GPU memory (max_memory_allocated), SD v1.5 at 512x512, {args.dtype}, torch {torch.__version__}")
    print("# estimated with fake tensors:")
    estimate(dtype)
    if args.measure:
        measure(dtype)


if __name__ == "__main__":
    main()
