"""Object detection machinery in plain JAX, shared by the detectors of crossformer_jax.models:
anchors, box coding and IoU, anchor assignment, losses, the on-device post-processing (fixed
output shapes: top-k per level, batched NMS), RoIAlign over the feature pyramid, and the two-stage
detectors' proposals, samplers and losses."""
