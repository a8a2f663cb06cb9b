"""Verification of converted weights against the PyTorch reference models (needs torch).

`compare_with_torch` runs the reference (crossformer_jax.reference) holding a state dict and the
Flax model holding the converted variables on the same seeded random images, output by output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import torch

from crossformer_jax.models import create_model
from crossformer_jax.models.segmentation import FCNHead, resize_bilinear, segmentation_backbone
from crossformer_jax.reference.crossformer import create_torch_model
from crossformer_jax.reference.segmentation import create_torch_segmentation_model
from crossformer_jax.weights.convert import is_derived_buffer, is_segmentation_name, to_numpy
from crossformer_jax.weights.torch_io import strip_module_prefix

# -------------------------------------------------------------------------------------------------
# Verification against the PyTorch reference.


@dataclasses.dataclass
class Comparison:
    label: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_reference: float

    @classmethod
    def of(cls, label: str, reference: np.ndarray, output: np.ndarray) -> Comparison:
        """The comparison of two arrays of the same shape (RuntimeError naming both otherwise)."""
        if reference.shape != output.shape:
            raise RuntimeError(
                f'{label}: reference shape {reference.shape} != Flax shape {output.shape}'
            )
        return cls(
            label,
            reference.shape,
            float(np.max(np.abs(reference - output))),
            float(np.max(np.abs(reference))),
        )

    @property
    def relative(self) -> float:
        """max|diff| / max|reference|."""
        return self.max_abs_diff / max(self.max_abs_reference, np.finfo(np.float32).tiny)


def compare_with_torch(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None,
    features_only: bool,
    image_size: tuple[int, int] = (224, 224),
    batch_size: int = 1,
    seed: int = 0,
    **overrides,
) -> list[Comparison]:
    """Runs the PyTorch reference (holding `state_dict`, loaded strictly) and the Flax model
    (holding `variables`) on the same seeded random images; returns one Comparison per output
    (the logits, or the four backbone maps compared in NCHW; for segmentation models the logits
    at the input size and, with an auxiliary head, its logits too)."""

    if is_segmentation_name(name):
        return _compare_segmentation_with_torch(
            state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
        )

    kwargs = dict(features_only=features_only, **overrides)
    if not features_only:
        kwargs['num_classes'] = num_classes
    torch_model = create_torch_model(name, **kwargs)
    torch_model.eval()
    # The derived buffers are the reference's own (they depend on the group size only); everything
    # else must come from the checkpoint, strictly.
    _load_torch_reference(torch_model, state_dict)

    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images))
    flax_model = create_model(name, **kwargs)
    outputs = jax.jit(lambda v, x: flax_model.apply(v, x))(variables, images.transpose(0, 2, 3, 1))

    if features_only:
        pairs = [
            (f'stage {s} map', r.numpy(), np.asarray(o).transpose(0, 3, 1, 2))
            for s, (r, o) in enumerate(zip(reference, outputs))
        ]
        if len(reference) != len(outputs):
            raise RuntimeError(f'reference gave {len(reference)} maps, Flax {len(outputs)}')
    else:
        pairs = [('logits', reference.numpy(), np.asarray(outputs))]
    return [Comparison.of(label, ref, out) for label, ref, out in pairs]


def _load_torch_reference(torch_model, state_dict: Mapping[str, Any]) -> None:
    """Loads `state_dict` strictly, the derived buffers (and BatchNorm step counters) excepted:
    those are the reference's own."""
    own = torch_model.state_dict()
    loaded = {}
    for k, v in state_dict.items():
        k = strip_module_prefix(k)
        if not is_derived_buffer(k):
            loaded[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(to_numpy(v))
    loaded.update({k: v for k, v in own.items() if is_derived_buffer(k)})
    torch_model.load_state_dict(loaded, strict=True)


def _compare_segmentation_with_torch(
    state_dict, variables, name, num_classes, image_size, batch_size, seed, overrides
) -> list[Comparison]:

    torch_model = create_torch_segmentation_model(name, num_classes, **overrides)
    _load_torch_reference(torch_model, state_dict)
    height, width = image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        reference = {'logits': torch_model(torch.from_numpy(images)).numpy()}
        if hasattr(torch_model, 'auxiliary_head'):
            reference['auxiliary logits'] = torch_model.auxiliary(torch.from_numpy(images)).numpy()

    model = create_model(name, num_classes, **overrides)
    images_nhwc = images.transpose(0, 2, 3, 1)
    outputs = {'logits': jax.jit(model.apply)(variables, images_nhwc)}
    if 'auxiliary logits' in reference:
        backbone = segmentation_backbone(model)

        @jax.jit
        def auxiliary(variables, images):
            features = backbone.apply({'params': variables['params']['backbone']}, images)
            head = FCNHead(num_classes, model.aux_channels, model.dropout_rate)
            head_variables = {k: v['auxiliary_head'] for k, v in variables.items()}
            logits = head.apply(head_variables, features[2], False)
            return resize_bilinear(logits, images.shape[1:3])

        outputs['auxiliary logits'] = auxiliary(variables, images_nhwc)
    return [
        Comparison.of(label, ref, np.asarray(outputs[label]).transpose(0, 3, 1, 2))
        for label, ref in reference.items()
    ]
