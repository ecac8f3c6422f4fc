"""Draws: every random draw of a training or validation step (class dropout, orders, masks, noise, flow times) from
one generator seeded by (run seed, stage, global step, batch index), drawn for the global batch and sliced by rank.

Why for the global batch: the DistributedSampler deals a global batch round-robin (rank r holds global samples
r, r + world, ...), so when every rank draws the whole global batch from the same seed and keeps its own rows, N
processes at batch B/N draw for each sample exactly what 1 process at batch B draws. That is what makes 2 processes
equal 1 for every method, by construction.

Why one seed mixer: a CPU generator seeds Mersenne Twister with the low 32 bits of its seed only, so seeds that differ
in their high bits draw the same numbers (`manual_seed(5)` and `manual_seed(5 + (1 << 40))` agree). `mix_seed`
spreads every key over all 32 bits it returns (the splitmix64 finaliser), so neighbouring steps, batches and stages
get unrelated streams on every device.
"""

from collections.abc import Callable

import torch

STAGES = {"train": 1, "val": 2}


def mix_seed(first: int, *keys: int) -> int:
    """A 32-bit seed from integer keys: splitmix64 over (previous, key), chained. `mix_seed(a, b)` is the seed of the
    built-in datasets' item b of stream a and of the evaluator's batches."""
    h = int(first)
    for k in keys:
        z = (h * 0x9E3779B97F4A7C15 + int(k)) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h = (z ^ (z >> 31)) & 0xFFFFFFFF
    return h & 0xFFFFFFFF


class Draws:
    """The random draws of one step. Every method takes its randomness from here, in the order it reads it.

    `rand(B, *shape)` / `randn(B, *shape)` return this rank's rows (B, *shape) of a (B * world, *shape) draw;
    `*_global` return the whole global draw (for counts every rank must agree on); `shared_rand` is one draw for the
    whole global batch (MAR's single mask ratio per step)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", world: int = 1, rank: int = 0, step: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} must lie in [0, world={world})")
        self.seed, self.world, self.rank, self.step = seed, world, rank, step
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @classmethod
    def for_step(cls, run_seed: int, stage: str, step: int, batch_idx: int, device: torch.device | str = "cpu",
                 world: int = 1, rank: int = 0) -> "Draws":  # fmt: skip
        """The draws of batch `batch_idx` at global step `step` of `stage` ('train' or 'val'). Validation is keyed at
        step 0 whatever the global step, so every validation draws the same masks and noise and val/loss curves are
        comparable from one validation to the next."""
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r} is not known; use one of {tuple(STAGES)}")
        key_step = step if stage == "train" else 0
        return cls(mix_seed(run_seed, STAGES[stage], key_step, batch_idx), device, world, rank, step)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """A global-batch tensor (B * world, ...) -> this rank's rows (B, ...)."""
        return x[self.rank :: self.world]

    def _global(self, fn: Callable, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
        return fn((batch * self.world, *shape), generator=self.generator, device=self.device)

    def rand_global(self, batch: int, *shape: int) -> torch.Tensor:
        return self._global(torch.rand, batch, shape)  # (B * world, *shape)

    def rand(self, batch: int, *shape: int) -> torch.Tensor:
        return self.local(self.rand_global(batch, *shape))  # (B, *shape)

    def randn(self, batch: int, *shape: int) -> torch.Tensor:
        return self.local(self._global(torch.randn, batch, shape))  # (B, *shape)

    def shared_rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)

    def class_dropout(self, labels: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
        """Labels (B,), each replaced by the null class with probability p. Nothing is drawn at p = 0."""
        if p == 0.0:
            return labels
        drop = self.rand(labels.shape[0]) < p  # (B,)
        return torch.where(drop, torch.full_like(labels, null_class), labels)
