"""The loaded model and its `generate`: prompt (and optionally a picture) -> PIL images.

Text to image: tokens -> CLIP -> context; Gaussian latents -> sampler with classifier-free guidance -> VAE decoder.
Image to image (SDEdit): the VAE encodes the picture, noise takes it part of the way back, the sampler returns.
"""
from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
from PIL import Image
from torch import nn

from .attention import SelfAttention
from .cross_attention import CrossAttention
from .adapters import lora, lora_files, textual_inversion
from .controlnet import ControlledUNet, ControlNet, control_tensor, controlnet_fits, require_control
from .diffusion import DiffusionScheduler
from .flow_scheduler import FlowScheduler
from .mmdit import MMDiT
from .editing import inpaint as inpainting
from .editing import inversion
from .io import controlnet as controlnet_io
from .images import as_rgb_image, pil_to_tensor, signed_to_unit, to_pil
from .runtime.compile import compile_or_eager, default_compile_kwargs
from .runtime.memory import require_memory_for
from .runtime.vae_tiling import decode_tiled
from .samplers import randn, require_sampler
from .validation import (MAX_SEED, nearest_multiples, require_finite_tensor, require_int, require_number,
                         require_prompts, require_scale, require_seed, require_steps, require_strength)

OUTPUT_TYPES = ("pil", "pt")
LARGE_GUIDANCE = 30.0         # beyond the guidance scales people use (SD's default is 7.5)


