"""LPD: locality-aware parallel decoding (Zhang et al. 2025, "Locality-aware Parallel Decoding for Efficient
Autoregressive Image Generation"; mit-han-lab/lpd) over a causal core with position queries.

Generation is in G groups of sizes g_1 .. g_G (sum L); a group's tokens are predicted at once, each by a *position
query*: the core's one mask-query embedding plus the target's embedding, rotated (RoPE) by the target position. The
training sequence for tokens t (in a random order per sample, from the step's Draws) is
    [prefix] [t of groups 1 .. G-1] [queries of groups 1 .. G]          (P + 2L - g_G slots)
under a block mask: the fed tokens of group j see the prefix and the fed tokens of groups <= j (a group's tokens,
generated together, see each other); the queries of group g see the prefix, the fed tokens of groups < g and the
other queries of group g (intra-group visibility), and no fed token sees a query. The cross-entropy is taken at every
query. Each training step draws one group-size schedule (`train_steps`: one step count of the list, the sizes by
`schedule`), so one model samples at any of those step counts.

Sampling: one model call per group on the static KV cache (P + L slots): the tokens of the group generated last
(the prefix, first) are written at their slots, and the next group's queries at the slots those tokens will take,
which the next call overwrites; then the group's tokens are sampled from the query states. The order is LPD's
locality-aware one (`lpd_order`: each group's positions close to what is generated, far from each other), random
or raster. One token per group is sequential decoding in that order; cached decoding equals the full forward.
"""

from dataclasses import dataclass
from typing import Literal

import torch

from lit_ar.draws import Draws
from lit_ar.guidance import Guidance
from lit_ar.methods.arpg import ARPGSampling
from lit_ar.methods.base import Method
from lit_ar.sampling import tokens_to_reveal

LPD_ORDERS = ("lpd", "random", "raster")


