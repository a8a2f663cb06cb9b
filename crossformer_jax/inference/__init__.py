"""Predictions of a loaded model on image files, batched and sharded over the devices."""
