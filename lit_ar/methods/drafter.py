"""Training LANTERN's drafter (EAGLE's losses, Li et al. 2024; jadohu/LANTERN entrypoints/train_drafter): the target
causal core reads the tokens teacher-forced, frozen, giving its last-layer states g_0 .. g_{L-1} (g_j predicts token
j); the drafter reads the pairs (g_j, x_j), j = 0 .. L-2, and predicts g_{j+1}. Its loss is the feature regression
(smooth L1 to g_{j+1}) plus `p_weight` times the cross-entropy of its draft distribution (the target's head on the
predicted state) against the target's own distribution of token j + 1. Nothing reaches the target's weights: its
states, embeddings and head enter detached. Sampling with the drafter is `decoding: speculative`
(lit_ar/methods/speculative_jacobi.py).
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call


def frozen_logits(core, states: torch.Tensor) -> torch.Tensor:
    """The core's head (final norm, output layer) on `states` (B, T, C) with its weights detached -> logits (B, T, V):
    gradients reach the states, not the target."""
    norm = {k: v.detach() for k, v in core.norm.named_parameters()}
    out = {k: v.detach() for k, v in core.output.named_parameters()}
    return functional_call(core.output, out, (functional_call(core.norm, norm, (states,)),)).float()


def drafter_loss(core, drafter, tokens: torch.Tensor, labels: torch.Tensor,
                 p_weight: float = 0.1) -> dict[str, torch.Tensor]:  # fmt: skip
    """tokens (B, L) in raster order, labels (B,) (with class dropout: the drafter drafts for guided sampling's null
    rows too) -> {"drafter_loss", "drafter_feature_loss", "drafter_token_loss", "drafter_token_acc"}."""
    P, L = core.cls_token_num, tokens.shape[1]
    with torch.no_grad():
        states = core.hidden(tokens[:, :-1], labels)  # (B, L, C): g_0 .. g_{L-1}
        target = core.logits(states[:, 1:]).log_softmax(-1)  # (B, L-1, V): the target's token 1 .. L-1
        embeddings = core.tok_embeddings(tokens[:, :-1])  # (B, L-1, C)
    predicted = drafter(states[:, :-1], embeddings, core.rope[P : P + L - 1])  # (B, L-1, C): g_1 .. g_{L-1}
    feature = F.smooth_l1_loss(predicted.float(), states[:, 1:].float())
    logp = frozen_logits(core, predicted).log_softmax(-1)
    token = -(target.exp() * logp).sum(-1).mean()
    acc = (logp.argmax(-1) == target.argmax(-1)).float().mean()
    return {"drafter_loss": feature + p_weight * token, "drafter_feature_loss": feature, "drafter_token_loss": token,
            "drafter_token_acc": acc}  # fmt: skip
