"""Experiment configurations for train.py (one get_config() per file)."""
