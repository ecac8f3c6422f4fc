"""Released LlamaGen, VAR and MAR weights in lit_ar: their tokenizers and class-conditional generators as lit_ar
checkpoints.

    python -m lit_ar.released_weights llamagen --vq_ckpt vq_ds16_c2i.pt --gpt_ckpt c2i_B_256.pt \\
        --output runs/released/llamagen_B_256
    python -m lit_ar.released_weights var --vae_ckpt vae_ch160v4096z32.pth --var_ckpt var_d16.pth \\
        --output runs/released/var_d16
    python -m lit_ar.released_weights mar --vae_ckpt kl16.ckpt --mar_ckpt mar_base/checkpoint-last.pth \
        --output runs/released/mar_base
    python -m lit_ar.released_weights mar-kl --vae_ckpt kl16.ckpt --output runs/released/mar_kl16

write `tokenizer.ckpt` (a TokenizerSystem: preset `llamagen_vq16`, `var_msvq16` or `mar_kl16`) and, but for `mar-kl`
(the tokenizer alone), `generator.ckpt` (a CausalARSystem, ScaleARSystem or FlowARSystem with MAR's diffusion head,
that names that tokenizer; weights only, no training state) and `generator.yaml` (its model settings).
`load_system` reads the checkpoints like those of any lit_ar run; `lit_ar predict|test` run them with the model
settings stacked on a config of the family (lit_ar builds the model from the config, and the data gives the classes
and image size), and `lit_ar fit` with `init_weights` fine-tunes them:

    lit_ar predict --config configs/causal/llamagen_shapes.yaml --config runs/released/llamagen_B_256/generator.yaml \\
        --ckpt_path runs/released/llamagen_B_256/generator.ckpt --data.dataset labels --data.classes 1000 \\
        --data.image_size 256

The weights are renamed (and VAR's AdaLN chunks reordered), never changed: lit_ar's presets are the peers' layouts
(the same parameter counts, taming's downsampling padding, LlamaGen's zeroed RoPE on the class prefix, VAR's 3x3
quant convs and shared Phi convs), and tests/test_released_weights.py checks codes, decoded images and logits
against outputs of the peers' own code.

Files are read with `torch.load(weights_only=True)`; the only object allowed beyond tensors and containers is
`argparse.Namespace`, which LlamaGen's training scripts store beside the weights.
"""

import argparse
import re
from pathlib import Path

import lightning as L
import torch
import yaml

from lit_ar.checkpoints import SafeCheckpointIO
from lit_ar.models.causal_ar import PRESETS as GPT_PRESETS
from lit_ar.systems import CausalARSystem, FlowARSystem, ScaleARSystem, TokenizerSystem

# LlamaGen's GPT (autoregressive/models/gpt.py) -> lit_ar's CausalTransformer: names only
GPT_RENAMES = (
    (r"^cls_embedding\.embedding_table\.", "cls_embedding."),
    (r"^layers\.(\d+)\.attention\.", r"layers.\1.attn."),
    (r"^layers\.(\d+)\.feed_forward\.", r"layers.\1.mlp."),
    (r"^layers\.(\d+)\.attention_norm\.", r"layers.\1.norm1."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"layers.\1.norm2."),
)
# LlamaGen's guidance scale for its FID figures, per GPT size (its README's sampling commands; top-k and top-p off)
LLAMAGEN_FID_CFG = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
# a ResBlock's 1x1 skip conv and an attention block's output conv; norm1/conv1/norm2/conv2/norm/qkv keep their names
BLOCK_RENAMES = {"nin_shortcut": "skip", "proj_out": "proj"}


def read_weights(path: str, setting: str, keys: tuple[str, ...] = ("model", "module", "state_dict")) -> dict:
    """The state dict in a peer's checkpoint file: the file itself (VAR's), or its first entry of `keys` that holds one
    (LlamaGen's and MAR's KL-VAE use "model", LlamaGen's sample scripts accept all three; MAR's generators keep their
    EMA weights, which MAR evaluates, under "model_ema")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{setting}={path!r}: no such file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in keys:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"{setting}={path!r} holds no state dict (looked for the file itself and the entries {keys})")


def llamagen_gpt_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen GPT weights -> the state dict of lit_ar's CausalTransformer (with prefix_rope="zero")."""
    out = {}
    for name, tensor in weights.items():
        if name == "freqs_cis":  # a table lit_ar computes, not a weight
            continue
        for pattern, replacement in GPT_RENAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


