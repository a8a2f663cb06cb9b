"""Command lines (the top-level scripts are thin fronts that call their `main`)."""
