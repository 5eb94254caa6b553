"""MNAD memory: read, losses, update (both norms), test-time update and feature distance, each against a slow
loop written here from the formulas in REFERENCE.md section 1 (3 items, dim 4, 5 queries)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.memory import Memory
from models.mnad import MNAD, point_score
from models.output import ModelOutput

# Items: p0 and p1 take all the queries, p2 points away from every query and is never chosen.
ITEMS = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]]
# q1 is p1's best scorer overall but belongs to p0, so the "official" and "paper" norms differ for p1.
QUERIES = [[1.0, 0.0, 0.0, 0.0], [0.8, 0.75, 0.0, 0.0], [0.5, 0.6, 0.6, 0.0], [0.2, 0.5, 0.8, 0.0],
           [0.0, 0.3, 0.0, 1.0]]


# ---- slow references on python lists ---------------------------------------------------------------------------

def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def normalise(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a]


def softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


def slow_scores(queries, items):
    return [[dot(q, p) for p in items] for q in queries]


def slow_nearest(queries, items):
    return [max(range(len(items)), key=lambda m: row[m]) for row in slow_scores(queries, items)]


def slow_update(queries, items, norm):
    queries = [normalise(q) for q in queries]
    scores = slow_scores(queries, items)
    columns = [softmax([scores[k][m] for k in range(len(queries))]) for m in range(len(items))]  # v[m][k]
    nearest = slow_nearest(queries, items)
    new_items = []
    for m, item in enumerate(items):
        mine = [k for k in range(len(queries)) if nearest[k] == m]
        if not mine:
            new_items.append(list(item))
            continue
        top = max(columns[m]) if norm == "official" else max(columns[m][k] for k in mine)
        acc = list(item)
        for k in mine:
            acc = [a + columns[m][k] / top * qc for a, qc in zip(acc, queries[k])]
        new_items.append(normalise(acc))
    return new_items, nearest


def as_map(rows, frames=1):
    """[N, C] rows -> [frames, C, 1, N/frames] query map, rows in (frame, x) order."""
    t = torch.tensor(rows, dtype=torch.float64)
    return t.reshape(frames, -1, t.shape[1]).permute(0, 2, 1).unsqueeze(2)


def memory_with(items, norm="official"):
    memory = Memory(len(items), len(items[0]), norm).double()
    memory.items = torch.tensor(items, dtype=torch.float64)
    return memory


# ---- tests -----------------------------------------------------------------------------------------------------

def test_init_items_are_unit_rows_in_a_buffer():
    torch.manual_seed(0)
    memory = Memory(10, 32)
    assert torch.allclose(memory.items.norm(dim=1), torch.ones(10))
    assert (memory.items >= 0).all()
    assert not memory.items.requires_grad
    assert list(memory.state_dict()) == ["items"] and list(memory.parameters()) == []
    torch.manual_seed(0)
    assert torch.equal(Memory(10, 32).items, memory.items)  # seeded by the global RNG


def test_read_matches_slow_attention():
    memory = memory_with(ITEMS)
    result = memory(as_map(QUERIES))
    queries = [normalise(q) for q in QUERIES]
    for k, q in enumerate(queries):
        weights = softmax([dot(q, p) for p in ITEMS])
        expected = [sum(weights[m] * ITEMS[m][c] for m in range(3)) for c in range(4)]
        assert result.read[0, :, 0, k].tolist() == pytest.approx(expected, abs=1e-12)
        assert result.queries[0, :, 0, k].tolist() == pytest.approx(q, abs=1e-12)
        assert result.score_memory[k].tolist() == pytest.approx(weights, abs=1e-12)
    assert result.nearest[0, 0].tolist() == slow_nearest(queries, ITEMS) == [0, 0, 1, 1, 1]


def test_losses_and_distance_match_slow_loops():
    torch.manual_seed(1)
    rows = torch.randn(10, 4, dtype=torch.float64).tolist()   # two frames of five queries
    items = F.normalize(torch.rand(3, 4, dtype=torch.float64), dim=1).tolist()
    result = memory_with(items)(as_map(rows, frames=2))
    queries = [normalise(q) for q in rows]
    scores = slow_scores(queries, items)

    squared = []
    triplet = []
    for k, q in enumerate(queries):
        order = sorted(range(3), key=lambda m: -scores[k][m])
        pos, neg = items[order[0]], items[order[1]]
        squared.append([(a - b) ** 2 for a, b in zip(q, pos)])
        d_pos = math.sqrt(sum((a - b + 1e-6) ** 2 for a, b in zip(q, pos)))   # pairwise_distance adds eps
        d_neg = math.sqrt(sum((a - b + 1e-6) ** 2 for a, b in zip(q, neg)))
        triplet.append(max(0.0, d_pos - d_neg + 1.0))
    assert result.compactness.item() == pytest.approx(sum(map(sum, squared)) / 40, abs=1e-12)
    assert result.separateness.item() == pytest.approx(sum(triplet) / 10, abs=1e-9)
    per_frame = [sum(map(sum, squared[:5])) / 20, sum(map(sum, squared[5:])) / 20]
    assert result.distance.tolist() == pytest.approx(per_frame, abs=1e-12)

    # uniform: position i within the frame (here x = 0..4, for both frames) targets item i mod 3
    total = 0.0
    for k in range(10):
        target = (k % 5) % 3
        weights = softmax(scores[k])
        total += sum((weights[m] - (1.0 if m == target else 0.0)) ** 2 for m in range(3))
    assert result.uniform.item() == pytest.approx(total / 30, abs=1e-12)


def test_uniform_position_index_is_row_major():
    """A 2x3 query map: position (y, x) is i = y*3 + x; with 4 items the targets are 0 1 2 3 0 1."""
    memory = Memory(4, 2).double()
    queries = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    result = memory(queries)
    targets = F.one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), 4).double()
    assert result.uniform.item() == pytest.approx(F.mse_loss(result.score_memory, targets).item())
    # the score rows are in the same (y, x) order as queries.permute(0, 2, 3, 1)
    q = F.normalize(queries, dim=1)[0, :, 1, 2]
    assert torch.allclose(result.score_memory[5], (memory.items @ q).softmax(0))


@pytest.mark.parametrize("norm", ["official", "paper"])
def test_update_matches_slow_loop(norm):
    memory = memory_with(ITEMS, norm)
    nearest = memory.update(as_map(QUERIES))
    expected, expected_nearest = slow_update(QUERIES, ITEMS, norm)
    assert nearest[0, 0].tolist() == expected_nearest
    assert memory.items.tolist() == [pytest.approx(row, abs=1e-12) for row in expected]
    assert memory.items[2].tolist() == ITEMS[2]          # no query chose p2: exactly unchanged
    assert torch.allclose(memory.items.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_update_norms_differ_only_where_the_best_scorer_belongs_elsewhere():
    official, paper = memory_with(ITEMS, "official"), memory_with(ITEMS, "paper")
    official.update(as_map(QUERIES))
    paper.update(as_map(QUERIES))
    assert torch.allclose(official.items[0], paper.items[0])
    assert not torch.allclose(official.items[1], paper.items[1])


def test_update_on_random_batches_matches_slow_loop():
    torch.manual_seed(2)
    items = F.normalize(torch.rand(3, 4, dtype=torch.float64), dim=1).tolist()
    rows = torch.rand(12, 4, dtype=torch.float64).tolist()
    for norm in ("official", "paper"):
        memory = memory_with(items, norm)
        memory.update(as_map(rows, frames=3))
        expected, _ = slow_update(rows, items, norm)
        assert memory.items.tolist() == [pytest.approx(row, abs=1e-12) for row in expected]


def test_point_score_by_hand():
    output = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[0.2, 0.0], [-0.4, 0.0]]]])
    errors = [0.1 ** 2, 0.0, 0.2 ** 2, 0.0]                  # ((out+1)/2 - (gt+1)/2)^2
    weights = [1 - math.exp(-e) for e in errors]
    expected = sum(w * e for w, e in zip(weights, errors)) / sum(weights)
    assert point_score(output, target).item() == pytest.approx(expected, rel=1e-5)
    assert torch.isnan(point_score(output, output)).all()    # a perfect frame: 0/0, never updates


def tiny_mnad():
    torch.manual_seed(0)
    return MNAD(1, 1, width=0.125, skips=False, memory_items=3).double().eval()


def three_frames_off_by(offsets):
    """A tiny model's output on three frames, and targets that differ from it by a constant offset each."""
    model = tiny_mnad()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        result = model(x)
    target = result.output + torch.tensor(offsets, dtype=torch.float64).view(3, 1, 1, 1)
    return model, result, target


