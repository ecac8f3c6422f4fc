"""LlamaGen's released weights in lit_ar: its VQ tokenizer and class-conditional GPT as lit_ar checkpoints.

    python -m lit_ar.released_weights --vq_ckpt vq_ds16_c2i.pt --gpt_ckpt c2i_B_256.pt --gpt_preset GPT-B \\
        --output runs/released/llamagen_B_256

writes `tokenizer.ckpt` (a TokenizerSystem, preset `llamagen_vq16`), `generator.ckpt` (a CausalARSystem that
names that tokenizer; its weights only, no training state) and `generator.yaml` (its model settings). `load_system`
reads the checkpoints like those of any lit_ar run, and `lit_ar predict|test` run them with the model settings
stacked on a causal config (lit_ar builds the model from the config, and the data gives the classes and image size):

    lit_ar predict --config configs/causal/llamagen_shapes.yaml --config runs/released/llamagen_B_256/generator.yaml \\
        --ckpt_path runs/released/llamagen_B_256/generator.ckpt --data.dataset imagefolder \\
        --data.data_dir /data/imagenet/train --data.image_size 256

The weights are renamed, never changed: lit_ar's tokenizer and GPT presets are LlamaGen's layouts (same parameter
counts, the tokenizer's taming-style downsampling padding, LlamaGen's zeroed RoPE on the class prefix), and
tests/test_released_weights.py checks codes, decoded images and logits against LlamaGen's own code.

Files are read with `torch.load(weights_only=True)`; the only object allowed beyond tensors and containers is
`argparse.Namespace`, which LlamaGen's training scripts store beside the weights.
"""

import argparse
import re
from pathlib import Path

import torch

# LlamaGen's GPT (autoregressive/models/gpt.py) -> lit_ar's CausalTransformer: names only
GPT_RENAMES = (
    (r"^cls_embedding\.embedding_table\.", "cls_embedding."),
    (r"^layers\.(\d+)\.attention\.", r"layers.\1.attn."),
    (r"^layers\.(\d+)\.feed_forward\.", r"layers.\1.mlp."),
    (r"^layers\.(\d+)\.attention_norm\.", r"layers.\1.norm1."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"layers.\1.norm2."),
)
RES_RENAMES = {"nin_shortcut": "skip"}  # a ResBlock's 1x1 skip conv; norm1/conv1/norm2/conv2 keep their names


def read_weights(path: str, setting: str) -> dict[str, torch.Tensor]:
    """The state dict in a LlamaGen checkpoint file: the file itself, or its "model", "module" or "state_dict"
    entry (what LlamaGen's sample scripts accept)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{setting}={path!r}: no such file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "module", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"{setting}={path!r} holds no state dict (looked for the file itself, 'model', 'module' and "
                     "'state_dict')")  # fmt: skip


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


def _conv_blocks(weights: dict[str, torch.Tensor], part: str) -> dict[int, dict]:
    """{level: {"res": n, "attn": n, "resample": "downsample" | "upsample" | None}} of LlamaGen's encoder or decoder."""
    levels: dict[int, dict] = {}
    for name in weights:
        m = re.match(rf"^{part}\.conv_blocks\.(\d+)\.(res|attn|downsample|upsample)\.(\d+)?", name)
        if m:
            level = levels.setdefault(int(m[1]), {"res": 0, "attn": 0, "resample": None})
            if m[2] in ("res", "attn"):
                level[m[2]] = max(level[m[2]], int(m[3]) + 1)
            else:
                level["resample"] = m[2]
    return levels


