"""A trained tokenizer as the layers above it use it: a TokenizerSystem checkpoint -> its Autoencoder, frozen.

Generators (`model.init_args.tokenizer_ckpt`) and the token cache read tokenizers through `load_tokenizer`. It lives
below the Lightning systems, and reads the checkpoint with plain `torch.load`, so that the data layer (the token
cache) can load a tokenizer without importing `lit_ar.systems`. `lit_ar.systems.tokenizer.TokenizerSystem` trains
what this reads: its settings named in `AUTOENCODER_ARGS` build the Autoencoder, its weights sit under
`autoencoder.` in the state dict.
"""

from pathlib import Path

import torch

from lit_ar.models.autoencoder import Autoencoder

# TokenizerSystem settings that build the Autoencoder (load_tokenizer rebuilds it from a checkpoint's hparams)
AUTOENCODER_ARGS = (
    "image_size", "channels", "quantizer", "preset", "base_channels", "ch_mult", "num_res_blocks", "mid_attention",
    "downsample_padding", "quant_conv_kernel", "double_z", "decoder_level_attention", "z_channels", "codebook_size",
    "latent_dim", "levels", "scales", "beta", "l2_norm", "ema", "ema_decay", "dead_code_steps", "phi_count",
    "phi_ratio", "entropy_weight", "entropy_gamma", "entropy_temperature", "kl_weight", "latent_scale",
)  # fmt: skip


# Settings added when the peers' presets were made to load the peers' weights. A checkpoint saved before they existed
# has none of them, and its autoencoder was built this way, whatever its preset.
BEFORE_PEER_LAYOUTS = {"downsample_padding": "symmetric", "quant_conv_kernel": 1, "double_z": False,
                       "decoder_level_attention": True}  # fmt: skip


def autoencoder_kwargs(hparams) -> dict:
    """TokenizerSystem settings (its hparams, or a checkpoint's) -> the Autoencoder's keyword arguments."""
    kwargs = {k: hparams[k] for k in AUTOENCODER_ARGS if k in hparams}
    if not any(k in hparams for k in BEFORE_PEER_LAYOUTS):
        kwargs.update(BEFORE_PEER_LAYOUTS)
    for k in ("ch_mult", "levels", "scales"):
        if kwargs.get(k) is not None:
            kwargs[k] = tuple(kwargs[k])
    kwargs["latent_scale"] = kwargs.get("latent_scale") or 1.0  # auto: the checkpoint's buffer holds the value
    return kwargs


def load_tokenizer(path: str) -> Autoencoder:
    """A TokenizerSystem checkpoint -> its Autoencoder, frozen (requires_grad False) and in eval mode, on the CPU."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"tokenizer checkpoint {path!r} does not exist (model.init_args.tokenizer_ckpt); train one with "
            "`lit_ar fit --config configs/tokenizer/vq_shapes.yaml` and pass its checkpoints/last.ckpt"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams, state = ckpt.get("hyper_parameters", {}), ckpt.get("state_dict", {})
    if "quantizer" not in hparams or not any(k.startswith("autoencoder.") for k in state):
        raise ValueError(f"{path!r} is not a TokenizerSystem checkpoint (model.init_args.tokenizer_ckpt)")
    autoencoder = Autoencoder(**autoencoder_kwargs(hparams))
    prefix = "autoencoder."
    autoencoder.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return autoencoder.eval().requires_grad_(False)


def code_vectors(tokenizer: Autoencoder) -> torch.Tensor:
    """Every token's code vector (V, d): the codebook of a VQ tokenizer, FSQ's level grid, LFQ's bits. What
    `acceptance: lantern` measures closeness of tokens in; refused for a tokenizer without discrete codes."""
    codes = getattr(tokenizer.quantizer, "code_vectors", None)
    if codes is None:
        raise ValueError(f"acceptance='lantern' needs the code vectors of a discrete tokenizer (vq, fsq or lfq); the "
                         f"{tokenizer.quantizer_type!r} tokenizer has none")  # fmt: skip
    return codes().detach()
