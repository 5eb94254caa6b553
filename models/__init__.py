"""Pure torch models and losses: MNAD (with its memory), the no-memory baselines, CopyLast, MemAE.

No file I/O, no params parsing: pipeline/ builds models through models.build.
"""
from models.build import build_model
from models.clips import split_clip
from models.losses import compute_loss, memae_loss, mnad_loss
from models.memae import MemAE
from models.memory import Memory
from models.mnad import MNAD, CopyLast, Replacement, point_score
from models.noise import salt_and_pepper
from models.output import ModelOutput

__all__ = ["build_model", "compute_loss", "memae_loss", "mnad_loss", "split_clip", "MemAE", "Memory", "MNAD",
           "CopyLast", "Replacement", "point_score", "salt_and_pepper", "ModelOutput"]
