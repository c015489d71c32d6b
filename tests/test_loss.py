"""The fused linear + cross-entropy equals the plain `F.cross_entropy(h @ W.T)` in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model.loss import linear_cross_entropy


@pytest.mark.parametrize("masked", [0.0, 0.7])
@pytest.mark.parametrize("chunk", [7, 256])
def test_matches_unfused(masked, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 40, 16, generator=g, requires_grad=True)
    w = (torch.randn(50, 16, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 50, (3, 40), generator=g)
    t[torch.rand(3, 40, generator=g) < masked] = -100
    ref = F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), ignore_index=-100)
    got = linear_cross_entropy(h, w, t, chunk_rows=chunk)
    assert torch.allclose(got, ref, atol=1e-6)
    for a, b in zip(torch.autograd.grad(2 * got, [h, w]), torch.autograd.grad(2 * ref, [h, w])):
        assert torch.allclose(a, b, atol=1e-6)


def test_no_grad_and_all_ignored():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with torch.no_grad():
        assert torch.isfinite(linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4])))
    # Nothing to score: zero loss and zero gradients, not NaN (a short batch's deeper MTP depths).
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
