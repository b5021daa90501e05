"""Editing with a loaded model: inpainting, DDIM inversion, interpolation, guidance by a loss."""
