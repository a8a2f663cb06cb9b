"""The published size of every classification variant: parameters and GMACs at 224x224 with
1000 classes. Checked against the Flax model (test_crossformer) and the PyTorch reference
(test_torch_reference)."""

PUBLISHED_PARAM_COUNTS = {
    'crossformer_tiny': 27_776_794,
    'crossformer_small': 30_657_394,
    'crossformer_base': 51_971_554,
    'crossformer_large': 91_971_184,
    'crossformer_pp_small': 23_325_340,
    'crossformer_pp_base': 51_994_594,
    'crossformer_pp_large': 92_001_904,
    'crossformer_pp_huge': 95_962_944,
}
PUBLISHED_GMACS = {
    'crossformer_tiny': 2.86,
    'crossformer_small': 4.91,
    'crossformer_base': 9.17,
    'crossformer_large': 16.12,
    'crossformer_pp_small': 4.39,
    'crossformer_pp_base': 9.50,
    'crossformer_pp_large': 16.57,
    'crossformer_pp_huge': 21.59,
}
