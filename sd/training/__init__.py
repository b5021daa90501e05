"""Training Stable Diffusion's three models on the shapes dataset: VAE, then text encoder, then UNet; and SD3's
transformer in miniature with rectified flow."""
from .distributed import close_distributed, init_distributed, rank_and_world
from .interrupt import TrainingInterrupted
from .loop import EMA, TrainOptions, batch_indices, plot_losses, train_loop
from .stage_checkpoint import read_stage
from .presets import PRESETS, Preset, get_preset
from .mmdit import flow_loss, load_mmdit, train_mmdit
from .stages import ALL_STAGES, STAGES, make_dataset, train_all, train_stage
from .text import ContrastivePair, contrastive_loss, learn_tokenizer, load_text_encoder, train_text_encoder
from .unet import CAPTION_DROPOUT, diffusion_loss, drop_captions, load_unet, train_unet
from .vae import VAE, load_vae, psnr, vae_loss, vae_psnr, train_vae