def test_test_time_update_uses_only_frames_under_threshold():
    # s ~ 2.5e-5 (updates), ~0.06 (does not), ~1e-4 (updates)
    model, result, target = three_frames_off_by([0.01, 0.5, 0.02])
    scores = [point_score(result.output[i:i + 1], target[i:i + 1]).item() for i in range(3)]
    assert scores[0] < 0.01 < scores[1] and scores[2] < 0.01

    reference = copy.deepcopy(model.memory)
    reference.update(result.queries[[0, 2]])
    selected = model.test_time_update(result, target, threshold=0.01)
    assert selected.tolist() == [True, False, True]
    assert torch.equal(model.memory.items, reference.items)

    before = model.memory.items.clone()
    assert model.test_time_update(result, target, threshold=1e-9).tolist() == [False, False, False]
    assert torch.equal(model.memory.items, before)


def test_test_time_update_first_only_writes_just_the_first_frame_under_threshold():
    # over the threshold; the first under it (the only one written); also under it, but after the first
    model, result, target = three_frames_off_by([0.5, 0.01, 0.01])
    reference = copy.deepcopy(model.memory)
    reference.update(result.queries[[1]])
    selected = model.test_time_update(result, target, threshold=0.01, first_only=True)
    assert selected.tolist() == [False, True, False]
    assert torch.equal(model.memory.items, reference.items)
    before = model.memory.items.clone()
    assert not model.test_time_update(result, target, threshold=1e-9, first_only=True).any()
    assert torch.equal(model.memory.items, before)