class StableDiffusion:
    """What `sd.load_checkpoint` returns: the seed's four models plus the tokenizer and the noise scheduler.

    `unet` is the denoiser: SD's UNet (noise prediction, DiffusionScheduler), or a transformer of sd/mmdit.py
    (velocity prediction, FlowScheduler); the scheduler that fits it is picked unless one is given.
    """

    def __init__(self, clip: nn.Module, encoder: nn.Module, decoder: nn.Module, unet: nn.Module,
                 tokenizer=None, scheduler: DiffusionScheduler | FlowScheduler | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.clip, self.encoder, self.decoder, self.unet = clip, encoder, decoder, unet
        self.tokenizer = tokenizer
        self.scheduler = scheduler or (FlowScheduler(unet.config.shift) if isinstance(unet, MMDiT)
                                       else DiffusionScheduler())
        self.device, self.dtype = torch.device(device), dtype
        # memory and speed options, each one flag (see the enable_* methods)
        self.vae_slicing = False
        self.vae_tiling = False
        self.cpu_offload = False
        self.controlnets: list[ControlNet] = []      # pipe.load_controlnet(path); generate(control_image=...)

    # --- memory and speed options --------------------------------------------------------------------------------
    def enable_attention_slicing(self, slice_size: int | None = 1) -> "StableDiffusion":
        """Compute attention `slice_size` heads at a time (None: all at once). Same result, lower peak memory."""
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
        for model in [*self.models().values(), *self.controlnets]:
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

    # --- the denoiser ----------------------------------------------------------------------------------------------
    @property
    def is_flow(self) -> bool:
        """True when the denoiser predicts the flow's velocity (the transformer of sd/mmdit.py)."""
        return isinstance(self.scheduler, FlowScheduler)

    @property
    def default_sampler(self) -> str:
        """The sampler `generate` uses when none is named: DDIM for SD's UNet, Euler for a flow model."""
        return self.scheduler.default_sampler

    def _require_unet(self, what: str) -> None:
        """Features built on SD's UNet and noise schedule refuse a flow transformer in one line."""
        if self.is_flow:
            raise ValueError(f"{what} works with SD's noise-predicting UNet; this model's denoiser is a flow-matching "
                             "transformer (sd/mmdit.py)")

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
            p = self.unet.config.downsample_factor
            denoiser = (f"the transformer cuts the latent into {p}x{p} patches" if self.is_flow else
                        f"the UNet halves the latent {len(self.unet.config.block_channels) - 1} times")
            raise ValueError(f"{name} must be a positive multiple of {m} (the VAE shrinks {self.vae_factor}x and "
                             f"{denoiser}), got {value!r}{hint}")

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
        latents = latents.to(device=self.device, dtype=next(self.decoder.parameters()).dtype)
        decode = (lambda z: decode_tiled(self.decoder, z)) if self.vae_tiling else self.decoder
        with self._on_device(self.decoder):
            chunks = latents.split(1) if self.vae_slicing else [latents]
            image = torch.cat([decode(z).float() for z in chunks])
        return signed_to_unit(image)

    def image_to_tensor(self, init_image, height: int | None = None, width: int | None = None,
                        name: str = "init_image") -> torch.Tensor:
        """An init image (see sd/images.py for the conventions) -> (1, 3, H, W) in [-1, 1], resized to
        (height, width) where given, each side a multiple of `size_multiple`."""
        picture = as_rgb_image(init_image, name)
        w, h = picture.size
        self._check_size(f"{name} width" if width is None else "width", width or w)
        self._check_size(f"{name} height" if height is None else "height", height or h)
        if (width or w, height or h) != (w, h):
            picture = picture.resize((width or w, height or h), Image.LANCZOS)
        return pil_to_tensor(picture)

    # --- one call ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, sampler: str | None = None, seed: int | list[int] | None = None,
                 latents: torch.Tensor | None = None, init_image=None, strength: float = 0.8,
                 num_images: int = 1, eta: float = 0.0, callback: Callable | None = None,
                 progress: bool = True, output_type: str = "pil", mask_image=None, control_image=None,
                 controlnet_conditioning_scale: float | list[float] = 1.0,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0):
        """Text (and optionally an init image) -> a list of PIL images (output_type="pt": a (B, 3, H, W) tensor in [0, 1]).

        sampler: None picks the model's own (`default_sampler`: "ddim" for SD's UNet, "euler" for a flow transformer).
        seed: None (random), one int, or a list of ints, one per image (len(prompts) * num_images of them). With one
        int, image 0 of a batch equals the single run with that seed and the others follow from the same generator;
        with a list, image i equals the single run with seed[i] (as diffusers does with a list of generators).
        init_image: see sd/images.py for the conventions (PIL; (H, W, 3) uint8 in 0..255; float in [0, 1]).
        mask_image (with init_image): inpainting, white = repaint, black = keep (sd/editing/inpaint.py).
        control_image: with ControlNets loaded (load_controlnet), one picture each, e.g. edges in white on black
        (sd.controlnet.canny_control_image); it sets the size unless height/width are given. Each ControlNet's
        residuals are scaled by controlnet_conditioning_scale and act from control_guidance_start to
        control_guidance_end, fractions of the steps (one value, or a list of one per ControlNet).
        """
        sampler = self.default_sampler if sampler is None else sampler
        if control_image is not None:
            self._require_unet("control_image (ControlNet)")
        if mask_image is not None:
            self._require_unet("inpainting (mask_image)")
        if control_image is not None and (init_image is not None or mask_image is not None):
            raise ValueError("control_image works with text to image only, not with init_image or mask_image")
        if mask_image is not None:
            if init_image is None:
                raise ValueError("mask_image needs an init_image: the picture whose white-masked part is repainted")
            unused = [name for name, value in (("latents", latents), ("callback", callback)) if value is not None]
            if unused or eta != 0.0:
                raise ValueError(f"inpainting (mask_image) does not take {', '.join(unused) or 'eta'}: "
                                 f"it starts from the picture and runs its own loop (sd/editing/inpaint.py)")
            return self.inpaint(prompt, init_image, mask_image, negative_prompt, height=height, width=width,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                sampler=sampler, strength=strength, seed=seed, num_images=num_images,
                                progress=progress, output_type=output_type)
        # 1. check every argument before any work
        prompts, negatives = require_prompts(prompt, negative_prompt)
        num_images = require_int(num_images, "num_images", 1)
        num_inference_steps = require_steps(num_inference_steps, self.scheduler.num_train_timesteps)
        sampler = self._require_sampler(sampler, num_inference_steps)
        guidance_scale = require_scale(guidance_scale, "guidance_scale", low=0.0)
        eta = require_number(eta, "eta", low=0.0, high=1.0)
        if eta and sampler != "ddim":
            raise ValueError(f"eta applies to sampler='ddim' only, got eta={eta} with sampler={sampler!r}")
        strength = require_strength(strength)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable (step, timestep, latents), got {type(callback).__name__}")
        control = None if control_image is None else require_control(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
            len(self.controlnets))
        batch = len(prompts) * num_images
        generators = self._generators(seed, batch)

        # 2. sizes: the init image's or the first control image's, else the model's native size
        image = None
        if init_image is not None:
            image = self.image_to_tensor(init_image, height, width)          # (1, 3, H, W) in [-1, 1]
            height, width = image.shape[-2:]
        if control is not None:
            w, h = control.pictures[0].size
            self._check_size("control_image width" if width is None else "width", width or w)
            self._check_size("control_image height" if height is None else "height", height or h)
            height, width = height or h, width or w
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        self._check_size("height", height)
        self._check_size("width", width)
        shape = (batch, self.unet.config.in_channels, height // self.vae_factor, width // self.vae_factor)
        if latents is not None:
            require_finite_tensor(latents, "latents")
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for {batch} images of {height}x{width}, "
                                 f"got {tuple(latents.shape)}")
        require_memory_for(self, batch, height, width)

        # 3. text: (P, 77, D) -> (P * num_images, 77, D), each prompt's images side by side
        context = self.encode_prompt(prompts).repeat_interleave(num_images, dim=0)
        uncond = self.encode_prompt(negatives).repeat_interleave(num_images, dim=0) if guidance_scale > 1 else None

        # 4. image to image: one posterior sample per image, its noise drawn first from that image's generator
        init_latents = None
        if image is not None:
            image = image.to(self.device)
            enc_dtype = next(self.encoder.parameters()).dtype
            with self._on_device(self.encoder):
                mean, _ = self.encoder.posterior(image.to(enc_dtype))       # (1, 4, h, w)
                if shared(generators):     # one posterior sample for the batch, as diffusers draws it
                    enc_noise = randn(mean.shape, generators[0], torch.float32, "cpu").to(self.device, enc_dtype)
                else:                      # one per image, so that image i equals the run with seed[i] alone
                    enc_noise = randn((batch, *mean.shape[1:]), generators, torch.float32, "cpu").to(self.device, enc_dtype)
                    image = image.expand(batch, -1, -1, -1)
                init_latents = self.encoder(image.to(enc_dtype), enc_noise).to(self.dtype).expand(batch, -1, -1, -1)

        # 5. the starting noise, one draw per image
        if latents is None:
            latents = randn(shape, generators, torch.float32, "cpu")   # drawn in float32 on the CPU, then moved
        latents = latents.to(self.device, self.dtype)

        # 6. denoise (with the ControlNets' residuals, if any), then decode
        unet = self.unet
        with ExitStack() as on_device:
            on_device.enter_context(self._on_device(self.unet))
            if control is not None:
                nets = [on_device.enter_context(self._on_device(net)) for net in self.controlnets]
                hints = [control_tensor(p, height, width).to(self.device, self.dtype).expand(batch, -1, -1, -1)
                         for p in control.pictures]                     # each (B, 3, H, W) in [0, 1]
                unet = ControlledUNet(self.unet, nets, hints, control,
                                      self.scheduler.timesteps(num_inference_steps, sampler))
            out = self.scheduler.sample(
                unet, context, shape, num_inference_steps=num_inference_steps, sampler=sampler,
                uncond_context=uncond, guidance_scale=guidance_scale, eta=eta, generator=generators,
                latents=latents, init_latents=init_latents, strength=strength, callback=callback, progress=progress)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"the latents became NaN or infinite while sampling: {self._likely_cause(guidance_scale)}")
        images = self.decode(out)                      # (B, 3, H, W) in [0, 1]
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"the decoded images are NaN or infinite: {self._likely_cause(guidance_scale)}")
        return images if output_type == "pt" else to_pil(images)

    def _require_sampler(self, sampler: str | None, num_inference_steps: int) -> str:
        """The sampler to run: the model's own when None; one that fits the model, within its own step limit."""
        if sampler is None:
            return self.default_sampler
        if self.is_flow:
            return self.scheduler.require_sampler(sampler)
        return require_sampler(sampler, num_inference_steps)              # and its own limit (LCM: 50 steps)

    @staticmethod
    def _generators(seed, batch: int) -> list[torch.Generator]:
        """One CPU generator per image for a list of seeds; one shared generator for a single seed (or None)."""
        if seed is None:
            seed = random.randrange(MAX_SEED + 1)
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if isinstance(seed, (list, tuple)) and len(seeds) != batch:
            raise ValueError(f"seed: {len(seeds)} seeds for {batch} images; give one per image, or one int")
        seeds = [require_seed(s) for s in seeds]
        if None in seeds:
            raise TypeError(f"seed: a list of seeds must hold one integer per image, got {seed!r}")
        if len(seeds) == 1:
            return [torch.Generator("cpu").manual_seed(seeds[0])] * batch     # one shared generator
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    # --- adapters and editing: the logic lives in sd/adapters/ and sd/editing/ ---------------------------------
    def load_lora_weights(self, path, scale: float = 1.0) -> dict[str, int]:
        """Add a LoRA file (diffusers/PEFT or kohya layout) to the UNet and text encoder; returns layers per model."""
        self._require_unet("a LoRA file for SD v1.x")
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

    def load_controlnet(self, path) -> ControlNet:
        """Add a ControlNet: a diffusers ControlNetModel folder or file, or an original ControlNet 1.0/1.1 .pth or
        .safetensors file (sd/io/controlnet.py). Several may be loaded; generate then takes one control image each."""
        self._require_unet("a ControlNet")
        net = controlnet_io.load_controlnet(path, device="cpu" if self.cpu_offload else self.device, dtype=self.dtype)
        why = controlnet_fits(net, self.unet) or (
            f"it takes control images {net.config.hint_factor}x the latent's side, the VAE's factor is "
            f"{self.vae_factor}" if net.config.hint_factor != self.vae_factor else None)
        if why is not None:
            raise ValueError(f"{path}: this ControlNet does not fit the loaded model: {why}")
        self.controlnets.append(net)
        return net

    def unload_controlnets(self) -> None:
        """Remove every loaded ControlNet."""
        self.controlnets.clear()

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Teach the tokenizer and text encoder the word of a textual-inversion file; returns the tokens added."""
        return textual_inversion.load_textual_inversion(self, path, token)

    def invert(self, image, prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 1.0, **kwargs):
        """DDIM inversion: the noise x_T from which generate(prompt, latents=x_T, sampler="ddim") redraws the image."""
        self._require_unet("DDIM inversion")
        return inversion.invert(self, image, prompt, num_inference_steps, guidance_scale, **kwargs)

    def inpaint(self, prompt, init_image, mask_image, negative_prompt="", **kwargs):
        """Repaint the white part of mask_image in init_image (latent blending, sd/editing/inpaint.py)."""
        self._require_unet("inpainting")
        return inpainting.inpaint(self, prompt, init_image, mask_image, negative_prompt, **kwargs)

    def _likely_cause(self, guidance_scale: float) -> str:
        """What most likely made a result non-finite, for the error message."""
        for name, model in self.models().items():
            if any(not torch.isfinite(p).all() for p in model.parameters()):
                return f"the {name} weights contain NaN or infinite values (a damaged checkpoint?)"
        if guidance_scale > LARGE_GUIDANCE:
            return f"guidance_scale {guidance_scale:g} is far larger than the usual 1-{LARGE_GUIDANCE:g}"
        if self.dtype != torch.float32:
            return f"{self.dtype} overflowed; try dtype=torch.float32"
        return "the given latents or settings drove the sampler out of range"


def shared(generators: list[torch.Generator]) -> bool:
    """True when every image draws from one generator (a single seed)."""
    return all(g is generators[0] for g in generators)