# Where LlamaGen's VQ and taming-transformers' layout (VAR's VQVAE, MAR's KL-16) keep the parts of one conv autoencoder:
# the lists of each resolution level, a level's ResBlocks, the middle blocks, and the order of the decoder's levels
# (LlamaGen numbers them in running order, taming by resolution, so its decoder runs them from the highest index).
LLAMAGEN_LAYOUT = {"levels": {"encoder": "conv_blocks", "decoder": "conv_blocks"}, "res": "res",
                   "mid": ("mid.0", "mid.1", "mid.2"), "decoder_from_highest": False}  # fmt: skip
TAMING_LAYOUT = {"levels": {"encoder": "down", "decoder": "up"}, "res": "block",
                 "mid": ("mid.block_1", "mid.attn_1", "mid.block_2"), "decoder_from_highest": True}  # fmt: skip


def _levels(weights: dict[str, torch.Tensor], prefix: str, res: str) -> dict[int, dict]:
    """{level: {"res": n, "attn": n, "resample": "downsample" | "upsample" | None}} of the lists under `prefix`."""
    levels: dict[int, dict] = {}
    for name in weights:
        m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.({res}|attn|downsample|upsample)\.(\d+)?", name)
        if m:
            level = levels.setdefault(int(m[1]), {"res": 0, "attn": 0, "resample": None})
            if m[2] in (res, "attn"):
                kind = "res" if m[2] == res else "attn"
                level[kind] = max(level[kind], int(m[3]) + 1)
            else:
                level["resample"] = m[2]
    return levels


def _block(weights: dict, source: str, target: str, out: dict) -> None:
    """One ResBlock or AttnBlock from `source.` in the peer's names to `target.` in lit_ar's. An attention block's
    separate q, k and v 1x1 convs (LlamaGen) become lit_ar's one qkv conv (out channels [q; k; v]); taming's is one
    already."""
    names = {n[len(source) + 1 :] for n in weights if n.startswith(source + ".")}
    if not names:
        raise KeyError(f"the weights have no block {source!r}")
    if {"q.weight", "k.weight", "v.weight"} <= names:
        for kind in ("weight", "bias"):
            out[f"{target}.qkv.{kind}"] = torch.cat([weights[f"{source}.{p}.{kind}"] for p in "qkv"])
        names -= {f"{p}.{kind}" for p in "qkv" for kind in ("weight", "bias")}
    for name in names:
        layer, kind = name.split(".")
        out[f"{target}.{BLOCK_RENAMES.get(layer, layer)}.{kind}"] = weights[f"{source}.{name}"]


