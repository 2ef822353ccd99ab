"""Low-rank factors: Eckart-Young optimality, activation-aware gains, fallbacks and validation."""

from __future__ import annotations

import warnings

import pytest
import torch

from ffsplit.compress.lowrank import (
    output_error,
    svd_factors,
    whitened_svd,
    whitened_svd_factors,
)
from ffsplit.errors import FFSplitError


def anisotropic_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs whose directions span two decades of scale, like LLM hidden states."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    mixing = mixing * torch.logspace(0, -2, features)[None, :]
    return torch.randn(tokens, features, generator=generator) @ mixing.T


def random_weight(out: int, inp: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_svd_factors_is_the_best_rank_r_approximation(shape: tuple[int, int]) -> None:
    weight = random_weight(*shape)
    singular = torch.linalg.svdvals(weight.double())
    for rank in (1, 5, min(shape) - 1):
        a, b = svd_factors(weight, rank)
        assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
        assert a.dtype == b.dtype == torch.float32
        error = torch.linalg.matrix_norm(weight.double() - a.double() @ b.double())
        # Eckart-Young: the Frobenius error is the norm of the dropped singular values.
        assert error.item() == pytest.approx(singular[rank:].norm().item(), rel=1e-5)


def test_svd_factors_split_singular_values_evenly() -> None:
    weight = random_weight(20, 30)
    a, b = svd_factors(weight, 6)
    # sqrt(S) on both sides: column i of a and row i of b both have norm sqrt(s_i).
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_svd_factors_full_rank_reconstructs() -> None:
    weight = random_weight(16, 12)
    a, b = svd_factors(weight, 12)
    torch.testing.assert_close(a @ b, weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 13, 2.0, True])
def test_rank_out_of_range_is_an_error(rank: object) -> None:
    weight = random_weight(16, 12)
    with pytest.raises(FFSplitError, match="rank"):
        svd_factors(weight, rank)  # type: ignore[arg-type]
    gram = torch.eye(12)
    with pytest.raises(FFSplitError, match="rank"):
        whitened_svd_factors(weight, rank, gram, 10)  # type: ignore[arg-type]


def test_bad_weight_is_an_error() -> None:
    with pytest.raises(FFSplitError, match="2-D"):
        svd_factors(torch.ones(3, 4, 5), 1)
    with pytest.raises(FFSplitError, match="NaN"):
        svd_factors(torch.tensor([[1.0, float("nan")]]), 1)


@pytest.mark.parametrize("rank", [2, 8, 16])
def test_whitened_beats_plain_svd_on_anisotropic_inputs(rank: int) -> None:
    inputs = anisotropic_inputs(tokens=1500, features=48)
    weight = random_weight(32, 48)
    gram = inputs.double().T @ inputs.double()
    plain_a, plain_b = svd_factors(weight, rank)
    white_a, white_b = whitened_svd_factors(weight, rank, gram, tokens=inputs.shape[0])

    def error_on_inputs(a: torch.Tensor, b: torch.Tensor) -> float:
        residual = inputs.double() @ (weight.double() - a.double() @ b.double()).T
        return residual.pow(2).sum().item()

    plain_error = error_on_inputs(plain_a, plain_b)
    white_error = error_on_inputs(white_a, white_b)
    assert white_error < 0.8 * plain_error
    # The Gram-only error formula agrees with the error measured on the inputs themselves.
    assert output_error(weight, white_a, white_b, gram) == pytest.approx(white_error, rel=1e-6)


@pytest.mark.parametrize("shape", [(20, 32), (32, 20)])
def test_whitened_full_rank_reconstructs(shape: tuple[int, int]) -> None:
    inputs = anisotropic_inputs(tokens=400, features=shape[1])
    weight = random_weight(*shape)
    gram = inputs.double().T @ inputs.double()
    a, b = whitened_svd_factors(weight, min(shape), gram, tokens=400)
    torch.testing.assert_close(a @ b, weight, rtol=1e-4, atol=1e-4)


def test_whitened_handles_rank_deficient_gram() -> None:
    # Fewer tokens than features: the Gram is singular, only damping makes it factorable.
    inputs = anisotropic_inputs(tokens=10, features=32)
    weight = random_weight(24, 32)
    gram = inputs.double().T @ inputs.double()
    result = whitened_svd(weight, 6, gram, tokens=10)
    assert result.fallback is None and result.damp == pytest.approx(1e-2)
    plain = svd_factors(weight, 6)
    assert output_error(weight, result.a, result.b, gram) < output_error(weight, *plain, gram)


def test_whitened_with_zero_damping_whitens_exactly() -> None:
    inputs = anisotropic_inputs(tokens=500, features=16)
    weight = random_weight(12, 16)
    gram = inputs.double().T @ inputs.double()
    exact = whitened_svd(weight, 4, gram, tokens=500, damp=0.0)
    damped = whitened_svd(weight, 4, gram, tokens=500, damp=1e-2)
    assert exact.damp == 0.0
    # Without damping the objective is exactly the error on the inputs, so it can only be lower.
    assert output_error(weight, exact.a, exact.b, gram) <= output_error(
        weight, damped.a, damped.b, gram
    )


