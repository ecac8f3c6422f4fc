"""PAR: parallelized autoregressive generation (Wang et al. 2025) over a causal core: the grid is cut into
regions x regions blocks (k = regions**2 of them); the first token of every block is generated one after the other,
then each later step generates one token in every block at once, at the same position inside each block.

The sequence (P prefix slots, L tokens in PAR's order t_0 .. t_{L-1}, lit_ar/methods/any_order.py's `par`):
    [prefix] t_0 .. t_{k-1} M_1 .. M_{k-1} t_k .. t_{L-k-1}          (P + L - 1 slots, as raster's)
and its i-th output from the last prefix slot on predicts t_i: the prefix and t_0 .. t_{k-2} predict the first
tokens one by one (causal); the block [t_{k-1}, M_1 .. M_{k-1}] of the last first token and k - 1 learnable
transition tokens predicts group 1 (one token per region) at once; every later group's block predicts the next group.
Attention is causal over blocks and full inside one (group-wise full attention): what a slot sees is exactly what is
known when its block is fed at sampling. Each slot's target-aware embedding carries the position it predicts; a
transition token M_j is rotated by the position of region j's first token.

Sampling: k sequential calls for the first tokens, then one call per group: L / k - 1 of them (k + L / k - 1 calls in
all; 19 instead of 64 on an 8x8 grid with 2 x 2 regions).
"""

import torch
import torch.nn.functional as F

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.any_order import AnyOrderAR, grid_order


class PAR(AnyOrderAR):
    def __init__(self, regions: int = 2):
        super().__init__("par", regions)
        self.k = regions * regions

    def transition(self, core, batch: int) -> torch.Tensor:
        """The k - 1 learnable transition tokens (batch, k - 1, C) (none with one region: PAR is then raster)."""
        if self.k > 1 and (core.transition is None or core.transition.shape[0] != self.k - 1):
            raise ValueError(f"PAR over {self.regions}x{self.regions} regions needs a core with {self.k - 1} "
                             "transition tokens (CausalTransformer transition_tokens)")  # fmt: skip
        if core.next_rope or core.direction is not None:
            raise ValueError("PAR builds its slots' RoPE and target embeddings itself: a core with next_rope or "
                             "direction embeddings is not supported")  # fmt: skip
        if self.k == 1:
            return core.tok_embeddings.weight.new_zeros(batch, 0, core.dim)
        return core.transition.expand(batch, -1, -1)

    def sequence(self, core, tokens: torch.Tensor, labels: torch.Tensor):
        """Tokens (B, L) at raster positions -> PAR's fed embeddings (B, P + L - 1, C), their RoPE
        (P + L - 1, hd/2, 2), the group-wise mask (P + L - 1, P + L - 1), the order (L,) and the targets (B, L)."""
        B, L = tokens.shape
        P, k, G = core.cls_token_num, self.k, core.grid_size
        order = grid_order("par", G, self.regions).to(tokens.device)  # (L,)
        targets = tokens[:, order]  # (B, L) t_0 .. t_{L-1}
        emb = core.tok_embeddings(targets)  # (B, L, C)
        fed = torch.cat([core.prefix(labels), emb[:, :k], self.transition(core, B), emb[:, k : L - k]], 1)
        positions = torch.cat([order[:k], order[1:k], order[k : L - k]])  # grid position of each fed token
        rope = torch.cat([core.rope[:P], core.rope[P + positions]])  # (P + L - 1, hd/2, 2)
        fed = fed + F.pad(core.target_pos(order), (0, 0, P - 1, 0))  # the slot of output i predicts t_i's position
        # blocks: every prefix slot and t_0 .. t_{k-2} alone; then [t_{k-1}, M_1 .. M_{k-1}]; then each group
        S = P + L - 1
        block = torch.arange(S, device=tokens.device)
        block[P + k - 1 :] = P + k - 1 + torch.arange(S - P - k + 1, device=tokens.device) // k
        mask = block[None, :] <= block[:, None]  # (S, S) a slot sees its block and every block before it
        return fed, rope, mask, order, targets

    def loss(self, core, head, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        fed, rope, mask, _, targets = self.sequence(core, tokens, labels)
        states = core.run_layers(fed, rope, mask)[:, core.cls_token_num - 1 :]  # (B, L, C): output i predicts t_i
        return {"loss": head.loss(states, targets, draws)}

    def validation(self, core, head, tokens, labels, draws) -> dict[str, torch.Tensor]:
        return {"loss": self.loss(core, head, tokens, labels, draws)["loss"]}

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings, generator=None, num_tokens=None,
               decode_step=None, cache_dtype=None, stats=None, neighbours=None,
               drafter=None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> ids (B, L) at raster positions, in k + L / k - 1 model calls."""
        decoding = getattr(settings, "decoding", "sequential")
        if getattr(settings, "order", None) not in (None, "par") or decoding != "sequential":
            raise ValueError("a PAR model (parallel: true) samples in PAR's order and groups only; leave "
                             "predict_kwargs.order null and decoding sequential")  # fmt: skip
        if num_tokens is not None:
            raise ValueError(f"num_tokens={num_tokens}: partial decoding is raster's; PAR's groups fill the grid")
        B, L, P, k, device = labels.shape[0], core.num_tokens, core.cls_token_num, self.k, labels.device
        order = grid_order("par", core.grid_size, self.regions).to(device)  # (L,)
        rows = guidance.rows(labels)  # (B',)
        targets_pos = core.target_pos(order)  # (L, C) the position each output predicts
        core.setup_caches(rows.shape[0], cache_dtype or next(core.parameters()).dtype)
        try:
            tokens = head.token_buffer(B, L, device)  # (B, L) t_0 .. t_{L-1}
            for i in range(k):  # the first token of every region, one call each
                if i == 0:
                    states = core.prefill_hidden(rows, target=order[:1].expand(rows.shape[0]))
                else:
                    slot = torch.full((1,), P + i - 1, device=device)
                    states = core.decode_hidden(guidance.twice(tokens[:, i - 1 : i].clone()), slot,
                                                order[i - 1 : i].expand(rows.shape[0], 1),
                                                order[i : i + 1].expand(rows.shape[0], 1))  # fmt: skip
                tokens[:, i : i + 1] = head.sample(states, guidance, settings, generator, i / L)
            done, slot = k, P + k - 1  # the next group starts at t_k; the next fed block at this slot
            while done < L:
                if done == k:  # the transition block: t_{k-1} and the learnable tokens M_1 .. M_{k-1}
                    x = torch.cat([core.tok_embeddings(guidance.twice(tokens[:, k - 1 : k])),
                                   self.transition(core, rows.shape[0])], 1)  # fmt: skip  # (B', k, C)
                    positions = torch.cat([order[k - 1 : k], order[1:k]])
                else:  # the group generated last
                    x = core.tok_embeddings(guidance.twice(tokens[:, done - k : done]))
                    positions = order[done - k : done]
                x = x + targets_pos[done : done + k].to(x.dtype)  # each slot predicts one token of the next group
                slots = torch.arange(slot, slot + k, device=device)
                states = core.decode_block(x, slots, core.rope[P + positions])  # (B', k, C)
                tokens[:, done : done + k] = head.sample(states, guidance, settings, generator, done / L)
                done, slot = done + k, slot + k
        finally:
            core.clear_caches()
        return torch.empty_like(tokens).scatter_(1, order.expand(B, -1), tokens)  # (B, L) at raster positions
