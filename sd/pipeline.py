"""The loaded model and its `generate`: prompt (and optionally a picture) -> PIL images.

Text to image: tokens -> CLIP -> context; Gaussian latents -> sampler with classifier-free guidance -> VAE decoder.
Image to image (SDEdit): the VAE encodes the picture, noise takes it part of the way back, the sampler returns.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from torch import nn

from .adapters import lora, lora_files, textual_inversion
from .validation import nearest_multiples
from .diffusion import DiffusionScheduler


class StableDiffusion:
    """What `sd.load_checkpoint` returns: the seed's four models plus the tokenizer and the noise scheduler."""

    def __init__(self, clip: nn.Module, encoder: nn.Module, decoder: nn.Module, unet: nn.Module,
                 tokenizer=None, scheduler: DiffusionScheduler | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.clip, self.encoder, self.decoder, self.unet = clip, encoder, decoder, unet
        self.tokenizer = tokenizer
        self.scheduler = scheduler or DiffusionScheduler()
        self.device, self.dtype = torch.device(device), dtype
        # memory and speed options, each one flag (see the enable_* methods)
        self.vae_slicing = False
        self.vae_tiling = False
        self.cpu_offload = False

    # --- memory and speed options --------------------------------------------------------------------------------
    def enable_attention_slicing(self, slice_size: int | None = 1) -> "StableDiffusion":
        """Compute attention `slice_size` heads at a time (None: all at once). Same result, lower peak memory."""
        from .attention import SelfAttention
        from .cross_attention import CrossAttention
        for model in (self.unet, self.clip, self.encoder, self.decoder):
            for m in model.modules():
                if isinstance(m, (SelfAttention, CrossAttention)):
                    m.slice_size = slice_size
        return self

    def enable_vae_slicing(self, on: bool = True) -> "StableDiffusion":
        """Decode a batch one image at a time."""
        self.vae_slicing = on
        return self

    def enable_vae_tiling(self, on: bool = True) -> "StableDiffusion":
        """Decode large latents in overlapping 512-pixel tiles (see sd/runtime/vae_tiling.py)."""
        self.vae_tiling = on
        return self

    def enable_model_cpu_offload(self, on: bool = True) -> "StableDiffusion":
        """Keep the models in CPU memory and move each to the GPU only while it runs."""
        self.cpu_offload = on
        for model in self.models().values():
            model.to("cpu" if on else self.device)
        return self

    def enable_channels_last(self) -> "StableDiffusion":
        """NHWC memory layout for the convolutions: faster on recent GPUs (tensor cores), same result."""
        self.unet.to(memory_format=torch.channels_last)
        self.decoder.to(memory_format=torch.channels_last)
        return self

    def compile_unet(self, **compile_kwargs) -> "StableDiffusion":
        """torch.compile the UNet (on a CPU with weight freezing, see sd/runtime/compile.py; other `torch.compile`
        arguments replace that default); falls back to eager (with a warning) where compilation is not available."""
        from .runtime.compile import compile_or_eager, default_compile_kwargs
        self.unet = compile_or_eager(self.unet, **(compile_kwargs or default_compile_kwargs(self.device)))
        return self

    @contextmanager
    def _on_device(self, model: nn.Module):
        """With CPU offload, the model visits the GPU only for the duration of the block."""
        if self.cpu_offload:
            model.to(self.device)
        try:
            yield model
        finally:
            if self.cpu_offload:
                model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def models(self) -> dict[str, nn.Module]:
        return {"clip": self.clip, "encoder": self.encoder, "decoder": self.decoder, "unet": self.unet}

    # --- sizes ---------------------------------------------------------------------------------------------------
    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel, per side: 8 for SD v1."""
        return self.decoder.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's (8 x 8 = 64 for SD v1)."""
        return self.vae_factor * self.unet.config.downsample_factor

    @property
    def native_size(self) -> int:
        """The image size the model was trained at: 512 for SD v1.5."""
        return self.unet.config.sample_size * self.vae_factor

    def _check_size(self, name: str, value: int) -> None:
        m = self.size_multiple
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m:
            hint = f"; the nearest sizes that work are {nearest_multiples(value, m)}" if isinstance(value, int) and value > 0 else ""
            raise ValueError(f"{name} must be a positive multiple of {m} (the VAE shrinks {self.vae_factor}x and "
                             f"the UNet halves the latent {len(self.unet.config.block_channels) - 1} "
                             f"times), got {value!r}{hint}")

    # --- the pieces ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> CLIP's last hidden state (B, 77, D), in the pipeline's dtype."""
        tokens = self.tokenizer(prompts).to(self.device)      # (B, 77)
        with self._on_device(self.clip):
            return self.clip(tokens).to(self.dtype)            # (B, 77, D)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]; decoded in float32 (the fp16 VAE can overflow to NaN)."""
        from .runtime.vae_tiling import decode_tiled
        latents = latents.to(device=self.device, dtype=next(self.decoder.parameters()).dtype)
        decode = (lambda z: decode_tiled(self.decoder, z)) if self.vae_tiling else self.decoder
        with self._on_device(self.decoder):
            chunks = latents.split(1) if self.vae_slicing else [latents]
            image = torch.cat([decode(z).float() for z in chunks])
        return (image / 2 + 0.5).clamp(0, 1)

    def image_to_tensor(self, image, height: int | None, width: int | None) -> torch.Tensor:
        """A PIL image or an (H, W, 3) array -> (1, 3, H, W) in [-1, 1], resized to (height, width) if given."""
        from PIL import Image
        if isinstance(image, np.ndarray):
            arr = image
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.max() <= 1.0 else arr.astype(np.uint8)
            image = Image.fromarray(arr)
        if not isinstance(image, Image.Image):
            raise ValueError(f"init_image must be a PIL image or an (H, W, 3) array, got {type(image).__name__}")
        image = image.convert("RGB")
        w, h = image.size
        target = (width or w, height or h)
        self._check_size("init_image width" if width is None else "width", target[0])
        self._check_size("init_image height" if height is None else "height", target[1])
        if target != (w, h):
            image = image.resize(target, Image.LANCZOS)
        arr = np.asarray(image, dtype=np.float32) / 255.0             # (H, W, 3) in [0, 1]
        return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]

    # --- one call ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, sampler: str = "ddim", seed: int | None = None,
                 latents: torch.Tensor | None = None, init_image=None, strength: float = 0.8,
                 num_images: int = 1, eta: float = 0.0, callback: Callable | None = None,
                 progress: bool = True, output_type: str = "pil"):
        """Text (and optionally an init image) -> a list of PIL images (output_type="pt": a (B, 3, H, W) tensor in [0, 1])."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one each, or one string")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if seed is None:
            seed = random.randrange(2 ** 63)
        generator = torch.Generator("cpu").manual_seed(seed)

        # (P, 77, D) -> (P * num_images, 77, D): each prompt's images side by side
        context = self.encode_prompt(prompts).repeat_interleave(num_images, dim=0)
        uncond = self.encode_prompt(negatives).repeat_interleave(num_images, dim=0) if guidance_scale > 1 else None
        batch = context.shape[0]

        init_latents = None
        if init_image is not None:
            image = self.image_to_tensor(init_image, height, width).to(self.device)
            height, width = image.shape[-2:]
            enc_dtype = next(self.encoder.parameters()).dtype
            with self._on_device(self.encoder):
                mean, _ = self.encoder.posterior(image.to(enc_dtype))
                # one posterior sample, its noise drawn first from the generator, shared by the batch (as diffusers)
                enc_noise = torch.randn(mean.shape, generator=generator).to(self.device, enc_dtype)
                init_latents = self.encoder(image.to(enc_dtype), enc_noise).to(self.dtype).expand(batch, -1, -1, -1)
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        self._check_size("height", height)
        self._check_size("width", width)
        shape = (batch, self.unet.config.in_channels, height // self.vae_factor, width // self.vae_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for {batch} images of {height}x{width}, "
                                 f"got {tuple(latents.shape)}")
            latents = latents.to(self.device, self.dtype)
        else:
            latents = torch.randn(shape, generator=generator).to(self.device, self.dtype)

        with self._on_device(self.unet):
            out = self.scheduler.sample(
                self.unet, context, shape, num_inference_steps=num_inference_steps, sampler=sampler,
                uncond_context=uncond, guidance_scale=guidance_scale, eta=eta, generator=generator, latents=latents,
                init_latents=init_latents, strength=strength, callback=callback, progress=progress)
        images = self.decode(out)                      # (B, 3, H, W) in [0, 1]
        return images if output_type == "pt" else to_pil(images)

    # --- adapters and editing: the logic lives in sd/adapters/ and sd/editing/ ---------------------------------
    def load_lora_weights(self, path, scale: float = 1.0) -> dict[str, int]:
        """Add a LoRA file (diffusers/PEFT or kohya layout) to the UNet and text encoder; returns layers per model."""
        return lora_files.load_lora_weights(self, path, scale)

    def save_lora_weights(self, path):
        """Write the LoRAs of the UNet and text encoder to a .safetensors file."""
        return lora_files.save_lora_weights(self, path)

    def fuse_lora(self) -> None:
        """Fold every LoRA into its layer's weights (faster sampling; the LoRA can no longer be removed)."""
        lora.fuse_lora(self.unet)
        lora.fuse_lora(self.clip)

    def unload_lora_weights(self) -> None:
        """Remove every (unfused) LoRA: the original layers come back."""
        lora.unload_lora(self.unet)
        lora.unload_lora(self.clip)

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Teach the tokenizer and text encoder the word of a textual-inversion file; returns the tokens added."""
        return textual_inversion.load_textual_inversion(self, path, token)

    def invert(self, image, prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 1.0, **kwargs):
        """DDIM inversion: the noise x_T from which generate(prompt, latents=x_T, sampler="ddim") redraws the image."""
        from .editing.inversion import invert
        return invert(self, image, prompt, num_inference_steps, guidance_scale, **kwargs)

    def inpaint(self, prompt, init_image, mask_image, negative_prompt="", **kwargs):
        """Repaint the white part of mask_image in init_image (latent blending, sd/editing/inpaint.py)."""
        from .editing.inpaint import inpaint
        return inpaint(self, prompt, init_image, mask_image, negative_prompt, **kwargs)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded to 8 bits as diffusers does."""
    from PIL import Image
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
