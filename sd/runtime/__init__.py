"""Where and how the models run: device and number format, memory savers, torch.compile, VAE tiling."""
from .device import DTYPES, Runtime, detect_runtime, resolve_device, savers_for
from .settings import env_choice, env_flag, env_float, env_int, env_path
