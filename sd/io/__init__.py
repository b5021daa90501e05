"""Reading and writing checkpoints: safe file reading, model families, configs from shapes, key rules, CompVis files,
diffusers folders, the Hub; `checkpoint.py` holds the entry points `load_checkpoint` and `save_checkpoint`."""
