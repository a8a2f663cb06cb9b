"""Independent PyTorch implementations of the models, for parity checks and `--verify` (needs the
`torch` extra; nothing else in the package imports them at start-up)."""
