"""Stable Diffusion v1.x from scratch: readable PyTorch that gives the reference numbers on real weights."""
from .attention import SelfAttention
from .io.checkpoint import load_checkpoint, save_checkpoint
from .clip import CLIP
from .config import CLIP_MAX_TOKENS, LATENT_SCALE, CLIPConfig, MMDiTConfig, UNetConfig, VAEConfig
from .controlnet import ControlNet
from .cross_attention import CrossAttention
from .decoder import VAE_Decoder
from .diffusion import DiffusionScheduler
from .encoder import VAE_Encoder
from .flow_scheduler import FlowScheduler
from .mmdit import MMDiT
from .pipeline import StableDiffusion
from .tokenizer import CLIPTokenizer
from .unet import DiffusionUNET
