"""A batched, preallocated KV cache: one row per context (conversation or guidance branch).

Every block is written at the same slot range for all rows (the write pointer `used`), and a per-slot
`valid` mask says which slots hold real tokens of a row. Rows of different lengths therefore need no
per-row copies; the attention mask hides the gaps. `fork` copies rows (a guidance context that shares
a prefix with the main one is a fork, computed once); `stack` gathers rows of several caches into one
batch for a denoising loop, each row ending at the same slot, so that every row's keys are one contiguous
suffix and attention needs no mask; `compact` squeezes the gaps out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LLMConfig
from ..models.qwen2_mot import KVSlot


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, Hkv, capacity, D]
    v: list[torch.Tensor]
    valid: torch.Tensor  # [B, capacity] bool
    rope: torch.Tensor  # [B] int64: next RoPE position of each row
    used: int = 0  # slots [0, used) have been written for some row

    @classmethod
    def empty(cls, cfg: LLMConfig, batch: int, capacity: int, device, dtype) -> "KVCache":
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
            rope=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more slots (grows geometrically; no-op when there is room)."""
        need = self.used + extra
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity, 64)
        pad = new_cap - self.capacity
        self.k = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.k]
        self.v = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.v]
        self.valid = torch.nn.functional.pad(self.valid, (0, pad))

    def slots(self) -> list[KVSlot]:
        """Per-layer views where the next block is written (at `used`)."""
        return [KVSlot(k, v, self.used) for k, v in zip(self.k, self.v)]

    def commit(self, block_valid: torch.Tensor, advance_rope: torch.Tensor) -> None:
        """Keep the block just written: block_valid [B, L] marks its real tokens; ropes advance per row."""
        L = block_valid.shape[1]
        self.valid[:, self.used:self.used + L] = block_valid
        self.used += L
        self.rope += advance_rope

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop): blocks committed through it are written into this cache.

        Reserve room here first (a view that grows would detach), and copy `used` back afterwards.
        """
        return KVCache(k=[t[start:stop] for t in self.k], v=[t[start:stop] for t in self.v],
                       valid=self.valid[start:stop], rope=self.rope[start:stop], used=self.used)

    def select(self, rows: list[int]) -> "KVCache":
        """A new cache holding copies of the given rows (trimmed to the used slots)."""
        idx = torch.tensor(rows, device=self.valid.device)
        u = self.used
        return KVCache(
            k=[t[idx, :, :u].clone() for t in self.k],
            v=[t[idx, :, :u].clone() for t in self.v],
            valid=self.valid[idx, :u].clone(),
            rope=self.rope[idx].clone(),
            used=u,
        )

    def fork(self) -> "KVCache":
        return self.select(list(range(self.batch)))

    def compact(self) -> "KVCache":
        """Move each row's valid slots to the front (after batched prefills of unequal lengths)."""
        lengths = self.lengths()
        if bool((lengths == self.used).all()):
            return self
        n = int(lengths.max())
        out = KVCache.empty_like(self, n)
        for b in range(self.batch):
            idx = self.valid[b, :self.used].nonzero().squeeze(1)
            for src, dst in zip(self.k + self.v, out.k + out.v):
                dst[b, :, :len(idx)] = src[b, :, idx]
            out.valid[b, :len(idx)] = True
        out.rope = self.rope.clone()
        out.used = n
        return out

    @classmethod
    def empty_like(cls, other: "KVCache", capacity: int, batch: int | None = None) -> "KVCache":
        B = other.batch if batch is None else batch
        shape = lambda t: (B, t.shape[1], capacity, t.shape[3])  # noqa: E731
        return cls(
            k=[other.k[0].new_zeros(shape(t)) for t in other.k],
            v=[other.v[0].new_zeros(shape(t)) for t in other.v],
            valid=other.valid.new_zeros(B, capacity),
            rope=other.rope.new_zeros(B),
        )

    @classmethod
    def stack(cls, rows: list[tuple["KVCache", int]], extra: int = 0) -> "KVCache":
        """Gather (cache, row) pairs into one batch with `extra` free slots after them.

        Rows are right-aligned: row b holds its valid slots at [used - length_b, used), so a block
        written at `used` makes its keys the contiguous suffix from `first_valid()[b]`.
        """
        lengths = [int(c.valid[r].sum()) for c, r in rows]
        n = max(lengths) if lengths else 0
        out = cls.empty_like(rows[0][0], n + extra, batch=len(rows))
        for b, ((c, r), length) in enumerate(zip(rows, lengths)):
            idx = c.valid[r, :c.used].nonzero().squeeze(1)
            contiguous = length == 0 or int(idx[-1]) == length - 1
            for src, dst in zip(c.k + c.v, out.k + out.v):
                dst[b, :, n - length:n] = src[r, :, :length] if contiguous else src[r, :, idx]
            out.valid[b, n - length:n] = True
            out.rope[b] = c.rope[r]
        out.used = n
        return out

    def first_valid(self) -> list[int] | None:
        """Per row, the first valid slot when each row's valid slots run contiguously up to `used`; else None."""
        lengths = self.valid[:, :self.used].sum(1)
        starts = self.used - lengths
        slot = torch.arange(self.used, device=self.valid.device)[None]
        if not bool((self.valid[:, :self.used] == (slot >= starts[:, None])).all()):
            return None
        return starts.tolist()
