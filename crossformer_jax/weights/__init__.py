"""Weights in and out: reading PyTorch checkpoints (`torch_io`), converting them (`convert`),
checking them against the PyTorch reference (`verify`), pretrained directories (`pretrained`),
loading either kind of weights (`loading`) and exporting back to PyTorch (`export`)."""
