"""Where and how programs run: the device mesh and shardings, the multi-process set-up, and
backend compiler options."""
