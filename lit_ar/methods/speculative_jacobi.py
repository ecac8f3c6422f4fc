"""Speculative Jacobi decoding (SJD; Teng et al. 2024): fewer model calls for any causal token model, without
retraining, keeping its sampling distribution at any temperature.

A window of `window` tokens is read per model call: the last accepted token and `window - 1` draft tokens after it.
The call gives the model's distribution p at every window position (each conditioned on the drafts before it). The
drafts are verified left to right with the speculative-sampling rule: draft d_j, drawn from q_j, is accepted with
probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from the residual
norm(max(p_j - q_j, 0)) instead, and the rest of the window is dropped; when every draft is accepted, the token after
them is drawn from p itself. The first draft's p is conditioned on accepted tokens only, so each accepted token has
exactly the model's conditional distribution (Leviathan et al. 2023; Chen et al. 2023). Every call accepts at least
one token; a window of 1 is plain decoding, draw for draw.

The drafts are the Jacobi iteration: a draft whose position the call reached is redrawn from that call's p there (its
q is then that p), one past the call's reach is initialised (`jacobi_init`: uniform random tokens, SJD's, or the
latest accepted token, with q its point mass). Each sequence of the batch accepts its own number of tokens per call
(the KV cache is written per sequence), not the batch's minimum that the official code takes, which loses the gain
above batch 1. Model calls and accepted tokens are counted per sequence (`stats`).

LANTERN's relaxed acceptance (Jang et al. 2025; `acceptance: lantern`): image tokens whose codes lie close in the
tokenizer's latent space are nearly interchangeable, so a draft d is tested against p(d) plus the mass p gives d's
nearest codes (the `lantern_k` nearest by code-vector distance, the longest run of them, nearest first, whose total
mass stays <= `lantern_delta`); at a rejection the residual leaves those pooled codes out of q. Each token's target
then moves by at most `lantern_delta` in total variation (reported as `tvd_bound`); delta 0 is SJD, draw for draw.

Speculative decoding with a trained drafter (`decoding: speculative`; LANTERN's drafter, EAGLE's design,
lit_ar/models/drafter.py): the same verification, but the window - 1 drafts come from the drafter, one after the
other, each from the target's last verified state or the drafter's own prediction of it, with q the drafter's
(guided, filtered) distribution. After each call the drafter reads the pairs (target state, token) the call
verified, so its next drafts start from exact target states. Acceptance is strict or LANTERN's, as for SJD.
"""

import torch
import torch.nn.functional as F

from lit_ar.guidance import Guidance
from lit_ar.sampling import filter_logits, gumbel_noise

JACOBI_INITS = ("uniform", "last_token")


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor,
                  pooled_mass: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The speculative-sampling test: p, q (B, K, V) the target's and the drafts' distributions, drafts (B, K), u
    (B, K) uniforms in [0, 1) -> how many leading drafts each sequence accepts (B,), in 0..K. A draft is accepted
    when u < p(d) / q(d) (q(d) > 0: d was drawn from q); LANTERN adds its neighbours' `pooled_mass` (B, K) to p(d)."""
    p_d, q_d = p.gather(-1, drafts[..., None])[..., 0], q.gather(-1, drafts[..., None])[..., 0]  # (B, K)
    if pooled_mass is not None:
        p_d = p_d + pooled_mass
    accepted = u * q_d < p_d  # strict: a draft the target gives probability 0 is never accepted
    return accepted.long().cumprod(dim=1).sum(dim=1)  # (B,) length of the accepted run


def pooled_neighbours(p: torch.Tensor, drafts: torch.Tensor, neighbours: torch.Tensor, delta: float):
    """LANTERN's latent proximity: p (B, K, V), drafts (B, K), neighbours (V, k) (each code's nearest others, nearest
    first) -> each draft's neighbours (B, K, k), which of them are pooled (B, K, k) (the longest nearest-first run
    whose mass under p is <= delta) and the pooled mass (B, K)."""
    near = neighbours[drafts]  # (B, K, k)
    total = p.gather(-1, near).cumsum(-1)  # (B, K, k) nondecreasing
    pooled = total <= delta
    return near, pooled, (total * pooled).amax(-1)


