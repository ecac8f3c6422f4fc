"""Any-order causal AR: next-token prediction in a configured generation order over the token grid, with
target-position queries (RandAR's random orders, DAR's diagonal and zigzag orders, PAR's region-interleaved order, a
spiral; raster is the identity).

Each fed token is rotated (RoPE) by its own grid position, and the slot that predicts the next token of the order
carries that token's position through the core's target-aware embedding (RAR's, the simplest form of ARPG's
target-position query): without it a causal model cannot know which position it is asked for in an order other
than raster. The order is a permutation of the L raster positions; `order[i]` is the grid position of the i-th
generated token.

Training: the tokens are gathered into the order (a fresh uniform permutation per sample and step for `random`,
drawn from the step's Draws), the core reads them with their positions and targets, and the head's cross-entropy
is taken on every token. Sampling: prefill the class prefix with the first target, then L - 1 one-token decode
steps on the static KV cache in the order, and the tokens scattered back to raster positions. The identity order
is raster decoding, draw for draw.
"""

import math
from dataclasses import dataclass

import torch

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.raster import RasterAR, RasterSampling

ORDERS = ("raster", "random", "diagonal", "zigzag", "spiral", "par")


def grid_order(name: str, grid_size: int, regions: int = 2) -> torch.Tensor:
    """A fixed generation order over a G x G grid: the raster positions (G*G,) in the order they are generated.
    raster: row by row; diagonal (DAR): by anti-diagonal r + c, each from its top row down; zigzag: JPEG's, the
    anti-diagonals in alternating directions; spiral: clockwise from the top-left corner inwards; par (PAR): the grid
    cut into regions x regions blocks, each block's first token in turn, then the same position across the blocks."""
    G = grid_size
    if name == "raster":
        return torch.arange(G * G)
    if name in ("diagonal", "zigzag"):
        cells = []
        for d in range(2 * G - 1):
            diag = [(r, d - r) for r in range(max(0, d - G + 1), min(d, G - 1) + 1)]  # top row down
            cells += diag[::-1] if name == "zigzag" and d % 2 == 0 else diag
        return torch.tensor([r * G + c for r, c in cells])
    if name == "spiral":
        top, bottom, left, right, out = 0, G - 1, 0, G - 1, []
        while top <= bottom and left <= right:
            out += [top * G + c for c in range(left, right + 1)]
            out += [r * G + right for r in range(top + 1, bottom + 1)]
            if top < bottom:
                out += [bottom * G + c for c in range(right - 1, left - 1, -1)]
            if left < right:
                out += [r * G + left for r in range(bottom - 1, top, -1)]
            top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
        return torch.tensor(out)
    if name == "par":
        if regions < 1 or G % regions:
            raise ValueError(f"order_regions={regions} must be >= 1 and divide the grid side {G}")
        S = G // regions  # each block is S x S
        blocks = [(br * S, bc * S) for br in range(regions) for bc in range(regions)]
        return torch.tensor([(r0 + i // S) * G + c0 + i % S for i in range(S * S) for r0, c0 in blocks])
    known = ", ".join(o for o in ORDERS if o != "random")
    raise ValueError(f"order={name!r} is not a fixed order; known: {known} (and random: one per sample)")


def check_order(name: str) -> None:
    if name not in ORDERS:
        raise ValueError(f"order={name!r} is not known; known orders: {', '.join(ORDERS)}")


@dataclass
class AnyOrderSampling(RasterSampling):
    """Sampling settings of any-order causal AR: raster's, and the order to sample in."""

    order: str | None = None
    """The generation order: None samples in the training order; or one of raster, random (a fresh permutation per
    sample), diagonal, zigzag, spiral, par."""

    def __post_init__(self):
        super().__post_init__()
        if self.order is not None:
            check_order(self.order)
        if self.decoding != "sequential" and self.order not in (None, "raster"):
            raise ValueError(f"decoding={self.decoding!r} verifies drafts in raster order; order={self.order!r} is "
                             "not raster")  # fmt: skip


class AnyOrderAR(RasterAR):
    """`order`: the training order (and the default sampling order); `regions`: PAR's blocks per side. In raster
    order this is RasterAR (with RAR's annealed random orders when `random_order` is given), except that it can
    sample in another order where the core has target queries (RAR's)."""

    Sampling = AnyOrderSampling

    def __init__(self, order: str = "random", regions: int = 2, random_order=None):
        check_order(order)
        if random_order is not None and order != "raster":
            raise ValueError(f"RAR's annealed random orders end in raster order; order={order!r} is not raster")
        super().__init__(random_order)
        self.order, self.regions = order, regions
        if order == "par":
            grid_order(order, regions, regions)  # refuse a bad regions setting now; the grid is checked at use

    def orders(self, name: str, batch: int, grid_size: int, device: torch.device, rand) -> torch.Tensor:
        """(batch, L) generation orders: a fixed order for every sample, or `rand`'s uniforms argsorted (random)."""
        if name == "random":
            return rand(batch, grid_size * grid_size).argsort(dim=-1)  # (B, L) uniform permutations
        return grid_order(name, grid_size, self.regions).to(device).expand(batch, -1)

    def train_inputs(self, tokens: torch.Tensor, draws: Draws):
        if self.order == "raster":
            return super().train_inputs(tokens, draws)
        order = self.orders(self.order, tokens.shape[0], math.isqrt(tokens.shape[1]), tokens.device, draws.rand)
        tokens = tokens.gather(1, order)  # (B, L) in the order generated
        return tokens[:, :-1], order, tokens

    def validation(self, core, head, tokens, labels, draws) -> dict[str, torch.Tensor]:
        """Raster: RasterAR's (loss and next-token accuracy); another order: the loss in the training order (random:
        the validation step's own permutations), true labels."""
        if self.order == "raster":
            return super().validation(core, head, tokens, labels, draws)
        return {"loss": self.loss(core, head, tokens, labels, draws)["loss"]}

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings: AnyOrderSampling,
               generator: torch.Generator | None = None, num_tokens: int | None = None, decode_step=None,
               cache_dtype: torch.dtype | None = None, stats: dict | None = None, neighbours=None,
               drafter=None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> ids (B, L) at raster positions, generated in `settings.order` (default: the training
        order). Raster is RasterAR's loop (partial decoding and SJD there); another order needs the core's target
        queries."""
        name = getattr(settings, "order", None) or self.order
        if name == "raster":
            return super().sample(core, head, labels, guidance, settings, generator, num_tokens, decode_step,
                                  cache_dtype, stats, neighbours, drafter)  # fmt: skip
        if core.target_pos is None:
            raise ValueError(f"order={name!r}: sampling in an order other than raster needs a core trained with "
                             "target-position queries (an any-order or RAR model); this one was trained raster only "
                             "(sample with order: raster)")  # fmt: skip
        if num_tokens is not None:
            raise ValueError(f"num_tokens={num_tokens}: partial decoding is raster's; order={name!r} fills the grid")
        device = labels.device
        order = self.orders(name, labels.shape[0], core.grid_size, device,
                            lambda *shape: torch.rand(*shape, generator=generator, device=device))  # fmt: skip
        return self.sample_in_order(core, head, labels, guidance, settings, order, generator, cache_dtype)

    def sample_in_order(self, core, head, labels: torch.Tensor, guidance: Guidance, settings, order: torch.Tensor,
                        generator: torch.Generator | None = None,
                        cache_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """labels (B,), order (B, L) -> ids (B, L) at raster positions: token i generated at grid position
        order[:, i], by a KV-cached step whose slot i - 1 queries target order[:, i]."""
        B, L, P, device = labels.shape[0], core.num_tokens, core.cls_token_num, labels.device
        rows, order2 = guidance.rows(labels), guidance.twice(order)  # (B',), (B', L)
        core.setup_caches(rows.shape[0], cache_dtype or next(core.parameters()).dtype)
        try:
            tokens = head.token_buffer(B, L, device)  # (B, L) in the order generated
            for i in range(L):
                if i == 0:
                    states = core.prefill_hidden(rows, target=order2[:, 0])  # (B', 1, C)
                else:
                    slot = torch.full((1,), P + i - 1, device=device)  # token i - 1 sits at slot P + i - 1
                    states = core.decode_hidden(guidance.twice(tokens[:, i - 1 : i].clone()), slot,
                                                order2[:, i - 1 : i], order2[:, i : i + 1])  # fmt: skip  # (B', 1, C)
                tokens[:, i : i + 1] = head.sample(states, guidance, settings, generator, i / L)
        finally:
            core.clear_caches()
        return torch.empty_like(tokens).scatter_(1, order, tokens)  # (B, L) at raster positions
