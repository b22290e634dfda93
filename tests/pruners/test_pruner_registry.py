"""get_pruner: names, options, and the messages a user sees."""

from __future__ import annotations

import pytest

import pruners
from pruners import PRUNER_NAMES, Pruner, get_pruner


def test_names_and_types():
    assert PRUNER_NAMES == ("magnitude", "wanda", "sparsegpt", "loraprune")
    for name in PRUNER_NAMES:
        pruner = get_pruner(name)
        assert isinstance(pruner, Pruner) and pruner.name == name


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"^--pruner must be one of magnitude, wanda, sparsegpt, loraprune, got 'x'$"):
        get_pruner("x")


def test_sparsegpt_options():
    pruner = get_pruner("sparsegpt", blocksize=64, percdamp=0.05)
    assert pruner.options == {"blocksize": 64, "percdamp": 0.05}
    assert get_pruner("sparsegpt").options == {"blocksize": 128, "percdamp": 0.01}
    assert get_pruner("sparsegpt", blocksize=None).options["blocksize"] == 128  # None means default


def test_options_for_other_pruners_are_ignored():
    assert get_pruner("wanda", blocksize=64, percdamp=0.1).options == {}
    assert get_pruner("magnitude", blocksize=64).options == {}


@pytest.mark.parametrize("name", PRUNER_NAMES)
def test_option_no_pruner_knows_is_rejected(name):
    with pytest.raises(ValueError, match="unknown pruner option.*blocksise"):
        get_pruner(name, blocksise=64)


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"blocksize": 0}, "--blocksize"), ({"blocksize": 2.5}, "--blocksize"), ({"percdamp": 0.0}, "--percdamp"),
     ({"percdamp": -1}, "--percdamp")],
)
def test_bad_sparsegpt_options(options, flag):
    with pytest.raises(ValueError, match=flag):
        get_pruner("sparsegpt", **options)


def test_public_api():
    assert set(pruners.__all__) >= {"get_pruner", "PRUNER_NAMES", "select_keep_mask", "Pruner", "LayerStats"}