def test_feature_distance_per_frame_uses_memory_before_update():
    model = tiny_mnad()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    items = model.memory.items.clone()
    with torch.no_grad():
        result = model(x, update_memory=True)
    queries = result.queries.permute(0, 2, 3, 1)              # [B, h, w, C]
    for b in range(2):
        rows = queries[b].reshape(-1, queries.shape[-1])
        total = 0.0
        for q in rows:
            scores = [float(q @ p) for p in items]
            p = items[scores.index(max(scores))]
            total += float(((q - p) ** 2).sum())
        assert result.distance[b].item() == pytest.approx(total / rows.numel(), abs=1e-12)
    assert not torch.equal(model.memory.items, items)          # updated after the distance was taken


def test_forward_reads_and_losses_use_memory_as_before_the_batch():
    model = tiny_mnad()
    frozen = copy.deepcopy(model)
    initial = frozen.memory.items.clone()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        updating = model(x, update_memory=True)
        reference = frozen(x, update_memory=False)
    assert torch.equal(updating.read, reference.read)
    assert torch.equal(updating.output, reference.output)
    for name in ("compactness", "separateness", "uniform"):
        assert torch.equal(updating.loss_terms[name], reference.loss_terms[name])
    expected = copy.deepcopy(frozen.memory)
    expected.update(reference.queries)
    assert torch.equal(model.memory.items, expected.items)
    assert torch.equal(frozen.memory.items, initial)          # update_memory=False leaves it alone


def test_memory_rejects_bad_options():
    with pytest.raises(ValueError, match="1"):
        Memory(1, 4)
    with pytest.raises(ValueError, match="sometimes"):
        Memory(3, 4, "sometimes")


def test_test_time_update_needs_a_memory():
    model = MNAD(1, 1, width=0.125, skips=False, memory_items=0)
    result = ModelOutput(torch.zeros(1, 1, 8, 8), queries=torch.zeros(1, 64, 1, 1))
    with pytest.raises(ValueError, match="memory"):
        model.test_time_update(result, torch.zeros(1, 1, 8, 8), 0.01)
