"""CausalARSystem: LlamaGen / RAR training and sampling over a frozen discrete tokenizer.

Training: next-token cross-entropy over the L = grid**2 tokens of an image, the label dropped to the null class with
probability `class_dropout` (for CFG); with `rar`, each sample is trained in a random order with probability r,
annealed from 1 to 0 between `rar_anneal_start` and `rar_anneal_end` (RAR's schedule). Sampling: prefill the class
prefix into a static KV cache, then L - 1 one-token decode steps with fixed shapes (compiled with fullgraph when
`compile`), CFG by batch doubling with a schedule over tokens, temperature, top-k and top-p, seeded by a generator.
"""

from typing import Literal

import torch
import torch.nn.functional as F

from lit_ar.models.causal_ar import PRESETS, CausalTransformer
from lit_ar.sampling import cfg_scale, check_cfg_schedule, check_sampling_args, guide, sample_logits
from lit_ar.systems.generator import GeneratorSystem, compile_blocks_in_place

PresetName = Literal[
    "GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-3B", "GPT-nano", "GPT-micro", "GPT-mini"
]  # fmt: skip


class CausalARSystem(GeneratorSystem):
    def __init__(
        self,
        preset: PresetName = "GPT-nano",
        vocab_size: int | None = None,
        grid_size: int | None = None,
        dim: int | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_kv_head: int | None = None,
        cls_token_num: int = 1,
        token_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        drop_path: float = 0.0,
        qk_norm: bool = False,
        prefix_rope: Literal["identity", "zero"] = "identity",
        rar: bool = False,
        rar_anneal_start: int = 0,
        rar_anneal_end: int = 0,
        **kwargs,
    ):
        """
        Args:
            preset: Transformer size: LlamaGen's GPT-B (111M with 1000 classes and vocab 16384), GPT-L, GPT-XL,
                GPT-XXL, GPT-XXXL, GPT-3B, or a CPU size GPT-nano (dim 64, 2 layers), GPT-micro (128, 4), GPT-mini
                (256, 6).
            vocab_size: Token vocabulary; taken from the tokenizer (must agree when both are set). Needed without
                a tokenizer (training from a token cache).
            grid_size: Side of the token grid (L = grid_size**2 tokens); taken from the tokenizer like vocab_size.
            dim: Overrides the preset's width.
            n_layer: Overrides the preset's depth.
            n_head: Overrides the preset's number of attention heads.
            n_kv_head: Grouped-query attention: number of key/value heads (null: as many as n_head).
            cls_token_num: Class-prefix tokens per label (LlamaGen's class-conditional models use 1).
            token_dropout: Dropout on the input embeddings (LlamaGen: 0.1).
            resid_dropout: Dropout on each attention and MLP output (LlamaGen: 0.1).
            drop_path: Largest stochastic-depth rate (grows linearly over the layers).
            qk_norm: RMS-normalise queries and keys per head.
            prefix_rope: Rotation of the class prefix: `identity` (the class token attends like any token) or
                `zero` (LlamaGen's table, which zeroes the prefix's queries and keys; use it to load LlamaGen weights).
            rar: RAR: train in random orders with target-aware position embeddings (sampling stays raster).
            rar_anneal_start: RAR: training step until which every sample gets a random order (r = 1).
            rar_anneal_end: RAR: step from which every sample is raster (r = 0); r falls linearly in between.
        """
        super().__init__(**kwargs)
        if not 0 <= rar_anneal_start <= rar_anneal_end:
            raise ValueError(
                f"model.init_args.rar_anneal_start={rar_anneal_start} and rar_anneal_end={rar_anneal_end} must "
                "satisfy 0 <= start <= end"
            )
        vocab_size, grid_size = self._resolve_tokens(vocab_size, grid_size)
        sizes = dict(PRESETS[preset])
        sizes.update({k: v for k, v in dict(dim=dim, n_layer=n_layer, n_head=n_head).items() if v is not None})
        self.model = CausalTransformer(
            vocab_size, grid_size, self.hparams.num_classes, **sizes, n_kv_head=n_kv_head, cls_token_num=cls_token_num,
            prefix_rope=prefix_rope, qk_norm=qk_norm, token_dropout=token_dropout, resid_dropout=resid_dropout,
            drop_path=drop_path, target_aware=rar,
        )  # fmt: skip
        if self.hparams.compile:
            compile_blocks_in_place(self.model.layers)
        self._compiled_decode = None

    def _resolve_tokens(self, vocab_size: int | None, grid_size: int | None) -> tuple[int, int]:
        """The token vocabulary and grid: the tokenizer's, checked against any value set in the config."""
        tok, path = self.tokenizer, self.hparams.tokenizer_ckpt
        if tok is None:
            if vocab_size is None or grid_size is None:
                raise ValueError(
                    "model.init_args.vocab_size and model.init_args.grid_size must be set when no "
                    "model.init_args.tokenizer_ckpt is given"
                )
            return vocab_size, grid_size
        if tok.is_continuous or tok.vocab_size is None:
            raise ValueError(
                f"model.init_args.tokenizer_ckpt={path} is a continuous tokenizer; CausalARSystem models discrete "
                "tokens (use a VQ, FSQ or LFQ tokenizer)"
            )
        if getattr(tok, "scales", None):
            raise ValueError(
                f"model.init_args.tokenizer_ckpt={path} is a multi-scale tokenizer (scales {tuple(tok.scales)}); "
                "CausalARSystem models one token grid (use ScaleARSystem)"
            )
        for name, mine, theirs in (("vocab_size", vocab_size, tok.vocab_size), ("grid_size", grid_size, tok.grid_size)):
            if mine is not None and mine != theirs:
                raise ValueError(
                    f"model.init_args.{name}={mine} disagrees with the tokenizer's {name}={theirs} "
                    f"({path}); leave it unset to take the tokenizer's"
                )
        return tok.vocab_size, tok.grid_size

    # -- training ----------------------------------------------------------------------------------------------
    def rar_ratio(self, step: int) -> float:
        """Probability that a sample is trained in a random order at `step` (0 when not RAR)."""
        h = self.hparams
        if not h.rar or step >= h.rar_anneal_end:
            return 0.0
        if step < h.rar_anneal_start:
            return 1.0
        return 1.0 - (step - h.rar_anneal_start) / (h.rar_anneal_end - h.rar_anneal_start)

    def _step_generator(self, batch_idx: int) -> torch.Generator:
        # Seeded by (seed, epoch, batch): the same on every rank and for every world size (see _global_rand).
        key = (torch.initial_seed() * 1_000_003 + self.current_epoch * 100_003 + batch_idx) % 2**63
        return torch.Generator().manual_seed(key)

    def _global_rand(self, g: torch.Generator, batch_size: int, *shape: int) -> torch.Tensor:
        """U(0, 1) noise (batch_size, *shape) for this process's samples: drawn for the whole global batch and cut
        to this rank's rows. The DistributedSampler deals a global batch round-robin (rank r holds its rows r::world),
        so N processes at batch B/N draw exactly what one process draws at batch B (DDP parity of class dropout
        and RAR orders)."""
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        u = torch.rand(batch_size * world, *shape, generator=g)
        return u[rank::world].to(self.device)

    def _tokens_labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens_from_batch(batch)  # (B, L)
        if tokens.ndim != 2 or tokens.shape[1] != self.model.num_tokens:
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not fit the generator's {self.model.grid_size}x"
                f"{self.model.grid_size} grid ({self.model.num_tokens} tokens per image)"
            )
        return tokens, batch["label"]

    def train_inputs(self, batch: dict, batch_idx: int):
        """The training draw: labels dropped, tokens permuted (RAR) -> the fed tokens (B, L - 1), labels (B,), the
        order (B, L) or None (raster), and the targets (B, L)."""
        tokens, labels = self._tokens_labels(batch)
        B, L = tokens.shape
        g = self._step_generator(batch_idx)
        if self.hparams.class_dropout > 0:
            drop = self._global_rand(g, B) < self.hparams.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.hparams.num_classes), labels)
        order = None
        if self.hparams.rar:
            r = self.rar_ratio(self.global_step)
            shuffled = self._global_rand(g, B) < r  # (B,) which samples get a random order
            random_order = self._global_rand(g, B, L).argsort(dim=-1)  # (B, L) uniform random permutations
            raster = torch.arange(L, device=tokens.device).expand(B, L)
            order = torch.where(shuffled[:, None], random_order, raster)  # at r = 0: the raster order everywhere
            tokens = tokens.gather(1, order)  # (B, L) in the order they are predicted
        return tokens[:, :-1], labels, order, tokens

    def train_logits(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward: logits (B, L, V) and targets (B, L) of `train_inputs`' draw."""
        fed, labels, order, targets = self.train_inputs(batch, batch_idx)
        return self.model(fed, labels, order), targets

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        fed, labels, order, targets = self.train_inputs(batch, batch_idx)
        loss = self.token_loss(self.model.hidden(fed, labels, order), targets)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        if self.hparams.rar:
            self.log("train/rar_ratio", self.rar_ratio(self.global_step))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens, labels = self._tokens_labels(batch)
        logits = self.model(tokens[:, :-1], labels)  # raster, true labels: what sampling sees
        self.log("val/loss", F.cross_entropy(logits.flatten(0, 1), tokens.flatten()), sync_dist=True)
        self.log("val/token_acc", (logits.argmax(-1) == tokens).float().mean(), sync_dist=True)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _decode_step_is_cuda_graph(self) -> bool:
        # on CUDA the one-token step is bound by kernel launches: compiled, it replays as a CUDA graph (the static,
        # in-place KV cache keeps every address fixed), as LlamaGen's and gpt-fast's loops do
        return self.hparams.compile and self.device.type == "cuda"

    def _decode_step(self):
        if not self.hparams.compile:
            return self.model.decode_step
        if self._compiled_decode is None:
            mode = "reduce-overhead" if self._decode_step_is_cuda_graph() else "default"
            self._compiled_decode = torch.compile(self.model.decode_step, fullgraph=True, mode=mode)
        return self._compiled_decode

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cfg_schedule: str = "constant",
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_power: float = 1.0,
        use_cache: bool = True,
        num_tokens: int | None = None,
    ) -> torch.Tensor:
        """labels (B,) -> tokens (B, num_tokens) in raster order (num_tokens defaults to the whole grid).

        cfg: guidance scale (1 = off; the batch is doubled with null-class rows when on). cfg_schedule: constant,
        linear (1 -> cfg over the tokens), interval (cfg inside cfg_interval of the tokens, 1 outside) or
        power_cosine (with cfg_power). use_cache=False recomputes the whole prefix at every token (for timing and
        parity checks)."""
        m, L = self.model, self.model.num_tokens
        n = L if num_tokens is None else num_tokens
        check_sampling_args(temperature, top_k, top_p, cfg)
        check_cfg_schedule(cfg_schedule, tuple(cfg_interval))
        labels, cond = self.sampling_labels(labels, cfg)  # (B,), (B,) or (2B,) [labels; null] under CFG
        guided = cfg != 1.0
        if use_cache:
            autocast = torch.is_autocast_enabled(self.device.type)
            dtype = torch.get_autocast_dtype(self.device.type) if autocast else m.output.weight.dtype
            m.setup_caches(cond.shape[0], dtype)
        was_training = m.training
        m.eval()
        # the layers' linear weights cast once for the call (exact; see linears_in_autocast_dtype), except where the
        # decode step is a CUDA graph: the graph holds the weights' addresses, and fresh copies would move them
        cast = [] if self._decode_step_is_cuda_graph() else m.layers
        with self.linears_cast_for_sampling(cast):
            try:
                if use_cache:
                    m.check_decode_length(n)
                elif not 1 <= n <= L:
                    raise ValueError(f"num_tokens={n}: a {m.grid_size}x{m.grid_size} grid holds between 1 and {L} "
                                     "tokens")  # fmt: skip
                step = self._decode_step()
                tokens = labels.new_zeros(labels.shape[0], n)  # (B, n), filled left to right
                slots = torch.arange(m.cls_token_num, m.cls_token_num + n, device=self.device)  # token i sits at P + i
                for i in range(n):
                    if not use_cache:  # the whole prefix again, as a model without a cache must
                        logits = m(tokens[:, :i].repeat(2, 1) if guided else tokens[:, :i], cond)[:, -1]  # (B', V)
                    elif i == 0:
                        logits = m.prefill(cond)
                    else:
                        fed = tokens[:, i - 1 : i].repeat(2 if guided else 1, 1)  # (B', 1), a fresh contiguous tensor
                        logits = step(fed, slots[i - 1 : i].clone())  # (B', V); no host-to-device copy per step
                    if guided:
                        c, u = logits.chunk(2)
                        logits = guide(c, u, cfg_scale(cfg_schedule, cfg, i / L, tuple(cfg_interval), cfg_power))
                    tokens[:, i] = sample_logits(logits, temperature, top_k, top_p, generator)
            finally:
                m.train(was_training)
                m.clear_caches()
        return tokens

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        cfg_schedule: str = "constant",
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_power: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """labels (B,) -> images (B, C, H, W) in [-1, 1]: `generate` the whole grid, then decode it with the
        tokenizer. The settings are those of `generate`."""
        tokens = self.generate(labels, cfg, temperature, top_k, top_p, generator, cfg_schedule, cfg_interval,
                               cfg_power, use_cache)  # fmt: skip
        return self.decode(tokens)
