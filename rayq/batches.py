"""Batches of the prepared data: the resumable training stream and the fixed held-out batches.

Windows are fixed-length slices of a split's token stream (see `rayq.data`): without BOS window i
covers tokens [i*T, i*T + T + 1), x = its first T, y = its last T; with `data.bos` it covers
[i*T, i*T + T), y = those T tokens and x = BOS followed by the first T - 1 of them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from rayq.data import HELDOUT, TRAIN, PreparedData
from rayq.errors import UserError

__all__ = ["TokenStream", "train_batches", "heldout_batches", "with_bos"]


class TokenStream:
    """Training batches (x, y) of shape (B, T) from a token stream, for one rank.

    The stream is cut into N = (len - 1) // T windows of T + 1 tokens. Epoch e visits them in the
    order `permutation(N)` of a generator seeded with (seed, e). The global batch at step k is the
    next `B * world_size` windows of that endless order; rank r takes rows r*B:(r+1)*B, so
    world_size=2 with batch B yields exactly the rows of world_size=1 with batch 2B.
    The position (windows consumed globally) is all the state there is: `state_dict()` /
    `load_state_dict()` resume with exactly the batches an uninterrupted run would see.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, bos_id: Optional[int] = None):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.bos_id = None if bos_id is None else int(bos_id)
        # a window holds T + 1 stream tokens (x and y shifted by one), or T with BOS in front of x
        self.span = self.seq_len if self.bos_id is not None else self.seq_len + 1
        self.num_windows = (len(self.tokens) - self.span + self.seq_len) // self.seq_len
        if self.num_windows < 1:
            raise UserError(f"data: the train split has {len(self.tokens)} tokens, fewer than one window (seq_len={seq_len}: {self.span} tokens)")
        self.position = 0  # windows consumed by all ranks together
        self._perm_epoch, self._perm = -1, None

    def _window_ids(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):  # at most one epoch boundary per batch in practice
            epoch, j = divmod(start + i, self.num_windows)
            if epoch != self._perm_epoch:
                self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_windows)
                self._perm_epoch = epoch
            out[i] = self._perm[j]
        return out

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self):

        start = self.position + self.rank * self.batch_size
        ids = self._window_ids(start, self.batch_size)
        self.position += self.batch_size * self.world_size
        offsets = ids[:, None] * self.seq_len + np.arange(self.span)[None, :]
        return _windows_to_xy(torch.from_numpy(self.tokens[offsets].astype(np.int64)), self.bos_id)

    def state_dict(self) -> dict:
        # plain ints only: checkpoints are loaded with torch.load(weights_only=True)
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        for name in ("seed", "seq_len", "num_windows"):
            if name in state and int(state[name]) != getattr(self, name):
                raise UserError(
                    f"data position: saved with {name}={state[name]}, this data has {getattr(self, name)}; "
                    "resume with the same data and config"
                )
        self.position = int(state["position"])


def with_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, L) token windows -> (B, L + 1) with the BOS id in front of every row."""
    return torch.cat([torch.full_like(windows[:, :1], bos_id), windows], dim=1)


def _windows_to_xy(w: torch.Tensor, bos_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream windows -> (x, y): T + 1 tokens shifted by one, or T tokens with BOS in front of x."""
    if bos_id is None:
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()
    return with_bos(w[:, :-1], bos_id), w.contiguous()


def train_batches(data: PreparedData, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> TokenStream:
    """The endless, resumable (x, y) iterator over the train split for one rank (per-rank batch)."""
    return TokenStream(data.tokens(TRAIN), seq_len, batch_size, seed=seed, rank=rank, world_size=world_size,
                       bos_id=data.window_bos)


def heldout_batches(data: PreparedData, n: int, batch_size: int, seq_len: int) -> list:
    """`n` fixed (x, y) batches of shape (batch_size, seq_len) from the held-out split, spread
    evenly over it (the same batches at every eval step, so eval losses are comparable)."""

    tokens = data.tokens(HELDOUT)
    bos = data.window_bos
    span = seq_len if bos is not None else seq_len + 1
    windows = (len(tokens) - span + seq_len) // seq_len
    if windows < 1:
        raise UserError(
            f"data: the held-out split has {len(tokens)} tokens, fewer than one window (seq_len={seq_len}: {span} tokens); "
            "set data.heldout_documents or data.heldout_fraction"
        )
    need = n * batch_size
    ids = (np.arange(need) * windows) // need if windows >= need else np.arange(need) % windows
    offsets = ids[:, None] * seq_len + np.arange(span)[None, :]
    x, y = _windows_to_xy(torch.from_numpy(tokens[offsets].astype(np.int64)), bos)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, need, batch_size)]
