"""Adapters: change what a loaded model draws without retraining it (LoRA, textual inversion)."""
