"""The one training loop (`trainer`), its optimizer and learning-rate schedules, and the
checkpoints of a workdir."""