def _block(weights: dict, source: str, target: str, out: dict) -> None:
    """One ResBlock or AttnBlock from `source.` in LlamaGen's names to `target.` in lit_ar's: an attention block's
    q, k and v 1x1 convs become lit_ar's one qkv conv (out channels [q; k; v])."""
    names = {n[len(source) + 1 :] for n in weights if n.startswith(source + ".")}
    if {"q.weight", "k.weight", "v.weight"} <= names:
        for kind in ("weight", "bias"):
            out[f"{target}.qkv.{kind}"] = torch.cat([weights[f"{source}.{p}.{kind}"] for p in "qkv"])
            out[f"{target}.proj.{kind}"] = weights[f"{source}.proj_out.{kind}"]
            out[f"{target}.norm.{kind}"] = weights[f"{source}.norm.{kind}"]
        return
    for name in names:
        layer, kind = name.split(".")
        out[f"{target}.{RES_RENAMES.get(layer, layer)}.{kind}"] = weights[f"{source}.{name}"]


def llamagen_vq_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen VQ weights (tokenizer/tokenizer_image/vq_model.py) -> the state dict of lit_ar's Autoencoder, less
    its codebook-usage buffer (LlamaGen's own usage counter is dropped). LlamaGen keeps each level's blocks in
    lists (res, attn, down/upsample); lit_ar runs them as one sequence, in the same order: res 0, attn 0, res 1, ...,
    then the resampling conv."""
    out = {
        "quantizer.codebook.weight": weights["quantize.embedding.weight"],
        **{
            f"{conv}.{kind}": weights[f"{conv}.{kind}"]
            for conv in ("quant_conv", "post_quant_conv")
            for kind in ("weight", "bias")
        },  # fmt: skip
    }
    for part, sequence, resample in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        for kind in ("weight", "bias"):
            out[f"{part}.conv_in.{kind}"] = weights[f"{part}.conv_in.{kind}"]
        for i in range(3):  # ResBlock, AttnBlock, ResBlock in both
            _block(weights, f"{part}.mid.{i}", f"{part}.mid.{i}", out)
        index = 0
        levels = _conv_blocks(weights, part)
        for level in sorted(levels):
            blocks = levels[level]
            for j in range(blocks["res"]):
                _block(weights, f"{part}.conv_blocks.{level}.res.{j}", f"{part}.{sequence}.{index}", out)
                index += 1
                if j < blocks["attn"]:
                    _block(weights, f"{part}.conv_blocks.{level}.attn.{j}", f"{part}.{sequence}.{index}", out)
                    index += 1
            if blocks["resample"] == resample:
                conv = f"{part}.{sequence}.{index}" + (".conv" if part == "decoder" else "")
                for kind in ("weight", "bias"):
                    out[f"{conv}.{kind}"] = weights[f"{part}.conv_blocks.{level}.{resample}.conv.{kind}"]
                index += 1
        norm, conv = ("out.0", "out.2") if part == "encoder" else ("norm_out", "conv_out")
        for kind in ("weight", "bias"):
            out[f"{part}.{norm}.{kind}"] = weights[f"{part}.norm_out.{kind}"]
            out[f"{part}.{conv}.{kind}"] = weights[f"{part}.conv_out.{kind}"]
    return out


def save_system(system, path: Path) -> Path:
    """A Lightning checkpoint of `system` (its hyperparameters and weights), written whole or not at all, that names
    its class as a checkpoint of `lit_ar fit` does, so that `lit_ar predict|test --ckpt_path` rebuild it from the
    checkpoint's own settings."""
    import lightning as L

    from lit_ar.checkpoints import SafeCheckpointIO

    system.hparams["_class_path"] = f"lit_ar.systems.{type(system).__name__}"
    system.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        plugins=[SafeCheckpointIO()])  # fmt: skip
    trainer.strategy.connect(system)
    trainer.save_checkpoint(path, weights_only=True)  # settings and weights: there is no training state
    return path