@pytest.mark.parametrize(
    ("gram", "tokens", "reason"),
    [(torch.zeros(12, 12), 100, "zero"), (torch.eye(12), 0, "no calibration tokens")],
)
def test_whitened_falls_back_to_plain_svd_without_information(
    gram: torch.Tensor, tokens: int, reason: str
) -> None:
    weight = random_weight(10, 12)
    result = whitened_svd(weight, 3, gram, tokens)
    assert result.damp is None and reason in (result.fallback or "")
    plain_a, plain_b = svd_factors(weight, 3)
    assert torch.equal(result.a, plain_a) and torch.equal(result.b, plain_b)
    with pytest.warns(UserWarning, match="plain SVD"):
        whitened_svd_factors(weight, 3, gram, tokens)


def test_whitened_increases_damping_when_cholesky_fails() -> None:
    # Indefinite (eigenvalues -1 and 3) but fixable: damping 0.01 fails, 1.0 x mean diagonal works.
    gram = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    weight = random_weight(3, 2)
    result = whitened_svd(weight, 1, gram, tokens=1)
    assert result.fallback is None and result.damp > 1e-2
    with pytest.warns(UserWarning, match="damping"):
        whitened_svd_factors(weight, 1, gram, tokens=1)


def test_whitened_rejects_grams_that_are_not_second_moments() -> None:
    weight = random_weight(3, 2)
    hopeless = torch.tensor([[1.0, 1000.0], [1000.0, 1.0]])
    with pytest.raises(FFSplitError, match="positive semi-definite"):
        whitened_svd(weight, 1, hopeless, tokens=1)
    with pytest.raises(FFSplitError, match="negative diagonal"):
        whitened_svd(weight, 1, -torch.eye(2), tokens=1)
    with pytest.raises(FFSplitError, match=r"\[2, 2\]"):
        whitened_svd(weight, 1, torch.eye(3), tokens=1)
    with pytest.raises(FFSplitError, match="NaN"):
        whitened_svd(weight, 1, torch.full((2, 2), float("nan")), tokens=1)
    with pytest.raises(FFSplitError, match="tokens"):
        whitened_svd(weight, 1, torch.eye(2), tokens=-1)
    with pytest.raises(FFSplitError, match="damp"):
        whitened_svd(weight, 1, torch.eye(2), tokens=1, damp=-1.0)


def test_factorisations_are_deterministic() -> None:
    inputs = anisotropic_inputs(tokens=200, features=16)
    weight = random_weight(12, 16)
    gram = inputs.double().T @ inputs.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = whitened_svd_factors(weight, 5, gram, 200)
        second = whitened_svd_factors(weight, 5, gram, 200)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


def test_reused_decompositions_give_identical_factors():
    from ffsplit.compress.lowrank import reuse_decompositions, svd_factors, whitened_svd

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 16, generator=gen)
    x = torch.randn(200, 16, generator=gen) * torch.linspace(0.1, 3, 16)
    gram = (x.T @ x).double()
    fresh = [whitened_svd(weight, r, gram, 200) for r in (2, 5)] + [svd_factors(weight, 4)]
    with reuse_decompositions():
        again = [whitened_svd(weight, r, gram, 200) for r in (2, 5, 2)] + [svd_factors(weight, 4)]
    for a, b in zip(fresh[:2], again[:2], strict=True):
        assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b)
    assert torch.equal(again[0].a, again[2].a)
    assert torch.equal(fresh[2][0], again[3][0])


@pytest.mark.parametrize("shape", [(60, 24), (24, 60), (32, 32)])
def test_svd_via_gram_matches_lapack_svd(shape: tuple[int, int]) -> None:
    """The CUDA path (eigh of the smaller Gram side), run on CPU: same spectrum, same truncations."""
    from ffsplit.compress.lowrank import svd_via_gram

    gen = torch.Generator().manual_seed(5)
    rows, cols = shape
    k = min(shape)
    # A known, well separated spectrum over three decades, like a whitened FFN matrix.
    left = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.logspace(1, -2, k, dtype=torch.float64)
    matrix = (left * spectrum) @ right.T
    u, s, vh = svd_via_gram(matrix)
    ref_u, ref_s, ref_vh = torch.linalg.svd(matrix, full_matrices=False)
    assert u.shape == ref_u.shape and s.shape == ref_s.shape and vh.shape == ref_vh.shape
    assert torch.allclose(s, ref_s, rtol=1e-9, atol=1e-12)
    for rank in (1, k // 3, k // 2):
        ours = (u[:, :rank] * s[:rank]) @ vh[:rank]
        ref = (ref_u[:, :rank] * ref_s[:rank]) @ ref_vh[:rank]
        assert (ours - ref).abs().max() <= 1e-9 * ref.abs().max()
    # Orthonormal singular vectors where the spectrum is reliable.
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(u.T @ u, eye, atol=1e-8) and torch.allclose(vh @ vh.T, eye, atol=1e-8)


def test_svd_via_gram_zeroes_directions_below_its_precision() -> None:
    from ffsplit.compress.lowrank import svd_via_gram

    gen = torch.Generator().manual_seed(6)
    basis = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    matrix = basis @ torch.randn(3, 20, generator=gen, dtype=torch.float64)  # rank 3 of 20
    u, s, vh = svd_via_gram(matrix)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert (u[:, 3:] == 0).all()  # no noise amplified from zero singular values
    approx = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(approx, matrix, atol=1e-9 * matrix.abs().max())


def test_cpu_factors_still_come_from_lapack_svd() -> None:
    """The Gram-side path is for CUDA only: CPU factors equal the LAPACK SVD's bit for bit."""
    weight = random_weight(20, 12)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:4].sqrt()
    a, b = svd_factors(weight, 4)
    assert torch.equal(a, (u[:, :4] * root).float()) and torch.equal(
        b, (root[:, None] * vh[:4]).float()
    )
