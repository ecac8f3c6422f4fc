"""Performance helpers of the generators, kept out of the systems: in-place compile of transformer blocks, activation
checkpointing, and the autocast cast of linear weights while sampling. Each changes speed or memory, never the
result (tests/test_layers.py, tests/test_autocast_linears.py)."""

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from lit_ar.models.layers import Block


def enable_activation_checkpointing(root: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass instead of storing them (memory for
    compute). Patches the blocks' forward in place, so parameter names and checkpoints are unchanged.
    Returns the number of blocks patched."""
    count = 0
    for module in root.modules():
        if isinstance(module, Block) and not getattr(module, "_activation_checkpointing", False):
            module.forward = functools.partial(_checkpointed_forward, module.forward)
            module._activation_checkpointing = True
            count += 1
    return count


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


# Every family's transformer blocks run one code object (layers.Block.forward), and dynamo keeps at most
# `recompile_limit` graphs per code object (8 by default); past that, a call that fits none of them runs eager. One
# run needs more than 8: training and no-grad validation, sampling with weights cast to the autocast dtype, each with
# MAR's query-only last block or a KV cache. A compiled MAR hit the limit at its first validation, so from then on it
# validated and sampled eager.
BLOCK_RECOMPILE_LIMIT = 64


def compile_blocks_in_place(blocks: Iterable[nn.Module], dynamic: bool | None = None) -> None:
    """`torch.compile` each of `blocks` in place (checkpoint keys keep no `_orig_mod.`), with room in dynamo's
    recompile limit for every variant a run calls. `dynamic=True` compiles for shapes that change from call to call
    from the first compile on, instead of after a first recompile."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(dynamic=dynamic)


@contextlib.contextmanager
def linears_in_autocast_dtype(modules: Iterable[nn.Module], device_type: str) -> Iterator[int]:
    """While sampling under autocast, the nn.Linear weights and biases inside `modules` hold copies in the autocast
    dtype; they get their fp32 tensors back on exit. Yields how many tensors it cast.

    Why: autocast casts a linear's weight to its dtype anyway, so the arithmetic is the same to the bit. Eager
    autocast caches those casts for the length of its context, but a compiled block casts its weights inside its
    graph at every call (VAR-d16 calls its 16 blocks at 10 scales), which these copies spare it, with the same samples
    (`python -m benchmarks.autocast_linears` measures it; benchmarks/RESULTS.md).

    The copies are made at each call, not kept: Lightning's EMA swaps weights in through `.data`, which no version
    counter sees, so a kept copy could go stale unnoticed. It does nothing where it would not be exact or safe:
    autocast off, grad on, FSDP, or parameters that are not plain fp32 tensors. `modules` must run their linears
    under autocast only, not inside an fp32 island. The causal family skips it where its compiled decode step is a
    CUDA graph, which holds its weights' addresses."""
    enabled = torch.is_autocast_enabled(device_type) and not torch.is_grad_enabled()
    dtype = torch.get_autocast_dtype(device_type) if enabled else None
    params = []
    if dtype in (torch.bfloat16, torch.float16):
        submodules = [m for module in modules for m in module.modules()]
        params = [p for m in submodules if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)]
        # FSDP (either version) points parameters at shards or gathered copies itself: no second hand on `.data`
        sharded = any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in submodules)
        if sharded or not all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in params):
            params = []
    originals = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(dtype)
        yield len(params)
    finally:
        for p, data in zip(params, originals):
            p.data = data


def compiled_decode_step(step, cuda_graph: bool):
    """A one-token decode step compiled whole. On CUDA the step is bound by kernel launches, so it replays as a CUDA
    graph (`reduce-overhead`; the static, in-place KV cache keeps every address fixed), as LlamaGen's and
    gpt-fast's loops do."""
    return torch.compile(step, fullgraph=True, mode="reduce-overhead" if cuda_graph else "default")
