"""The argparse pieces every command shares: a parser whose errors are one line, and the argument types.

Each type turns bad text into one line that says what was expected (argparse prefixes the option's name and
exits with code 2), before any model is loaded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

# What the command line can run. SD v1.5 was trained at 512 x 512; at 2048 x 2048 the latent is 256 x 256, its
# top-level self-attention relates 65,536 positions to each other (4.3e9 pairs per head), and one activation of
# the VAE decoder's last level (128 channels at full size, float32) alone takes 2 GiB. Beyond that, memory runs out.
MAX_SIDE = 2048
# The images of one call are denoised as one batch (twice as large with guidance), so memory grows with the count.
MAX_NUM_IMAGES = 64
# torch.Generator.manual_seed takes the integers 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block), exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, else one clear line."""
    value = _integer(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_int_up_to(maximum: int, reason: str):
    """An argparse type: an integer from 1 to `maximum`; the error says why the cap is there."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value is None or not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {maximum} ({reason}), got {text!r}")
        return value
    return parse


image_side = positive_int_up_to(MAX_SIDE, "larger images do not fit in memory")
image_count = positive_int_up_to(MAX_NUM_IMAGES, "the images are denoised as one batch")


def positive_float(text: str) -> float:
    """argparse type: a number > 0, else one clear line."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def random_seed(text: str) -> int:
    """argparse type: a random seed, an integer from 0 to 2**64 - 1 (what torch's generators take)."""
    value = _integer(text)
    if value is None or not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer seed from 0 to 2**64-1 ({MAX_SEED}), got {text!r}")
    return value


def writable_extensions() -> list[str]:
    """The file extensions PIL can save an image as (.png, .jpg, .webp, ...)."""
    return sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


def image_path(text: str) -> Path:
    """argparse type: where an image can be saved: a file name with an image extension, in a folder we may write.

    Checked before anything is generated, so a typo does not cost a whole run.
    """
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name, e.g. {str(path / 'image.png')!r}")
    if not path.suffix:
        raise argparse.ArgumentTypeError(f"{text!r} has no extension; give an image file name, e.g. '{text}.png'")
    if path.suffix.lower() not in writable_extensions():
        raise argparse.ArgumentTypeError(f"{text!r}: {path.suffix!r} is not an image format PIL can write; "
                                         "use .png, .jpg or .webp (or another of PIL's formats)")
    folder = path.parent
    while not folder.exists():             # the folders that do not exist yet are made when saving
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {str(folder)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {str(folder)!r} ({e.strerror})") from None
    return path


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps (default: cuda if available, else mps on Apple Silicon, else cpu)")