def lpd_order(grid_size: int, counts: list[int], batch: int, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu", proximity: float = 1.0,
              repulsion: int = 1) -> torch.Tensor:  # fmt: skip
    """LPD's locality-aware order (orders/lpd_order.py of mit-han-lab/lpd), one per sample: (batch, L) raster
    positions, group after group of sizes `counts`.

    A cell's proximity is the sum of 1 / distance over the generated cells among its 8 neighbours. Each group first
    takes candidates in falling proximity (ties in random order) whose proximity reaches `proximity`, skipping one
    within Chebyshev distance `repulsion` of a cell the group already took; the rest of the group is farthest-point
    sampling among the remaining cells, away from the group's cells (a random first cell when it has none)."""
    G, L = grid_size, grid_size * grid_size
    if sum(counts) != L or min(counts) < 1:
        raise ValueError(f"group sizes {counts} must be >= 1 and sum to the {L} tokens of a {G}x{G} grid")
    cells = torch.arange(L, device=device)
    dr = (cells[:, None] // G - cells[None] // G).abs()
    dc = (cells[:, None] % G - cells[None] % G).abs()
    chebyshev, distance = torch.maximum(dr, dc), (dr.square() + dc.square()).float().sqrt()  # (L, L)
    weight = torch.where((chebyshev == 1), 1.0 / distance.clamp(min=1.0), torch.zeros_like(distance))  # (L, L)
    rows = torch.arange(batch, device=device)
    generated = torch.zeros(batch, L, dtype=torch.bool, device=device)
    order = torch.empty(batch, L, dtype=torch.long, device=device)
    done = 0
    for n in counts:
        score = generated.float() @ weight  # (B, L) proximity to the generated cells
        noise = torch.rand(batch, L, generator=generator, device=device)  # breaks ties (scores differ by >= 0.12)
        key = torch.where(generated, torch.full_like(score, -1.0), score + 0.01 * noise)
        ranked = key.argsort(dim=1, descending=True)  # (B, L)
        group = torch.zeros(batch, L, dtype=torch.bool, device=device)  # the cells this group took
        taken = torch.zeros(batch, dtype=torch.long, device=device)
        for r in range(int((score.masked_fill(generated, 0) >= proximity).sum(1).max())):  # proximity-based picks
            cand = ranked[:, r]  # (B,)
            near = (chebyshev[cand] <= repulsion) & group  # (B, L)
            ok = (score[rows, cand] >= proximity) & ~generated[rows, cand] & (taken < n) & ~near.any(1)
            group[rows[ok], cand[ok]] = True
            order[rows[ok], done + taken[ok]] = cand[ok]
            taken += ok.long()
        for _ in range(n - int(taken.min())):  # farthest-point sampling for the rest
            free = ~(generated | group)
            far = torch.where(group[:, None, :], distance, torch.full_like(distance, float("inf"))).amin(-1)  # (B, L)
            far = torch.where(group.any(1, keepdim=True), far, torch.zeros_like(far))  # none yet: a random cell
            key = torch.where(free, far + 0.01 * torch.rand(batch, L, generator=generator, device=device), -1.0)
            cand, ok = key.argmax(1), taken < n
            group[rows[ok], cand[ok]] = True
            order[rows[ok], done + taken[ok]] = cand[ok]
            taken += ok.long()
        generated |= group
        done += n
    return order


def group_layout(counts: list[int], P: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training sequence's block mask (S, S) (True = may attend), S = P + 2L - g_G, and the slots of the queries
    (L,): prefix slots causal; fed tokens of group j (1 .. G-1) see groups <= j; queries of group g see fed groups < g
    and their own group's queries."""
    L, G = sum(counts), len(counts)
    group = torch.repeat_interleave(torch.arange(1, G + 1, device=device), torch.tensor(counts, device=device))
    kind = torch.cat([torch.zeros(P, dtype=torch.long, device=device), torch.ones(L - counts[-1], dtype=torch.long,
                      device=device), torch.full((L,), 2, device=device)])  # fmt: skip  # 0 prefix, 1 fed, 2 query
    level = torch.cat([torch.zeros(P, dtype=torch.long, device=device), group[: L - counts[-1]], group])
    slot = torch.arange(kind.shape[0], device=device)
    q_kind, k_kind, q_level, k_level = kind[:, None], kind[None], level[:, None], level[None]
    mask = (k_kind == 0) & ((q_kind != 0) | (slot[None] <= slot[:, None]))  # the prefix, causally within itself
    mask |= (k_kind == 1) & (q_kind == 1) & (k_level <= q_level)  # fed tokens: their own group and earlier ones
    mask |= (k_kind == 1) & (q_kind == 2) & (k_level < q_level)  # queries: the fed groups before theirs
    mask |= (k_kind == 2) & (q_kind == 2) & (k_level == q_level)  # and their own group's queries
    return mask, slot[-L:]


@dataclass
class LPDSampling(ARPGSampling):
    """Sampling settings of LPD: ARPG's steps and group schedule (LPD's default: cosine), and the order."""

    schedule: Literal["arccos", "cosine", "linear", "power", "sigmoid"] = "cosine"
    """Group sizes over the steps (small first): cosine (LPD's: its 20 group sizes for 256 tokens within two
    tokens), arccos, linear, power or sigmoid mask schedules."""
    order: Literal["lpd", "random", "raster"] = "lpd"
    """Generation order: lpd (locality-aware, LPD's), random (a uniform permutation per sample) or raster."""
    proximity: float = 1.0
    """lpd order: the proximity a cell needs to be taken before farthest-point sampling (LPD's 1)."""
    repulsion: int = 1
    """lpd order: cells of one group stay more than this Chebyshev distance apart while proximity picks them."""

    def __post_init__(self):
        super().__post_init__()
        if self.order not in LPD_ORDERS:
            raise ValueError(f"order={self.order!r} is not an LPD order; known: {', '.join(LPD_ORDERS)}")


class LPD(Method):
    Sampling = LPDSampling

    def __init__(self, train_steps: list[int], schedule: str = "cosine"):
        self.train_steps, self.schedule = list(train_steps), schedule

    @staticmethod
    def check_core(core) -> None:
        if getattr(core, "mask_query", None) is None:
            raise ValueError("LPD needs a core with position queries (CausalTransformer position_queries=True)")

    def sequence(self, core, tokens: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, counts: list[int]):
        """Tokens (B, L) at raster positions in `order` (B, L) -> the fed embeddings (B, S, C), their RoPE
        (B, S, hd/2, 2), the block mask (S, S), the query slots (L,) and the targets (B, L) in the order."""
        B, L, P = tokens.shape[0], core.num_tokens, core.cls_token_num
        fed_len = L - counts[-1]
        targets = tokens.gather(1, order)  # (B, L)
        queries, query_rope = core.queries(order)  # (B, L, C), (B, L, hd/2, 2)
        x = torch.cat([core.prefix(labels), core.tok_embeddings(targets[:, :fed_len]), queries], 1)  # (B, S, C)
        rope = torch.cat([core.prefix_rope(B), core.rope[P + order[:, :fed_len]], query_rope], 1)
        mask, query_slots = group_layout(counts, P, tokens.device)
        return x, rope, mask, query_slots, targets

    def loss(self, core, head, tokens: torch.Tensor, labels: torch.Tensor, draws: Draws) -> dict[str, torch.Tensor]:
        self.check_core(core)
        B, L = tokens.shape
        steps = self.train_steps[int(draws.shared_rand(1).item() * len(self.train_steps))]  # one schedule a step
        counts = tokens_to_reveal(self.schedule, L, steps)
        order = draws.rand(B, L).argsort(dim=-1)  # (B, L) a uniform random order per sample
        x, rope, mask, query_slots, targets = self.sequence(core, tokens, labels, order, counts)
        states = core.run_layers(x, rope, mask)[:, query_slots]  # (B, L, C): query i predicts token i of the order
        return {"loss": head.loss(states, targets, draws)}

    def order(self, core, settings: LPDSampling, counts: list[int], batch: int, generator, device) -> torch.Tensor:
        L = core.num_tokens
        if settings.order == "lpd":
            return lpd_order(core.grid_size, counts, batch, generator, device, settings.proximity, settings.repulsion)
        if settings.order == "random":
            return torch.rand(batch, L, generator=generator, device=device).argsort(dim=-1)
        return torch.arange(L, device=device).expand(batch, L)

    @torch.no_grad()
    def sample(self, core, head, labels: torch.Tensor, guidance: Guidance, settings: LPDSampling,
               generator: torch.Generator | None = None, order: torch.Tensor | None = None,
               cache_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        """labels (B,) -> ids (B, L) at raster positions in `steps` model calls; `order` (B, L) overrides the
        settings' order."""
        self.check_core(core)
        B, L, P, device = labels.shape[0], core.num_tokens, core.cls_token_num, labels.device
        counts = tokens_to_reveal(settings.schedule, L, settings.steps or max(1, L // 4))  # refuses bad steps
        order = self.order(core, settings, counts, B, generator, device) if order is None else order
        rows, order2 = guidance.rows(labels), guidance.twice(order)  # (B',), (B', L)
        tokens = head.token_buffer(B, L, device)  # (B, L) in the order generated
        if settings.use_cache:
            core.setup_caches(rows.shape[0], cache_dtype or next(core.parameters()).dtype, max_seq_len=P + L)
        try:
            prev = done = 0  # the previous call sampled order positions prev .. done - 1
            for n in counts:
                if settings.use_cache:
                    states = self.decode(core, guidance.twice(tokens[:, prev:done]), rows, order2, prev, done, n)
                else:  # the full training forward; the mask keeps this group's queries from what is not sampled
                    so_far = guidance.twice(torch.empty_like(tokens).scatter_(1, order, tokens))  # (B', L) raster
                    x, rope, mask, query_slots, _ = self.sequence(core, so_far, rows, order2, counts)
                    states = core.run_layers(x, rope, mask)[:, query_slots[done : done + n]]
                tokens[:, done : done + n] = head.sample(states, guidance, settings, generator, (done + n) / L)
                prev, done = done, done + n
        finally:
            if settings.use_cache:
                core.clear_caches()
        return torch.empty_like(tokens).scatter_(1, order, tokens)  # (B, L) at raster positions

    @staticmethod
    def decode(core, fed: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, prev: int, done: int,
               n: int) -> torch.Tensor:  # fmt: skip
        """One model call: the tokens sampled last (B', done - prev) (the prefix when done = 0) written at their
        cache slots, each seeing its group and everything before; then the queries of order positions done ..
        done + n - 1 at the slots those tokens will take, seeing the fed tokens and each other -> states (B', n, C)."""
        P, B = core.cls_token_num, rows.shape[0]
        queries, query_rope = core.queries(order[:, done : done + n])  # (B', n, C), (B', n, hd/2, 2)
        if done == 0:
            x, rope = core.prefix(rows), core.prefix_rope(B)  # (B', P, C)
            upto = torch.arange(P, device=rows.device)  # the prefix, causally
        else:
            x, rope = core.tok_embeddings(fed), core.rope[P + order[:, prev:done]]
            upto = torch.full((done - prev,), P + done - 1, device=rows.device)  # its group and everything before
        x = torch.cat([x, queries], 1)
        rope = torch.cat([rope, query_rope], 1)
        start = 0 if done == 0 else P + prev
        slots = torch.arange(start, P + done + n, device=rows.device)  # (T,)
        upto = torch.cat([upto, torch.full((n,), P + done + n - 1, device=rows.device)])  # queries see each other
        return core.decode_block(x, slots, rope, upto)[:, -n:]
