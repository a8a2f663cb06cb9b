"""Fast checks of the PyTorch reference model: published counts, names, shapes, errors."""

import subprocess
import sys

import pytest
import torch
from published_figures import PUBLISHED_PARAM_COUNTS

from crossformer_jax.models.crossformer import VARIANTS
from crossformer_jax.reference.crossformer import (
    create_torch_model,
    randomize_parameters,
    relative_offsets,
    relative_position_index,
)

TINY = dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8))
MODELS = ['crossformer_small', 'crossformer_pp_small']


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    """Tiny models gain nothing from threads, and oversubscribed OpenMP pools stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_model(name, **kwargs):
    with torch.device('meta'):
        return create_torch_model(name, **kwargs)


def tiny_model(name, seed=0, **kwargs):
    return randomize_parameters(create_torch_model(name, num_classes=10, **TINY, **kwargs), seed)


def images(height, width, batch=2):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_registry_matches_published_table():
    assert sorted(VARIANTS) == sorted(PUBLISHED_PARAM_COUNTS)


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAM_COUNTS))
def test_parameter_count_matches_published(name):
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAM_COUNTS[name]


def test_v1_state_dict_has_derived_buffers_at_224():
    state = meta_model('crossformer_tiny').state_dict()
    for s, depth in enumerate(VARIANTS['crossformer_tiny']['depths']):
        for j in range(depth):
            prefix = f'layers.{s}.blocks.{j}.attn.'
            assert state[prefix + 'biases'].shape == (13 * 13, 2)
            assert state[prefix + 'relative_position_index'].shape == (49, 49)
            assert state[prefix + 'relative_position_index'].dtype == torch.int64
    assert not any('ex_conv' in key or 'ex_ln' in key for key in state)

    offsets = relative_offsets(7, 7)
    assert offsets[0].tolist() == [-6.0, -6.0] and offsets[1].tolist() == [-6.0, -5.0]
    index = relative_position_index(7, 7)
    assert index[0, 0] == index[48, 48] == 6 * 13 + 6
    assert offsets[index[8, 0]].tolist() == [1.0, 1.0]  # query (1, 1), key (0, 0)


def test_pp_state_dict_has_no_buffers_and_acl_every_third_block():
    state = meta_model('crossformer_pp_huge').state_dict()
    assert not any(key.endswith(('attn.biases', 'relative_position_index')) for key in state)
    cooled = {
        tuple(int(n) for n in key.split('.')[1:4:2])
        for key in state
        if key.endswith('ex_conv.weight')
    }
    # depths 6, 6, 18, 2: block j cools when (j + 1) % 3 == 0, never the last block of a stage.
    assert cooled == {(0, 2), (1, 2), *((2, j) for j in (2, 5, 8, 11, 14))}
    assert state['layers.2.blocks.2.ex_conv.weight'].shape == (512, 1, 3, 3)
    assert state['layers.2.blocks.2.ex_ln.weight'].shape == (512,)


def test_state_dict_names():
    state = meta_model('crossformer_pp_small').state_dict()
    expected = {
        'patch_embed.projs.3.weight': (8, 3, 32, 32),
        'patch_embed.norm.weight': (64,),
        'layers.0.blocks.1.attn.qkv.weight': (192, 64),
        'layers.0.blocks.1.attn.proj.bias': (64,),
        'layers.0.blocks.1.attn.pos.pos_proj.weight': (4, 2),
        'layers.0.blocks.1.attn.pos.pos1.0.weight': (4,),
        'layers.0.blocks.1.attn.pos.pos3.2.weight': (2, 4),
        'layers.0.blocks.1.mlp.fc1.weight': (256, 64),
        'layers.0.blocks.1.norm2.bias': (64,),
        'layers.2.downsample.norm.weight': (256,),
        'layers.2.downsample.reductions.1.weight': (256, 256, 4, 4),
        'norm.weight': (512,),
        'head.weight': (1000, 512),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    assert 'layers.3.downsample.norm.weight' not in state

    backbone = meta_model('crossformer_pp_small', features_only=True).state_dict()
    assert set(state) - set(backbone) == {'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('height, width', [(224, 224), (256, 320)])
def test_output_shapes(name, height, width):
    x = images(height, width)
    with torch.inference_mode():
        logits = tiny_model(name)(x)
        features = tiny_model(name, features_only=True)(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert [tuple(f.shape) for f in features] == [
        (2, 32 * 2**s, height // 2 ** (s + 2), width // 2 ** (s + 2)) for s in range(4)
    ]


def test_forward_ignores_stored_buffers():
    model = tiny_model('crossformer_small')
    x = images(224, 224, batch=1)
    with torch.inference_mode():
        before = model(x)
        for _name, buffer in model.named_buffers():
            buffer.zero_()
        assert torch.equal(model(x), before)


def test_randomize_parameters_is_deterministic_and_moves_everything():
    initial = create_torch_model('crossformer_pp_small', num_classes=10, **TINY)
    fresh = {k: v.clone() for k, v in initial.state_dict().items()}
    first = randomize_parameters(initial, seed=3).state_dict()
    second = tiny_model('crossformer_pp_small', seed=3).state_dict()
    other = tiny_model('crossformer_pp_small', seed=4).state_dict()
    for name, _ in initial.named_parameters():
        assert torch.equal(first[name], second[name]), name
        assert not torch.equal(first[name], fresh[name]), name
        assert not torch.equal(first[name], other[name]), name


def test_drop_path_only_in_training():
    model = tiny_model('crossformer_pp_small', drop_path_rate=0.5)
    x = images(224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    'shape, message',
    [
        ((3, 224, 224), '(N, 3, H, W)'),
        ((1, 1, 224, 224), '(N, 3, H, W)'),
        ((1, 224, 224, 3), '(N, 3, H, W)'),
        ((1, 3, 224, 200), 'multiples of 32'),
        ((1, 3, 0, 224), 'multiples of 32'),
    ],
)
def test_invalid_images_raise(shape, message):
    model = tiny_model('crossformer_small')
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        model(torch.zeros(shape))


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match='unknown model'):
        create_torch_model('crossformer_giant')


def test_package_import_does_not_import_torch():
    code = "import sys, crossformer_jax; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, '-c', code], check=True)