def conv_autoencoder_state_dict(weights: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    """The encoder, decoder and 1x1/3x3 quant convs of a LlamaGen or taming-style autoencoder -> lit_ar's
    Autoencoder names. The peers keep each level's blocks in lists (ResBlocks, attention blocks, the resampling
    conv); lit_ar runs them as one sequence, in the same order: res 0, attn 0, res 1, ..., then the resampling conv."""
    out = {f"{conv}.{kind}": weights[f"{conv}.{kind}"] for conv in ("quant_conv", "post_quant_conv")
           for kind in ("weight", "bias")}  # fmt: skip
    for part, sequence, resample in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        for kind in ("weight", "bias"):
            out[f"{part}.conv_in.{kind}"] = weights[f"{part}.conv_in.{kind}"]
        for i, name in enumerate(layout["mid"]):  # ResBlock, AttnBlock, ResBlock in both
            _block(weights, f"{part}.{name}", f"{part}.mid.{i}", out)
        prefix = f"{part}.{layout['levels'][part]}"
        levels = _levels(weights, prefix, layout["res"])
        order = sorted(levels, reverse=part == "decoder" and layout["decoder_from_highest"])
        index = 0
        for level in order:
            blocks = levels[level]
            for j in range(blocks["res"]):
                _block(weights, f"{prefix}.{level}.{layout['res']}.{j}", f"{part}.{sequence}.{index}", out)
                index += 1
                if j < blocks["attn"]:
                    _block(weights, f"{prefix}.{level}.attn.{j}", f"{part}.{sequence}.{index}", out)
                    index += 1
            if blocks["resample"] == resample:
                conv = f"{part}.{sequence}.{index}" + (".conv" if part == "decoder" else "")
                for kind in ("weight", "bias"):
                    out[f"{conv}.{kind}"] = weights[f"{prefix}.{level}.{resample}.conv.{kind}"]
                index += 1
        norm, conv = ("out.0", "out.2") if part == "encoder" else ("norm_out", "conv_out")
        for kind in ("weight", "bias"):
            out[f"{part}.{norm}.{kind}"] = weights[f"{part}.norm_out.{kind}"]
            out[f"{part}.{conv}.{kind}"] = weights[f"{part}.conv_out.{kind}"]
    return out


def llamagen_vq_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen VQ weights (tokenizer/tokenizer_image/vq_model.py) -> the state dict of lit_ar's Autoencoder, less
    its codebook-usage buffer (LlamaGen's own usage counter is dropped)."""
    return {"quantizer.codebook.weight": weights["quantize.embedding.weight"],
            **conv_autoencoder_state_dict(weights, LLAMAGEN_LAYOUT)}  # fmt: skip


def var_vae_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAR's multi-scale VQVAE weights (models/vqvae.py, basic_vae.py, quant.py) -> the state dict of lit_ar's
    Autoencoder with the msvq quantizer (its shared Phi convs in order), less the codebook-usage buffers."""
    phis = {f"quantizer.phis.{m[1]}.{m[2]}": v for k, v in weights.items()
            if (m := re.match(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$", k))}  # fmt: skip
    if not phis:
        raise KeyError("the weights have no quantize.quant_resi.qresi_ls (VAR's shared Phi convs)")
    return {"quantizer.codebook.weight": weights["quantize.embedding.weight"], **phis,
            **conv_autoencoder_state_dict(weights, TAMING_LAYOUT)}  # fmt: skip


def mar_kl_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAR's KL-16 weights (models/vae.py, LDM's KL-VAE) -> the state dict of lit_ar's Autoencoder with the kl
    bottleneck (its latent scale is a setting, not a weight)."""
    return conv_autoencoder_state_dict(weights, TAMING_LAYOUT)


# VAR's transformer (models/var.py, basic_var.py) -> lit_ar's ScaleTransformer
VAR_RENAMES = (
    (r"^blocks\.(\d+)\.attn\.mat_qkv\.", r"blocks.\1.attn.wqkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.wo."),
    (r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.mlp."),
    (r"^blocks\.(\d+)\.ada_lin\.", r"blocks.\1.ada."),
    (r"^head_nm\.ada_lin\.", "head_nm.ada."),
)
# VAR's AdaLN chunks are (gamma1, gamma2, scale1, scale2, shift1, shift2); lit_ar's Block reads (shift1, scale1,
# gate1, shift2, scale2, gate2): lit_ar's chunk i is VAR's chunk VAR_BLOCK_ADA[i]. Its head reads (shift, scale),
# VAR's (scale, shift).
VAR_BLOCK_ADA, VAR_HEAD_ADA = (4, 2, 0, 5, 3, 1), (1, 0)


def _reorder_chunks(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    chunks = t.chunk(len(order), dim=0)  # along the output rows of the linear (its bias too)
    return torch.cat([chunks[i] for i in order])


def var_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAR transformer weights -> the state dict of lit_ar's ScaleTransformer (cosine attention, per-block AdaLN)."""
    if any(k.startswith("shared_ada_lin.") for k in weights):
        raise ValueError("these VAR weights share one AdaLN linear across blocks (shared_aln); VAR's released d16 to "
                         "d30 do not, and lit_ar imports those only")  # fmt: skip
    out = {}
    for name, tensor in weights.items():
        # buffers lit_ar builds itself: level ids, the block-causal mask, the zero key bias
        if name in ("lvl_1L", "attn_bias_for_masking") or name.endswith(".zero_k_bias"):
            continue
        if name.endswith(".attn.scale_mul_1H11"):  # (1, H, 1, 1) -> (H, 1, 1), the same log-scale
            out[name.replace("scale_mul_1H11", "logit_scale")] = tensor.reshape(-1, 1, 1)
            continue
        for pattern, replacement in VAR_RENAMES:
            name = re.sub(pattern, replacement, name)
        if re.match(r"^blocks\.\d+\.ada\.1\.", name):
            tensor = _reorder_chunks(tensor, VAR_BLOCK_ADA)
        elif name.startswith("head_nm.ada.1."):
            tensor = _reorder_chunks(tensor, VAR_HEAD_ADA)
        out[name] = tensor
    return out


# MAR's generator (models/mar.py, models/diffloss.py) -> lit_ar's MARTransformer ("core.") and DiffusionHead ("head.")
MAR_RENAMES = (
    (r"^encoder_pos_embed_learned$", "core.enc_pos"),
    (r"^decoder_pos_embed_learned$", "core.dec_pos"),
    (r"^diffusion_pos_embed_learned$", "core.head_pos"),
    (r"^(encoder|decoder)_blocks\.(\d+)\.attn\.qkv\.", r"\1_blocks.\2.attn.wqkv."),
    (r"^(encoder|decoder)_blocks\.(\d+)\.attn\.proj\.", r"\1_blocks.\2.attn.wo."),
    (r"^encoder_blocks\.", "encoder."),
    (r"^decoder_blocks\.", "decoder."),
    (r"^encoder_norm\.", "enc_norm."),
    (r"^decoder_norm\.", "dec_norm."),
    (r"^decoder_embed\.", "dec_embed."),
    (r"^(?!diffloss\.|core\.)", "core."),
    (r"^diffloss\.net\.res_blocks\.(\d+)\.in_ln\.", r"head.blocks.\1.norm."),
    (r"^diffloss\.net\.res_blocks\.(\d+)\.adaLN_modulation\.", r"head.blocks.\1.ada."),
    (r"^diffloss\.net\.res_blocks\.", "head.blocks."),
    (r"^diffloss\.net\.final_layer\.adaLN_modulation\.", "head.final.ada."),
    (r"^diffloss\.net\.final_layer\.", "head.final."),
    (r"^diffloss\.net\.", "head."),
)
# MAR's attention heads per width (mar_base, mar_large, mar_huge): the one size its weights do not show
MAR_HEADS = {768: 12, 1024: 16, 1280: 16}
# MAR's FID sampling per width (its README: 256 AR steps, 100 DDPM steps, linear CFG 2.9 / 3.0 / 3.2, temperature 1)
MAR_FID_CFG = {768: 2.9, 1024: 3.0, 1280: 3.2}


def mar_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAR generator weights -> the state dict of a FlowARSystem's core and diffusion head. MAR keeps the null class
    (its `fake_latent`) apart from the class table; lit_ar's is the table's last row."""
    out = {}
    for name, tensor in weights.items():
        if name == "fake_latent":
            continue
        if name == "class_emb.weight":
            tensor = torch.cat([tensor, weights["fake_latent"]])
        for pattern, replacement in MAR_RENAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor
    return out


def save_system(system, path: Path) -> Path:
    """A Lightning checkpoint of `system` (its hyperparameters and weights), written whole or not at all, that names
    its class as a checkpoint of `lit_ar fit` does, so that `lit_ar predict|test --ckpt_path` rebuild it from the
    checkpoint's own settings."""
    system.hparams["_class_path"] = f"lit_ar.systems.{type(system).__name__}"
    system.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        plugins=[SafeCheckpointIO()])  # fmt: skip
    trainer.strategy.connect(system)
    trainer.save_checkpoint(path, weights_only=True)  # settings and weights: there is no training state
    return path


def _count(weights: dict[str, torch.Tensor], pattern: str) -> int:
    """How many numbered blocks the weights hold: 1 + the largest index that `pattern`'s group captures."""
    return 1 + max((int(m[1]) for name in weights if (m := re.match(pattern, name))), default=-1)


def write_llamagen_checkpoints(
    vq_ckpt: str,
    gpt_ckpt: str,
    output: str,
    gpt_preset: str | None = None,
    image_size: int = 256,
    num_classes: int = 1000,
    tokenizer_settings: dict | None = None,
    generator_settings: dict | None = None,
) -> tuple[Path, Path]:
    """LlamaGen's VQ and GPT checkpoint files -> `output`/tokenizer.ckpt, generator.ckpt and generator.yaml.
    `gpt_preset` None reads the size from the weights. `tokenizer_settings` and `generator_settings` add to or
    override the systems' settings (the defaults are LlamaGen's VQ-16 and its c2i GPT with class dropout 0.1,
    LlamaGen's training value, which also lets it sample with CFG)."""
    gpt_weights = llamagen_gpt_state_dict(read_weights(gpt_ckpt, "gpt_ckpt"))
    if gpt_preset is None:
        width, layers = gpt_weights["tok_embeddings.weight"].shape[1], _count(gpt_weights, r"^layers\.(\d+)\.")
        sizes = [name for name, p in GPT_PRESETS.items() if (p["dim"], p["depth"]) == (width, layers)]
        if not sizes:
            raise ValueError(f"gpt_ckpt={gpt_ckpt!r} holds a GPT of width {width} and {layers} layers, which no preset "
                             f"has; known sizes: {list(GPT_PRESETS)}")  # fmt: skip
        gpt_preset = sizes[0]
    tokenizer = {"quantizer": "vq", "preset": "llamagen_vq16", "l2_norm": True, **(tokenizer_settings or {})}
    sampling = {"cfg": LLAMAGEN_FID_CFG.get(gpt_preset, 2.0), "temperature": 1.0}  # LlamaGen's FID settings
    generator = {"preset": gpt_preset, "prefix_rope": "zero", "class_dropout": 0.1, "predict_kwargs": sampling,
                 **(generator_settings or {})}  # fmt: skip
    return write_checkpoints(
        output, image_size, num_classes,
        (tokenizer, llamagen_vq_state_dict(read_weights(vq_ckpt, "vq_ckpt")), "vq_ckpt", vq_ckpt),
        (CausalARSystem, generator, gpt_weights, "gpt_ckpt", gpt_ckpt),
        "configs/causal/llamagen_shapes.yaml",
    )  # fmt: skip


def write_var_checkpoints(
    vae_ckpt: str,
    var_ckpt: str,
    output: str,
    depth: int | None = None,
    image_size: int = 256,
    num_classes: int = 1000,
    tokenizer_settings: dict | None = None,
    generator_settings: dict | None = None,
) -> tuple[Path, Path]:
    """VAR's VQVAE and VAR-d{depth} checkpoint files -> `output`/tokenizer.ckpt, generator.ckpt and generator.yaml.
    The defaults are VAR's multi-scale VQVAE (its 10 scales) and VAR's transformer (width 64 * depth, cosine
    attention, per-block AdaLN) with class dropout 0.1, VAR's training value; `depth` None counts the blocks."""
    var_weights = var_state_dict(read_weights(var_ckpt, "var_ckpt"))
    depth = _count(var_weights, r"^blocks\.(\d+)\.") if depth is None else depth
    tokenizer = {"quantizer": "msvq", "preset": "var_msvq16", **(tokenizer_settings or {})}
    # VAR's FID sampling (its README: cfg=1.5, top_p=0.96, top_k=900). VAR ramps the guidance scale linearly from 1 to
    # 1 + cfg over the scales; lit_ar's linear schedule ramps from 1 to cfg, so VAR's cfg=1.5 is lit_ar's 2.5.
    sampling = {"cfg": 2.5, "cfg_schedule": "linear", "top_k": 900, "top_p": 0.96}
    generator = {"depth": depth, "cosine_attn": True, "shared_adaln": False, "class_dropout": 0.1,
                 "predict_kwargs": sampling, **(generator_settings or {})}  # fmt: skip
    return write_checkpoints(
        output, image_size, num_classes,
        (tokenizer, var_vae_state_dict(read_weights(vae_ckpt, "vae_ckpt")), "vae_ckpt", vae_ckpt),
        (ScaleARSystem, generator, var_weights, "var_ckpt", var_ckpt),
        "configs/scale/var_shapes.yaml",
    )  # fmt: skip


def write_mar_checkpoints(
    vae_ckpt: str,
    mar_ckpt: str,
    output: str,
    n_heads: int | None = None,
    image_size: int = 256,
    ema: bool = True,
    latent_scale: float = 0.2325,
    tokenizer_settings: dict | None = None,
    generator_settings: dict | None = None,
) -> tuple[Path, Path]:
    """MAR's KL-16 and a MAR generator's checkpoint files -> `output`/tokenizer.ckpt, generator.ckpt and
    generator.yaml: a FlowARSystem with backbone `mar` and MAR's diffusion head. Sizes and classes are read from the
    weights, but for the attention heads (`n_heads` None: MAR-B's, -L's or -H's by width); `ema` takes the EMA
    weights (MAR's evaluation does) where the file has them. The other settings are MAR's training ones (class
    dropout 0.1, dropouts 0.1, mask ratio from 0.7, diffusion batch multiplier 4), its sampling the README's."""
    keys = ("model_ema", "model") if ema else ("model",)
    weights = mar_state_dict(read_weights(mar_ckpt, "mar_ckpt", keys))
    dim = weights["core.z_proj.weight"].shape[0]
    if weights["core.dec_embed.weight"].shape[0] != dim:
        raise ValueError(f"mar_ckpt={mar_ckpt!r}: a decoder narrower or wider than the encoder is not one of MAR's "
                         "sizes, and lit_ar imports those only")  # fmt: skip
    if n_heads is None and dim not in MAR_HEADS:
        raise ValueError(f"mar_ckpt={mar_ckpt!r} holds a MAR of width {dim}, which is none of MAR's sizes "
                         f"{sorted(MAR_HEADS)}; pass its attention heads (--n_heads)")  # fmt: skip
    seq_len = weights["core.head_pos"].shape[1]
    sampling = {"steps": seq_len, "flow_steps": 100, "cfg": MAR_FID_CFG.get(dim, 3.0), "cfg_schedule": "linear",
                "temperature": 1.0}  # fmt: skip
    generator = {
        "backbone": "mar", "head": "diffusion", "dim": dim, "n_heads": n_heads or MAR_HEADS[dim],
        "depth": _count(weights, r"^core\.encoder\.(\d+)\."),
        "decoder_depth": _count(weights, r"^core\.decoder\.(\d+)\."),
        "buffer_size": weights["core.enc_pos"].shape[1] - seq_len,
        "head_width": weights["head.input_proj.weight"].shape[0],
        "head_depth": _count(weights, r"^head\.blocks\.(\d+)\."), "head_batch_mul": 4, "mask_ratio_min": 0.7,
        "attn_dropout": 0.1, "proj_dropout": 0.1, "class_dropout": 0.1, "predict_kwargs": sampling,
        **(generator_settings or {}),
    }  # fmt: skip
    num_classes = weights["core.class_emb.weight"].shape[0] - 1
    return write_checkpoints(
        output, image_size, num_classes,
        mar_kl_tokenizer(vae_ckpt, latent_scale, tokenizer_settings),
        (FlowARSystem, generator, weights, "mar_ckpt", mar_ckpt),
        "configs/flow/mar_shapes.yaml",
    )  # fmt: skip


def write_mar_kl_checkpoint(
    vae_ckpt: str,
    output: str,
    image_size: int = 256,
    num_classes: int = 1000,
    latent_scale: float = 0.2325,
    tokenizer_settings: dict | None = None,
) -> Path:
    """MAR's KL-16 checkpoint file -> `output`/tokenizer.ckpt, a KL tokenizer whose latents the flow family (MAR,
    FlowAR) trains on; MAR multiplies them by 0.2325, its `latent_scale`."""
    tokenizer = mar_kl_tokenizer(vae_ckpt, latent_scale, tokenizer_settings)
    return write_tokenizer(output, image_size, num_classes, tokenizer)


def mar_kl_tokenizer(vae_ckpt: str, latent_scale: float, tokenizer_settings: dict | None) -> tuple:
    """MAR's KL-16 file as `write_tokenizer` takes it: (settings, weights, setting name, file)."""
    settings = {"quantizer": "kl", "preset": "mar_kl16", "latent_scale": latent_scale, **(tokenizer_settings or {})}
    return settings, mar_kl_state_dict(read_weights(vae_ckpt, "vae_ckpt")), "vae_ckpt", vae_ckpt


def write_tokenizer(output: str, image_size: int, num_classes: int, tokenizer: tuple) -> Path:
    """tokenizer: (TokenizerSystem settings, its autoencoder's weights, setting name, file) -> `output`/tokenizer.ckpt.
    The codebook-usage counter and the latent scale come from the settings, not from the file."""
    settings, weights, setting, path = tokenizer
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    system = TokenizerSystem(image_size=image_size, num_classes=num_classes, **settings)
    load_strictly(system.autoencoder, weights, setting, path,
                  skip=("quantizer.codebook.steps_since_used", "quantizer.scale_factor"))  # fmt: skip
    return save_system(system, folder / "tokenizer.ckpt")


def write_checkpoints(output: str, image_size: int, num_classes: int, tokenizer: tuple, generator: tuple,
                      family_config: str) -> tuple[Path, Path]:  # fmt: skip
    """tokenizer: as `write_tokenizer` takes it; generator: (system class, settings, its core's weights, setting name,
    file). Writes the two checkpoints and the model config."""
    tokenizer_path = write_tokenizer(output, image_size, num_classes, tokenizer)
    folder = tokenizer_path.parent
    system_class, settings, weights, setting, path = generator
    system = system_class(tokenizer_ckpt=str(tokenizer_path), image_size=image_size, num_classes=num_classes,
                          **settings)  # fmt: skip
    # the causal and scale-wise systems' one core is `model`; the flow family's are a core and a head
    flow = not hasattr(system, "model")
    module = torch.nn.ModuleDict({"core": system.core, "head": system.head}) if flow else system.model
    load_strictly(module, weights, setting, path)
    generator_path = save_system(system, folder / "generator.ckpt")
    write_model_config(system, folder / "generator.yaml", family_config)
    return tokenizer_path, generator_path


def write_model_config(system, path: Path, family_config: str) -> Path:
    """The `model:` section that rebuilds `system`, to stack on a config of its family: `lit_ar` builds the model from
    the config, not from the checkpoint's saved settings, and some settings (LlamaGen's prefix RoPE) have no weights
    by which a checkpoint check could tell them apart. The linked settings (image size, channels, classes) come from
    `data`."""
    linked = ("image_size", "channels", "num_classes")
    init_args = {k: v for k, v in system.hparams.items() if not k.startswith("_") and k not in linked}
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in init_args.items()}
    ckpt = path.with_suffix(".ckpt")
    header = (
        f"# Written by `python -m lit_ar.released_weights`: the model of {ckpt.name}. Stack it on a config of its "
        f"family:\n#   lit_ar predict --config {family_config} --config {path} --ckpt_path {ckpt} --data.* ...\n"
    )
    body = {"model": {"class_path": f"lit_ar.systems.{type(system).__name__}", "init_args": init_args}}
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path


def load_strictly(module: torch.nn.Module, weights: dict, setting: str, path: str, skip: tuple[str, ...] = ()) -> None:
    """Load every weight of `module` from `weights`, naming what is missing, unexpected or of another shape."""
    own = {k: v for k, v in module.state_dict().items() if k not in skip}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: file {tuple(weights[k].shape)}, model {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise ValueError(
            f"{setting}={path!r} does not fit the model its settings build: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {shapes[:5]} (at most five of each); pick the size the weights were "
            "trained with (--gpt_preset for LlamaGen's GPT, --depth for VAR, --image_size for MAR; the tokenizers "
            "are VQ-16, VAR's VQVAE and MAR's KL-16)"
        )
    module.load_state_dict({**module.state_dict(), **weights}, strict=True)


def main(args: list[str] | None = None) -> tuple[Path, ...]:
    parser = argparse.ArgumentParser(description="Released LlamaGen, VAR and MAR weights as lit_ar checkpoints.")
    families = parser.add_subparsers(dest="family", required=True)
    llamagen = families.add_parser("llamagen", help="LlamaGen's VQ-16 and a class-conditional GPT")
    llamagen.add_argument("--vq_ckpt", required=True, help="LlamaGen VQ checkpoint, e.g. vq_ds16_c2i.pt")
    llamagen.add_argument("--gpt_ckpt", required=True, help="LlamaGen c2i GPT checkpoint, e.g. c2i_B_256.pt")
    sizes = "its size (GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B); default: read from the weights"
    llamagen.add_argument("--gpt_preset", default=None, help=sizes)
    llamagen.add_argument("--image_size", type=int, default=256, help="256 or 384, as the GPT was trained")
    var = families.add_parser("var", help="VAR's multi-scale VQVAE and a VAR transformer")
    var.add_argument("--vae_ckpt", required=True, help="VAR's VQVAE checkpoint, vae_ch160v4096z32.pth")
    var.add_argument("--var_ckpt", required=True, help="VAR transformer checkpoint, e.g. var_d16.pth")
    var.add_argument(
        "--depth", type=int, default=None, help="its depth (16, 20, 24, 30); default: read from the weights"
    )
    var.add_argument("--image_size", type=int, default=256)
    mar = families.add_parser("mar", help="MAR's KL-16 and a MAR generator (with its diffusion head)")
    mar.add_argument("--vae_ckpt", required=True, help="MAR's KL-VAE checkpoint, kl16.ckpt")
    mar.add_argument("--mar_ckpt", required=True, help="MAR checkpoint, e.g. mar_base/checkpoint-last.pth")
    mar.add_argument("--n_heads", type=int, default=None, help="attention heads; default: MAR-B's, -L's or -H's")
    mar.add_argument("--image_size", type=int, default=256)
    mar.add_argument("--no_ema", action="store_true", help="the trained weights rather than their EMA")
    mar_kl = families.add_parser("mar-kl", help="MAR's KL-16 tokenizer (for the flow family)")
    mar_kl.add_argument("--vae_ckpt", required=True, help="MAR's KL-VAE checkpoint, kl16.ckpt")
    mar_kl.add_argument("--image_size", type=int, default=256)
    mar_kl.add_argument("--latent_scale", type=float, default=0.2325, help="MAR's scale of the latents")
    for family in (llamagen, var, mar_kl):
        family.add_argument("--num_classes", type=int, default=1000)
    for family in (llamagen, var, mar, mar_kl):
        family.add_argument("--output", required=True, help="folder for the checkpoints (and generator.yaml)")
    a = parser.parse_args(args)
    if a.family == "mar-kl":
        path = write_mar_kl_checkpoint(a.vae_ckpt, a.output, a.image_size, a.num_classes, a.latent_scale)
        print(f"wrote {path}")
        return (path,)
    if a.family == "mar":
        paths = write_mar_checkpoints(a.vae_ckpt, a.mar_ckpt, a.output, a.n_heads, a.image_size, not a.no_ema)
    elif a.family == "llamagen":
        paths = write_llamagen_checkpoints(a.vq_ckpt, a.gpt_ckpt, a.output, a.gpt_preset, a.image_size, a.num_classes)
    else:
        paths = write_var_checkpoints(a.vae_ckpt, a.var_ckpt, a.output, a.depth, a.image_size, a.num_classes)
    print(f"wrote {paths[0]}, {paths[1]} and {paths[1].with_suffix('.yaml')}")
    return paths


if __name__ == "__main__":
    main()
