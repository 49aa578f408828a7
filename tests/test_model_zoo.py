"""Model code nobody here wrote (tests/model_zoo.py), transformed with random masks on every
linear-like weight: outputs and every parameter's gradient equal FakeSparsity's, bit for bit.

A representative subset; ``python tools/zoo_check.py`` runs the whole zoo. A case fxsparse
gets wrong today is an expected failure naming its issue item, strict: when the fix lands,
the case passes, the xfail fails, and the marker must go.
"""

from __future__ import annotations

import pytest

from model_zoo import ZOO, compare, needs_transformers

SUBSET = [
    ("nanogpt", "eval"),
    ("nanogpt", "train"),
    ("mingpt", "eval"),
    ("mingpt", "train"),
    ("lstm_lm", "train"),
    ("gru_lm", "eval"),
    ("transformer_encoder_padding", "eval"),
    ("transformer_encoder_padding", "train"),
    ("drop_path", "train"),
    ("drop_path", "switch"),
    ("custom_function", "train"),
    ("llama", "train"),
    ("bert_padding", "eval"),
    ("t5", "train"),
    ("qwen2_moe", "eval"),
    ("bloom", "train"),
]


def _case(name: str, mode: str) -> object:
    known = (ZOO[name].known or {}).get(mode)
    marks = [pytest.mark.xfail(strict=True, reason=known)] if known else []
    return pytest.param(name, mode, marks=marks, id=f"{name}-{mode}")


@pytest.mark.parametrize(("name", "mode"), [_case(name, mode) for name, mode in SUBSET])
def test_zoo_model_matches_fake_sparsity_outputs_and_gradients(name: str, mode: str) -> None:
    if needs_transformers(ZOO[name]):
        pytest.importorskip("transformers")
    result = compare(ZOO[name], mode)
    assert result.outputs_equal, f"{name} ({mode}): outputs differ from FakeSparsity by up to {result.outputs:.3g}"
    inlined = ZOO[name].inlined
    if inlined is not None:  # no capture keeps it: a warning must name it, gradients are the forward's
        assert any(warned.endswith(inlined) for warned in result.warned), result.warned
        return
    assert not result.warned, result.warned
    assert result.gradients_equal, (
        f"{name} ({mode}): gradients differ from FakeSparsity by up to {result.gradients:.3g}"
    )
