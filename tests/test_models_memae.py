"""MemAE memory: addressing (dot and cosine), hard shrinkage and entropy, checked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from models.memae import MemAEMemory, addressing_entropy, hard_shrink


def test_hard_shrink_zeroes_small_weights_and_renormalises():
    weights = torch.tensor([[0.5, 0.3, 0.195, 0.002, 0.003], [0.9, 0.001, 0.001, 0.097, 0.001]],
                           dtype=torch.float64)
    shrunk = hard_shrink(weights, 0.0025)
    assert shrunk[0, 3] == 0 and shrunk[1, 1] == 0 and shrunk[1, 2] == 0 and shrunk[1, 4] == 0
    assert torch.allclose(shrunk.sum(dim=1), torch.ones(2, dtype=torch.float64))
    # above the threshold relu(w - l) * w / |w - l| = w, so the kept weights keep their ratios
    kept = [0.5, 0.3, 0.195, 0.0, 0.003]
    assert shrunk[0].tolist() == pytest.approx([w / sum(kept) for w in kept], abs=1e-9)
    assert shrunk[1].tolist() == pytest.approx([0.9 / 0.997, 0, 0, 0.097 / 0.997, 0], abs=1e-9)


def test_a_row_shrunk_to_nothing_stays_zero():
    shrunk = hard_shrink(torch.full((1, 4), 0.001), 0.0025)
    assert torch.equal(shrunk, torch.zeros(1, 4))
    assert addressing_entropy(shrunk).item() == 0.0


def test_entropy_by_hand():
    weights = torch.tensor([[0.5, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    row0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert addressing_entropy(weights).item() == pytest.approx((row0 + 0.0) / 2, abs=1e-9)


@pytest.mark.parametrize("addressing", ["dot", "cosine"])
def test_addressing_and_read_by_hand(addressing):
    memory = MemAEMemory(3, 2, shrink_threshold=0.2, addressing=addressing).double()
    items = [[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]
    with torch.no_grad():
        memory.items.copy_(torch.tensor(items, dtype=torch.float64))
    query = [0.5, 1.0]
    if addressing == "dot":
        logits = [0.5, 2.0, -1.5]
    else:
        qn = math.hypot(*query)
        logits = [0.5 / qn, 2.0 / (qn * 2.0), -1.5 / (qn * math.sqrt(2))]
    e = [math.exp(v) for v in logits]
    w = [x / sum(e) for x in e]
    kept = [x if x > 0.2 else 0.0 for x in w]
    w_hat = [x / sum(kept) for x in kept]
    read, weights, nearest = memory(torch.tensor([query], dtype=torch.float64))
    assert weights[0].tolist() == pytest.approx(w_hat, abs=1e-9)
    expected = [sum(w_hat[m] * items[m][c] for m in range(3)) for c in range(2)]
    assert read[0].tolist() == pytest.approx(expected, abs=1e-9)
    assert nearest.tolist() == [1]


def test_items_init_and_options():
    torch.manual_seed(0)
    memory = MemAEMemory(2000, 256)
    assert memory.items.shape == (2000, 256) and memory.items.requires_grad
    assert memory.items.abs().max() <= 1 / 16
    assert memory.items.abs().max() > 0.9 / 16          # spread over the whole range, not a narrow init
    with pytest.raises(ValueError, match="euclid"):
        MemAEMemory(10, 4, addressing="euclid")


def test_the_share_of_queries_the_shrinkage_zeroes_is_logged():
    """With 2000 near-uniform weights (each about 1/2000) and a threshold of 5/2000, every row shrinks to zero."""
    from models.memae import MemAE

    torch.manual_seed(0)
    model = MemAE(1, clip_length=8, width=0.125, memory_items=2000, shrink_threshold=0.0025).eval()
    with torch.no_grad():
        model.memory.items.mul_(1e-3)   # near-zero logits: every weight close to 1/2000
        result = model(torch.rand(1, 1, 8, 32, 32))
    assert result.loss_terms["zero_rows"].item() == 1.0
    assert torch.count_nonzero(result.read) == 0   # a zeroed row reads nothing
    model.memory.shrink_threshold = 0.0001
    with torch.no_grad():
        assert model(torch.rand(1, 1, 8, 32, 32)).loss_terms["zero_rows"].item() == 0.0


def test_in_place_activations_give_the_same_loss_and_gradients_bit_for_bit():
    """The blocks' LeakyReLU works in place (it saves MemAE one activation tensor per block, 14% of the peak memory at
    the papers' size): the same forward and backward as the out-of-place one."""
    import copy

    from models.memae import MemAE
    torch.manual_seed(0)
    in_place = MemAE(width=0.125, memory_items=20)
    out_of_place = copy.deepcopy(in_place)
    activations = [m for m in out_of_place.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(activations) == 7 and all(m.inplace for m in activations)
    for module in activations:
        module.inplace = False
    clip = torch.rand(2, 1, 16, 32, 32) * 2 - 1
    losses = [((model(clip).output - clip) ** 2).mean() for model in (in_place, out_of_place)]
    assert torch.equal(*losses)
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(in_place.named_parameters(), out_of_place.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
