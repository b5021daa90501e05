"""Reading and writing checkpoints: safe file reading, key rules, CompVis files, diffusers folders, the Hub."""
