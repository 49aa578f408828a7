"""The SparseGPT solver against a slow reference written from the paper (Frantar & Alistarh, arXiv 2301.00774).

The reference solves one column at a time in float64, with no lazy block update: for each
column ``j`` in order, prune it, ``err = (w - q) / U_jj`` and ``W[:, j+1:] -= err ⊗ U[j, j+1:]``,
where ``U`` is the upper Cholesky factor of the damped ``H⁻¹`` (computed here with
``torch.linalg.inv``, not ``cholesky_inverse``). Unstructured masks are chosen at each block's
first column from ``w² / U_jj²``, lowest ``int(sparsity · block size)`` pruned; ``n:m`` masks at
each group's first column, lowest ``m - n`` per row pruned; ties prune the earlier weight.
"""

from __future__ import annotations

import pytest
import torch

from fxsparse import MaskError
from fxsparse.masks._sparsegpt import hessian_update, prune


def reference_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None,
    blocksize: int,
    percdamp: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mask, reconstructed weight, the smallest relative gap between a pruned and a kept score)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    columns = w.shape[1]
    for j in range(columns):
        if h[j, j] == 0:  # an input that never fired: nothing to reconstruct through it
            h[j, j] = 1
            w[:, j] = 0
    h += percdamp * torch.mean(torch.diagonal(h)) * torch.eye(columns, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    keep = torch.ones(w.shape, dtype=torch.bool)
    margins = [float("inf")]

    def choose(first: int, width: int, pruned_per_row: int | None) -> None:
        scores = w[:, first : first + width] ** 2 / torch.diagonal(u)[first : first + width] ** 2
        if pruned_per_row is None:
            groups = [[(scores[r, c].item(), r * width + c, r, c) for r in range(w.shape[0]) for c in range(width)]]
            count = int(sparsity * scores.numel())
        else:
            groups = [[(scores[r, c].item(), c, r, c) for c in range(width)] for r in range(w.shape[0])]
            count = pruned_per_row
        for group in groups:
            ranked = sorted(group)  # by score, then position: ties prune the earlier weight
            for _, _, r, c in ranked[:count]:
                keep[r, first + c] = False
            if 0 < count < len(ranked) and ranked[count][0] > 0:
                margins.append((ranked[count][0] - ranked[count - 1][0]) / ranked[count][0])

    for j in range(columns):
        if pattern is None and j % blocksize == 0:
            choose(j, min(blocksize, columns - j), None)
        if pattern is not None and j % pattern[1] == 0:
            choose(j, pattern[1], pattern[1] - pattern[0])
        q = w[:, j] * keep[:, j]
        error = (w[:, j] - q) / u[j, j]
        w[:, j + 1 :] -= torch.outer(error, u[j, j + 1 :])
        w[:, j] = q
    return keep, w, min(margins)


def correlated_inputs(rows: int, features: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Calibration rows whose features are mixed (as a layer's activations are), some never firing."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5 + torch.eye(features)
    scale = torch.rand(features, generator=generator) * 3 + 0.1
    inputs = torch.randn(rows, features, generator=generator) @ mixing * scale
    inputs[:, list(dead)] = 0
    return inputs


def hessian_of(inputs: torch.Tensor) -> torch.Tensor:
    return (2 / inputs.shape[0]) * inputs.double().T @ inputs.double()


CASES = {
    # name: (in_features, sparsity, pattern, blocksize, dead inputs)
    "50%-blocks-of-16": (64, 0.5, None, 16, ()),
    "70%-one-block": (64, 0.7, None, 64, (3, 40)),
    "50%-block-not-dividing": (64, 0.5, None, 24, (0, 25, 63)),
    "70%-block-wider-than-weight": (40, 0.7, None, 128, ()),
    "2:4-blocks-of-16": (64, 0.5, (2, 4), 16, (5,)),
    "2:4-one-block": (64, 0.5, (2, 4), 64, ()),
    "2:4-block-not-dividing": (64, 0.5, (2, 4), 24, (8, 9, 10, 11, 30)),
    "1:4-many-dead": (32, 0.5, (1, 4), 8, tuple(range(0, 32, 3))),
}


@pytest.mark.parametrize("case", CASES)
def test_prune_agrees_with_the_column_by_column_reference(case: str) -> None:
    features, sparsity, pattern, blocksize, dead = CASES[case]
    seed = sorted(CASES).index(case)
    weight = torch.randn(48, features, generator=torch.Generator().manual_seed(100 + seed))
    hessian, _ = hessian_update(None, correlated_inputs(4 * features, features, seed, dead), 0)

    mask, reconstructed = prune(weight, hessian, sparsity, pattern=pattern, blocksize=blocksize, percdamp=0.01)
    expected_mask, expected_weight, margin = reference_sparsegpt(weight, hessian, sparsity, pattern, blocksize, 0.01)

    # Float32 round-off moves scores by ~1e-6 of their size: test data whose cut is that close
    # to a tie would test the rounding, not the algorithm.
    assert margin > 1e-4, f"{case}: pick another seed, a score is within {margin:.1e} of the cut"
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected_mask)
    assert reconstructed.dtype == weight.dtype
    torch.testing.assert_close(reconstructed.double(), expected_weight, rtol=0, atol=5e-6 * weight.abs().max().item())
    assert torch.equal(reconstructed[~mask], torch.zeros((~mask).sum().item()))
    assert torch.equal(reconstructed[:, list(dead)], torch.zeros(weight.shape[0], len(dead)))


def test_unstructured_prune_takes_exactly_the_fraction_asked_of_each_block() -> None:
    # The reference implementation's `scores <= sorted[k]` prunes one weight more per block, one even at 0 %.
    weight = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    hessian, _ = hessian_update(None, correlated_inputs(80, 20, seed=1), 0)
    mask, reconstructed = prune(weight, hessian, 0.3, blocksize=8)
    assert [(~mask[:, start : start + 8]).sum().item() for start in (0, 8, 16)] == [19, 19, 9]
    mask, reconstructed = prune(weight, hessian, 0.0, blocksize=8)
    assert mask.all()
    assert torch.equal(reconstructed, weight)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_scores_tied_at_the_cut_prune_the_earlier_weight(pattern: tuple[int, int] | None) -> None:
    # Equal weights and equal [H⁻¹]_jj give exactly equal scores; dead inputs tie at zero.
    weight = torch.randint(1, 4, (6, 24), generator=torch.Generator().manual_seed(6)).float()
    hessian = torch.eye(24)
    hessian[[1, 2, 3, 5, 7, 8, 9, 11, 13, 17], [1, 2, 3, 5, 7, 8, 9, 11, 13, 17]] = 0
    mask, _ = prune(weight, hessian, 0.3, pattern=pattern, blocksize=8)
    expected_mask, _, _ = reference_sparsegpt(weight, hessian, 0.3, pattern, 8, 0.01)
    assert torch.equal(mask, expected_mask)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_prune_reconstructs_outputs_better_than_magnitude_pruning(pattern: tuple[int, int] | None) -> None:
    inputs = correlated_inputs(512, 64, seed=7)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    hessian, _ = hessian_update(None, inputs, 0)
    mask, reconstructed = prune(weight, hessian, 0.5, pattern=pattern, blocksize=32)

    # Magnitude at the same sparsity: lowest |w| of the whole weight, or the lowest 2 of every 4 in a row.
    if pattern is None:
        magnitude = torch.ones(weight.numel(), dtype=torch.bool)
        magnitude[weight.abs().flatten().argsort()[: weight.numel() // 2]] = False
        magnitude = magnitude.view_as(weight)
    else:
        groups = weight.abs().view(32, 16, 4)
        magnitude = torch.ones_like(groups, dtype=torch.bool).scatter_(2, groups.argsort(dim=2)[..., :2], False)
        magnitude = magnitude.view_as(weight)
    assert (~mask).sum() == (~magnitude).sum()

    def output_error(pruned: torch.Tensor) -> float:
        return torch.linalg.norm(inputs @ weight.T - inputs @ pruned.T).item()

    assert output_error(reconstructed) < 0.8 * output_error(weight * magnitude)


def test_prune_changes_neither_weight_nor_hessian() -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    hessian, _ = hessian_update(None, correlated_inputs(64, 32, seed=3, dead=(1, 2)), 0)
    transposed_view = weight.T.contiguous().T  # prune works on a transposed copy: never on this one's storage
    weight_before, hessian_before = weight.clone(), hessian.clone()
    for given in (weight, transposed_view):
        prune(given, hessian, 0.5, blocksize=8)
        prune(given, hessian, pattern=(2, 4), blocksize=8)
        assert torch.equal(given, weight_before)
    assert torch.equal(hessian, hessian_before)


def test_prune_of_a_bfloat16_weight_works_in_float32_and_returns_bfloat16() -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    hessian, _ = hessian_update(None, correlated_inputs(128, 32, seed=4).bfloat16(), 0)
    assert hessian.dtype == torch.float32
    for pattern in (None, (2, 4)):
        mask, reconstructed = prune(weight, hessian, 0.5, pattern=pattern, blocksize=16)
        expected_mask, expected_weight = prune(weight.float(), hessian, 0.5, pattern=pattern, blocksize=16)
        assert reconstructed.dtype == torch.bfloat16
        assert torch.equal(mask, expected_mask)
        assert torch.equal(reconstructed, expected_weight.bfloat16())


def test_hessian_update_is_the_mean_over_every_row_of_every_batch() -> None:
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randn(shape, generator=generator) for shape in ((2, 5, 8), (7, 8), (3, 1, 1, 8), (0, 8))]
    batches.append(torch.randn(4, 8, generator=generator).bfloat16())
    hessian, seen = None, 0
    for batch in batches:
        previous = None if hessian is None else hessian.clone()
        new_hessian, seen = hessian_update(hessian, batch, seen)
        if hessian is not None:
            assert torch.equal(hessian, previous)  # the running Hessian given is not changed
        hessian = new_hessian
    rows = torch.cat([batch.double().reshape(-1, 8) for batch in batches])
    assert seen == 10 + 7 + 3 + 0 + 4 == rows.shape[0]
    assert hessian is not None and hessian.dtype == torch.float32
    torch.testing.assert_close(hessian.double(), hessian_of(rows), rtol=1e-5, atol=1e-5)


def test_prune_refuses_a_hessian_not_positive_definite_even_after_damping() -> None:
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with pytest.raises(MaskError, match=r"not positive definite even after damping.*more tokens.*larger percdamp"):
        prune(torch.ones(3, 2), indefinite, 0.5)
    mask, _ = prune(torch.ones(3, 2), indefinite, 0.5, percdamp=2.0)  # 2 · mean(diag) = 2 lifts -1 to 1
    assert (~mask).sum() == 3


GOOD_WEIGHT, GOOD_HESSIAN = torch.randn(4, 8), torch.eye(8)
BAD_ARGUMENTS = {
    "sparsity-one": ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\), got 1.0"),
    "sparsity-negative": ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\), got -0.1"),
    "sparsity-nan": ({"sparsity": float("nan")}, r"sparsity must be a number in \[0, 1\), got nan"),
    "pattern-n-equals-m": ({"pattern": (4, 4)}, r"pattern must be \(n, m\).*0 <= n < m.*got \(4, 4\)"),
    "pattern-n-above-m": ({"pattern": (3, 2)}, r"pattern must be \(n, m\).*got \(3, 2\)"),
    "pattern-a-string": ({"pattern": "2:4"}, r"pattern must be \(n, m\).*got '2:4'"),
    "pattern-not-dividing-inputs": ({"pattern": (2, 3)}, r"2:3 pattern needs in_features to be a multiple of 3"),
    "pattern-not-dividing-blocksize": (
        {"pattern": (2, 4), "blocksize": 6},
        r"2:4 pattern needs blocksize to be a multiple of 4, got 6",
    ),
    "blocksize-zero": ({"blocksize": 0}, r"blocksize must be a whole number >= 1, got 0"),
    "percdamp-negative": ({"percdamp": -0.01}, r"percdamp must be a finite number >= 0, got -0.01"),
    "hessian-wrong-shape": ({"hessian": torch.eye(4)}, r"8 inputs must have shape \(8, 8\), got shape \(4, 4\)"),
    "hessian-of-ints": ({"hessian": torch.eye(8, dtype=torch.int64)}, r"Hessian must be a floating-point tensor"),
    "hessian-nan": ({"hessian": torch.full((8, 8), float("nan"))}, r"Hessian has NaN or infinite values"),
    "weight-1d": ({"weight": torch.randn(8)}, r"\[out_features, in_features\] weight, got .*shape \(8,\)"),
    "weight-3d": ({"weight": torch.randn(2, 4, 8)}, r"\[out_features, in_features\] weight, got .*shape \(2, 4, 8\)"),
    "weight-inf": ({"weight": torch.full((4, 8), float("inf"))}, r"weight to prune has NaN or infinite values"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_prune_refuses_bad_arguments_saying_what_was_expected(case: str) -> None:
    changes, message = BAD_ARGUMENTS[case]
    arguments = {"weight": GOOD_WEIGHT, "hessian": GOOD_HESSIAN, **changes}
    with pytest.raises(MaskError, match=message):
        prune(**arguments)


def test_hessian_update_refuses_mismatched_or_non_float_inputs() -> None:
    hessian, seen = hessian_update(None, torch.randn(3, 8), 0)
    with pytest.raises(MaskError, match=r"must be float32 of shape \(4, 4\) for inputs with 4 features"):
        hessian_update(hessian, torch.randn(3, 4), seen)
    with pytest.raises(MaskError, match=r"floating-point tensor \[..., in_features\], got a torch.int64"):
        hessian_update(None, torch.ones(3, 8, dtype=torch.int64), 0)
    with pytest.raises(MaskError, match=r"starts from seen=0, got seen=3"):
        hessian_update(None, torch.randn(3, 8), 3)