class LatentNeighbours:
    """Every code's nearest other codes by the euclidean distance of the tokenizer's code vectors (V, d): the
    codebook of a VQ tokenizer, FSQ's level grid, LFQ's bits. `__call__(k)` -> (V, k) indices, nearest first,
    computed once per k in chunks of rows (a 16k vocabulary needs no V x V matrix at once)."""

    def __init__(self, codes):
        """`codes`: the code vectors (V, d), or a function giving them (read at the first call only)."""
        self._codes, self._k, self._table = codes, None, None

    @property
    def codes(self) -> torch.Tensor:
        if callable(self._codes):
            self._codes = self._codes()
        return self._codes.float()

    def __call__(self, k: int) -> torch.Tensor:
        V = self.codes.shape[0]
        k = min(k, V - 1)
        if self._k != k:
            rows = []
            for start in range(0, V, 1024):
                d = torch.cdist(self.codes[start : start + 1024], self.codes)  # (n, V)
                d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = float("inf")  # not itself
                rows.append(d.topk(k, dim=-1, largest=False).indices)
            self._k, self._table = k, torch.cat(rows)
        return self._table


def draw(log_weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max over unnormalised log-weights (..., V) -> ids (...), noise from `generator`."""
    return torch.argmax(log_weights + gumbel_noise(log_weights.shape, generator, log_weights.device), dim=-1)


@torch.no_grad()
def speculative_jacobi_sample(core, head, labels: torch.Tensor, guidance: Guidance, settings,
                              generator: torch.Generator | None = None, num_tokens: int | None = None,
                              progress_after_token: bool = False, cache_dtype: torch.dtype | None = None,
                              stats: dict | None = None, neighbours: LatentNeighbours | None = None,
                              drafter=None) -> torch.Tensor:  # fmt: skip
    """labels (B,) -> ids (B, n) in raster order, by SJD (or, with `decoding: speculative`, the trained `drafter`'s
    drafts) over a causal core's raster-decoding protocol and the categorical head. `settings`: `RasterSampling`
    (window, jacobi_init, acceptance and LANTERN's k and delta, cfg and its schedule, temperature, top_k, top_p).
    `neighbours`: the tokenizer's code neighbours (LANTERN). `stats`, when given, receives per-sequence
    `model_calls` (B,) and `tokens_per_call` (B,), and LANTERN's `tvd_bound`."""
    L, P, W = core.num_tokens, core.cls_token_num, settings.window
    if settings.decoding == "speculative" and drafter is None:
        raise ValueError("decoding='speculative' drafts with a trained drafter, and this model has none: train "
                         "one with model.init_args.drafter=true (or decode with decoding='sjd', which needs "
                         "none)")  # fmt: skip
    drafter = drafter if settings.decoding == "speculative" else None
    n = L if num_tokens is None else num_tokens
    table = None
    if settings.acceptance == "lantern":
        if neighbours is None:
            raise ValueError("acceptance='lantern' pools probability over neighbouring codes of the tokenizer's "
                             "codebook, and this generator has none: set model.init_args.tokenizer_ckpt")  # fmt: skip
        table = neighbours(settings.lantern_k).to(labels.device)  # (V, k)
    B, device = labels.shape[0], labels.device
    rows = guidance.rows(labels)  # (B,) or (2B,) [labels; null]
    # the guidance scale of each position: the CFG schedule's progress at token i is (i [+ 1]) / L, as raster's
    scales = torch.tensor([guidance.scale_at(min(i + progress_after_token, L) / L) for i in range(n + W)],
                          device=device)  # fmt: skip  # (n + W,)

    def target_logits(states: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """States (B', K, C) at window positions first + 0..K-1 -> guided, filtered logits (B, K, V) in fp32."""
        logits = head.logits(states)  # (B', K, V)
        if guidance.active:
            scale = scales[(first[:, None] + torch.arange(logits.shape[1], device=device)).clamp(max=n + W - 1)]
            logits = guidance.combine(logits, scale=scale[..., None])  # (B, K, V)
        else:
            logits = guidance.combine(logits)
        return filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)

    def propose(states: torch.Tensor, first: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter's window - 1 drafts: it reads the verified pairs j = first + i (the target's states (B', K, C)
        predicting token j, and token j), then drafts from its output at pair a (B,) on -> q (B, W-1, V), drafts
        (B, W-1) at positions first + a + 1 ...."""
        pos = (first[:, None] + torch.arange(states.shape[1], device=device)).clamp(max=spare)  # (B, K)
        twice = guidance.twice
        out = drafter(states, core.tok_embeddings(twice(tokens.gather(1, pos))), twice(core.rope[P + pos.clamp(
            max=L - 1)]), input_pos=twice(pos))  # fmt: skip  # (B', K, C)
        g = out[torch.arange(out.shape[0], device=device), twice(a)]  # (B', C): predicts token first + a + 1
        qs, drafts = [], []
        for m in range(W - 1):
            at = (first + a + 1 + m).clamp(max=spare)  # (B,) the draft's position
            logits = target_logits(g[:, None], at)[:, 0]  # (B, V)
            qs.append(logits.softmax(-1))
            drafts.append(draw(logits, generator))
            if m < W - 2:  # the drafter's own pair (its predicted state, the draft) predicts the next one
                rope = twice(core.rope[P + at.clamp(max=L - 1)])[:, None]
                g = drafter(g[:, None], core.tok_embeddings(twice(drafts[-1]))[:, None], rope,
                            input_pos=twice(at)[:, None])[:, 0]  # fmt: skip
        return torch.stack(qs, 1), torch.stack(drafts, 1)

    # a window past the last token reads cache slots past the grid; their predictions are discarded
    core.setup_caches(rows.shape[0], cache_dtype or next(core.parameters()).dtype, max_seq_len=P + n + W - 1)
    if drafter is not None:
        drafter.setup_caches(rows.shape[0], n + W, cache_dtype or next(drafter.parameters()).dtype, device)
    try:
        core.check_decode_length(n)
        tokens = torch.zeros(B, n + W, dtype=torch.long, device=device)  # accepted tokens, then drafts, then spare
        spare = n + W - 1  # where finished sequences write, unread
        # token 0 from the prefix, as raster decoding draws it
        prefill = core.prefill_hidden(rows)  # (B', 1, C)
        tokens[:, 0] = head.sample(prefill, guidance, settings, generator, progress_after_token / L)[:, 0]
        done = torch.ones(B, dtype=torch.long, device=device)  # (B,) tokens accepted so far
        calls = torch.ones(B, dtype=torch.long, device=device)  # the prefill is a call
        offsets, batch = torch.arange(W, device=device), torch.arange(B, device=device)  # (W,), (B,)
        if W > 1 and drafter is not None:  # the first drafts, at positions 1 .. W-1
            q, tokens[:, 1:W] = propose(prefill, torch.zeros_like(done), torch.zeros_like(done))
        else:
            q = initial_q(settings.jacobi_init, B, W - 1, core.vocab_size, tokens[:, :1], device)  # (B, W-1, V)
            if W > 1:
                tokens[:, 1:W] = draw(q.log(), generator)  # (B, W-1)
        while bool((done < n).any()):
            active = done < n  # (B,)
            window = done[:, None] - 1 + offsets  # (B, W) positions read: the last accepted token, then the drafts
            # past the grid the RoPE and target are the last position's: those outputs are discarded
            grid, target = window.clamp(max=L - 1), (window + 1).clamp(max=L - 1)  # (B, W)
            states = core.decode_hidden(*map(guidance.twice, (tokens.gather(1, window), P + window, grid, target)))
            logits = target_logits(states, done)  # (B, W, V): window index i predicts position done + i
            p = logits.softmax(-1)  # (B, W, V)
            if W > 1:
                u = torch.rand(B, W - 1, generator=generator, device=device)  # (B, W-1)
                drafts, mass = tokens.gather(1, window[:, 1:]), None  # (B, W-1)
                if table is not None:
                    near, pooled, mass = pooled_neighbours(p[:, :-1], drafts, table, settings.lantern_delta)
                a = accept_drafts(p[:, :-1], q, drafts, u, mass)  # (B,) drafts accepted
            else:
                a = torch.zeros(B, dtype=torch.long, device=device)
            # the token after the accepted drafts: from the residual at a rejection, from p when all were accepted
            p_a, q_a = p[batch, a], F.pad(q, (0, 0, 0, 1))[batch, a]  # (B, V); q is 0 past the drafts
            if table is not None and W > 1:  # LANTERN: the rejected draft's pooled codes leave q
                r = a.clamp(max=W - 2)
                q_a = q_a.scatter(-1, near[batch, r], q_a.gather(-1, near[batch, r]) * ~pooled[batch, r])
            residual = (p_a - q_a).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)  # p = q: nothing was rejected
            log_target = torch.where((a < W - 1)[:, None], residual.log(), logits[batch, a])  # (B, V)
            token = draw(log_target, generator)  # (B,)
            put = torch.where(active, done + a, spare)  # the accepted drafts already sit at done .. done + a - 1
            tokens[batch, put] = torch.where(active, token, tokens[batch, put])
            calls += active.long()
            verified_from = done
            done = torch.where(active, done + a + 1, done).clamp(max=n)
            if W > 1 and drafter is not None:  # the drafter's next drafts, from the states this call verified
                q, drafts = propose(states, verified_from, a)
                at = (done[:, None] + offsets[:-1]).clamp(max=spare)  # (B, W-1)
                tokens.scatter_(1, at, torch.where(active[:, None] & (at < n), drafts, tokens.gather(1, at)))
            elif W > 1:  # the next drafts: redrawn from this call's p where it reached, initialised past it
                src = a[:, None] + 1 + offsets[:-1]  # (B, W-1) window index of each next draft's position
                q_next = p.gather(1, src.clamp(max=W - 1)[..., None].expand(-1, -1, p.shape[-1]))  # (B, W-1, V)
                q_init = initial_q(settings.jacobi_init, B, W - 1, p.shape[-1], tokens.gather(1, done[:, None] - 1),
                                   device)  # fmt: skip
                q = torch.where((src < W)[..., None], q_next, q_init)
                at = (done[:, None] + offsets[:-1]).clamp(max=spare)  # (B, W-1) the next drafts' positions
                drafts = torch.where(active[:, None] & (at < n), draw(q.log(), generator), tokens.gather(1, at))
                tokens.scatter_(1, at, drafts)
    finally:
        core.clear_caches()
        if drafter is not None:
            drafter.clear_caches()
    if stats is not None:
        stats["model_calls"] = calls
        stats["tokens_per_call"] = n / calls.float()
        if table is not None:
            stats["tvd_bound"] = settings.lantern_delta
    return tokens[:, :n]


def initial_q(kind: str, batch: int, k: int, vocab: int, last: torch.Tensor, device) -> torch.Tensor:
    """The distribution (batch, k, vocab) of drafts at positions no call has reached: uniform (SJD's random
    initialisation), or a point mass at the latest accepted token `last` (batch, 1)."""
    if kind == "uniform":
        return torch.full((batch, k, vocab), 1.0 / vocab, device=device)
    if kind == "last_token":
        return torch.zeros(batch, k, vocab, device=device).scatter_(-1, last[:, :, None].expand(-1, k, 1), 1.0)
    raise ValueError(f"jacobi_init={kind!r} is not known; known: {JACOBI_INITS}")
