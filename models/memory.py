"""MNAD's memory (Park et al., CVPR 2020): a few prototype items that queries read by attention.

The items are a buffer, not a parameter: no gradient ever reaches them. They change only through `update`, a
written rule that pulls each item towards the queries nearest to it. A batch reads the memory and computes its
losses first; the update comes after (MNAD trains that way), so everything a forward returns describes the memory
as it was before the batch.

Queries are flattened to rows in (batch, y, x) order: row k = b*h*w + y*w + x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

UPDATE_NORMS = ("official", "paper")


def flatten_queries(queries: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] query map -> [B*h*w, C] rows."""
    return queries.permute(0, 2, 3, 1).reshape(-1, queries.shape[1])


def global_batch(features: torch.Tensor) -> torch.Tensor:
    """In distributed training (a process group of N ranks), every rank's `features` [b, ...] as the global batch
    [b * N, ...] in its row order: rank r holds rows r, r + N, ... (DistributedSampler deals a batch out
    round-robin), so rank r's row i is global row i * N + r. Outside a process group, `features` as they are."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *features.shape[1:])


@dataclass
class MemoryRead:
    """One read of the memory, and the losses that come with it."""

    queries: torch.Tensor       # [B, C, h, w] the L2-normalised queries
    read: torch.Tensor          # [B, C, h, w] p_hat: the memory's answer to each query
    nearest: torch.Tensor       # [B, h, w] index of each query's nearest item
    score_memory: torch.Tensor  # [B*h*w, M] softmax over items (keeps its gradient to the queries)
    compactness: torch.Tensor   # MSE between queries and their nearest items
    separateness: torch.Tensor  # triplet loss: nearest item closer than the second-nearest by a margin of 1
    uniform: torch.Tensor       # RC2020: MSE between score_memory and a fixed spread of positions over items
    distance: torch.Tensor      # [B] compactness per frame, detached: the evaluation's feature distance


class Memory(nn.Module):
    def __init__(self, num_items: int, dim: int, update_norm: str = "official"):
        super().__init__()
        if num_items < 2:
            raise ValueError(f"memory_items must be at least 2 (the separateness loss needs a second-nearest "
                             f"item), got {num_items}")
        if update_norm not in UPDATE_NORMS:
            raise ValueError(f"update_norm {update_norm!r} unknown; valid: {list(UPDATE_NORMS)}")
        self.update_norm = update_norm
        # L2-normalised uniform[0, 1) rows, drawn from torch's global RNG (seeded by the caller).
        self.register_buffer("items", F.normalize(torch.rand(num_items, dim), dim=1))

    @property
    def num_items(self) -> int:
        return self.items.shape[0]

    def forward(self, features: torch.Tensor) -> MemoryRead:
        """Read the memory with every spatial position of `features` [B, C, h, w] as a query."""
        batch, dim, height, width = features.shape
        queries = F.normalize(features, dim=1)
        q = flatten_queries(queries)                      # [N, C]
        items = self.items                                # [M, C]
        scores = q @ items.t()                            # [N, M]
        score_memory = scores.softmax(dim=1)
        top2 = scores.topk(2, dim=1).indices
        nearest, second = top2[:, 0], top2[:, 1]

        # Read: attention over items; detached so that the read passes no gradient back into the scores.
        read_rows = score_memory.detach() @ items
        read = read_rows.reshape(batch, height, width, dim).permute(0, 3, 1, 2)

        positive, negative = items[nearest], items[second]
        squared_error = (q - positive) ** 2               # [N, C]
        compactness = squared_error.mean()
        distance = squared_error.detach().reshape(batch, -1).mean(dim=1)
        separateness = F.triplet_margin_loss(q, positive, negative, margin=1.0)

        # RC2020 uniform usage: position i within a frame (i = y*w + x) should address item i mod M. The target
        # depends on the position only, so it works for any batch size.
        position = torch.arange(q.shape[0], device=q.device) % (height * width)
        target = F.one_hot(position % self.num_items, self.num_items).to(score_memory.dtype)
        uniform = F.mse_loss(score_memory, target)

        return MemoryRead(queries, read, nearest.reshape(batch, height, width), score_memory,
                          compactness, separateness, uniform, distance)

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> torch.Tensor:
        """Write the queries of `features` [B, C, h, w] into the memory; return each query's nearest item [B, h, w].

        p_m <- L2norm(p_m + sum_{k: n(k)=m} (v_km / max v) q_k), v = softmax over queries. The max runs over all
        queries of column m ("official", the released code) or over the queries assigned to m ("paper", Eq. 5).
        Items no query chose stay exactly as they were. In distributed training the rule runs on the queries of
        every rank's share of the batch (`global_batch`), so every rank writes the same memory; the nearest items
        returned are this rank's.
        """
        with torch.autocast(features.device.type, enabled=False):  # the written rule stays in the items' fp32
            everyone = global_batch(features.to(self.items.dtype))
            nearest = self._update(everyone)
        if everyone.shape[0] == features.shape[0]:
            return nearest
        return nearest[dist.get_rank()::dist.get_world_size()]

    def _update(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        q = flatten_queries(F.normalize(features, dim=1))
        items = self.items
        scores = q @ items.t()
        score_query = scores.softmax(dim=0)
        nearest = scores.argmax(dim=1)                                    # n(k)
        own_score = score_query.gather(1, nearest[:, None]).squeeze(1)    # v_{k, n(k)}
        if self.update_norm == "official":
            column_max = score_query.max(dim=0).values
        else:
            column_max = torch.zeros_like(score_query[0]).scatter_reduce(
                0, nearest, own_score, reduce="amax", include_self=False)
        weights = own_score / column_max[nearest]
        step = torch.zeros_like(items).index_add_(0, nearest, weights[:, None] * q)
        chosen = torch.zeros(self.num_items, dtype=torch.bool, device=items.device).index_fill_(0, nearest, True)
        # Rebind rather than write in place: the old items may still be saved in this batch's autograd graph.
        self.items = torch.where(chosen[:, None], F.normalize(items + step, dim=1), items)
        return nearest.reshape(batch, height, width)