def write_llamagen_checkpoints(
    vq_ckpt: str,
    gpt_ckpt: str,
    output: str,
    gpt_preset: str = "GPT-B",
    image_size: int = 256,
    num_classes: int = 1000,
    tokenizer_settings: dict | None = None,
    generator_settings: dict | None = None,
) -> tuple[Path, Path]:
    """LlamaGen's VQ and GPT checkpoint files -> `output`/tokenizer.ckpt and `output`/generator.ckpt.
    `tokenizer_settings` and `generator_settings` add to or override the systems' settings (the defaults are
    LlamaGen's VQ-16 and its c2i GPT with class dropout 0.1, LlamaGen's training value, which also lets it sample
    with CFG)."""
    from lit_ar.systems.causal_ar import CausalARSystem
    from lit_ar.systems.tokenizer import TokenizerSystem

    vq_weights = llamagen_vq_state_dict(read_weights(vq_ckpt, "vq_ckpt"))
    gpt_weights = llamagen_gpt_state_dict(read_weights(gpt_ckpt, "gpt_ckpt"))
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    vq16 = {"quantizer": "vq", "preset": "llamagen_vq16", "l2_norm": True}
    tokenizer = TokenizerSystem(
        image_size=image_size, num_classes=num_classes, **{**vq16, **(tokenizer_settings or {})}
    )
    load_strictly(tokenizer.autoencoder, vq_weights, "vq_ckpt", vq_ckpt, skip=("quantizer.codebook.steps_since_used",))
    tokenizer_path = save_system(tokenizer, folder / "tokenizer.ckpt")
    generator = CausalARSystem(**{"tokenizer_ckpt": str(tokenizer_path), "preset": gpt_preset, "image_size": image_size,
                                  "num_classes": num_classes, "prefix_rope": "zero", "class_dropout": 0.1,
                                  **(generator_settings or {})})  # fmt: skip
    load_strictly(generator.model, gpt_weights, "gpt_ckpt", gpt_ckpt)
    generator_path = save_system(generator, folder / "generator.ckpt")
    write_model_config(generator, folder / "generator.yaml")
    return tokenizer_path, generator_path


def write_model_config(system, path: Path) -> Path:
    """The `model:` section that rebuilds `system`, to stack on a causal config: `lit_ar` builds the model from the
    config, not from the checkpoint's saved settings, and LlamaGen's prefix RoPE has no weights by which a
    checkpoint check could tell it apart. The linked settings (image size, channels, classes) come from `data`."""
    import yaml

    linked = ("image_size", "channels", "num_classes")
    init_args = {k: v for k, v in system.hparams.items() if not k.startswith("_") and k not in linked}
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in init_args.items()}
    ckpt = path.with_suffix(".ckpt")
    header = (
        f"# Written by `python -m lit_ar.released_weights`: the model of {ckpt.name}. Stack it on a causal config:\n"
        f"#   lit_ar predict --config configs/causal/llamagen_shapes.yaml --config {path} --ckpt_path {ckpt} "
        "--data.* ...\n"
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
            f"{unexpected[:5]}, other shapes {shapes[:5]} (at most five of each); pick the preset the weights were "
            "trained with (gpt_preset for the GPT; the VQ is VQ-16)"
        )
    module.load_state_dict({**module.state_dict(), **weights}, strict=True)


def main(args: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description="LlamaGen's released VQ and c2i GPT weights as lit_ar checkpoints.")
    parser.add_argument("--vq_ckpt", required=True, help="LlamaGen VQ checkpoint, e.g. vq_ds16_c2i.pt")
    parser.add_argument("--gpt_ckpt", required=True, help="LlamaGen c2i GPT checkpoint, e.g. c2i_B_256.pt")
    parser.add_argument("--gpt_preset", default="GPT-B", help="its size: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL")
    parser.add_argument("--image_size", type=int, default=256, help="256 or 384, as the GPT was trained")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--output", required=True, help="folder for tokenizer.ckpt and generator.ckpt")
    a = parser.parse_args(args)
    paths = write_llamagen_checkpoints(a.vq_ckpt, a.gpt_ckpt, a.output, a.gpt_preset, a.image_size, a.num_classes)
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


if __name__ == "__main__":
    main()
