"""The released-weights import at the released sizes, against the peers' own code: prints a table, --json writes it.

    python -m benchmarks.released_parity --peer-root <folder with LlamaGen/, VAR/ and mar/ checkouts>

For each peer it builds the released model from the unmodified checkout (LlamaGen VQ_16 + GPT_B, VAR's VQVAE +
VAR-d16, MAR's AutoencoderKL(16), MAR-B), moves its random weights off their initialisations, saves them in the
released files' format, imports them with `python -m lit_ar.released_weights`, and compares on one random 256x256
image: codes, decoded image and logits, and greedy (top-k 1) sampling with CFG through both samplers. MAR-B has no
greedy sampling: its row compares the decoder's conditions, the diffusion loss, and a short generation with MAR's
random draws taken from one generator in lit_ar's order. No released file is needed (none can be downloaded here).
The tests run the same comparisons on tiny models (tests/fixtures/). About 3 minutes and 6 GB on a 2-core CPU; MAR's
generator needs timm (run it from an environment where timm imports, see benchmarks/peers.py).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_json
from benchmarks.peers import on_path
from lit_ar.checkpoints import load_system
from lit_ar.released_weights import main as import_weights
from lit_ar.systems.causal_ar import CausalARSystem
from lit_ar.systems.scale_ar import ScaleARSystem
from lit_ar.tokenizers import load_tokenizer


def perturb(*modules: torch.nn.Module) -> None:
    """Move every weight off its zero/unit initialisation, so that a misplaced weight shows in every output."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def llamagen_row(root: Path, work: Path) -> dict:
    on_path(root / CHECKOUTS["llamagen"])
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_B
    from tokenizer.tokenizer_image.vq_model import VQ_16

    vq = VQ_16(codebook_size=16384, codebook_embed_dim=8).eval()
    gpt = GPT_B(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1, model_type="c2i",
                token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)  # fmt: skip
    gpt.cls_embedding.dropout_prob = 0.0  # no label dropout in the teacher-forced forward below
    perturb(vq, gpt)
    torch.save({"model": vq.state_dict()}, work / "vq.pt")
    torch.save({"model": gpt.state_dict()}, work / "gpt.pt")
    tok_path, gen_path = import_weights(["llamagen", "--vq_ckpt", str(work / "vq.pt"), "--gpt_ckpt",
                                         str(work / "gpt.pt"), "--output", str(work / "llamagen")])  # fmt: skip
    image, labels = torch.rand(1, 3, 256, 256) * 2 - 1, torch.tensor([3, 7])
    with torch.no_grad():
        _, _, (_, _, codes) = vq.encode(image)
        codes = codes.view(1, 256)
        decoded = vq.decode_code(codes, shape=(1, 8, 16, 16)).clamp(-1, 1)
        gpt.train()  # LlamaGen's teacher-forced forward (every dropout is 0)
        logits, _ = gpt(idx=codes[:, :-1], cond_idx=labels[:1])
        gpt.eval()
        start = time.perf_counter()
        greedy = generate(gpt, labels, 256, cfg_scale=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                          sample_logits=False).long()  # fmt: skip
        peer_s = time.perf_counter() - start
    tokenizer, generator = load_tokenizer(str(tok_path)), load_system(str(gen_path), CausalARSystem)
    start = time.perf_counter()
    ours = generator.generate(labels, cfg=2.0, top_k=1)
    ours_s = time.perf_counter() - start
    return {"peer": "LlamaGen VQ_16 + GPT_B", "codes equal": f"{int((tokenizer.encode(image) == codes).sum())}/256",
            "decoded max err": max_error(tokenizer.decode(codes), decoded),
            "logits max err": max_error(generator.model(codes[:, :-1], labels[:1]), logits),
            "greedy CFG": f"{int((ours == greedy).sum())}/{greedy.numel()} tokens equal",
            "greedy s (peer, lit_ar)": f"{peer_s:.1f}, {ours_s:.1f}"}  # fmt: skip


def var_row(root: Path, work: Path) -> dict:
    on_path(root / CHECKOUTS["var"])
    from models.var import VAR
    from models.vqvae import VQVAE

    vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4)
    var = VAR(vae, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, norm_eps=1e-6, shared_aln=False,
              cond_drop_rate=0.0, attn_l2_norm=True, flash_if_available=False, fused_if_available=False)  # fmt: skip
    perturb(vae, var)
    vae.eval(), var.eval()
    torch.save(vae.state_dict(), work / "vae.pth")
    torch.save(var.state_dict(), work / "var_d16.pth")
    tok_path, gen_path = import_weights(["var", "--vae_ckpt", str(work / "vae.pth"), "--var_ckpt",
                                         str(work / "var_d16.pth"), "--output", str(work / "var")])  # fmt: skip
    image, labels = torch.rand(1, 3, 256, 256) * 2 - 1, torch.tensor([3, 7])
    with torch.no_grad():
        codes = vae.img_to_idxBl(image)
        decoded = vae.idxBl_to_img(codes, same_shape=True, last_one=True)
        logits = var(labels[:1], vae.quantize.idxBl_to_var_input(codes))
        start = time.perf_counter()
        greedy = var.autoregressive_infer_cfg(2, labels, cfg=1.5, top_k=1, top_p=0.0)  # [0, 1]
        peer_s = time.perf_counter() - start
    tokenizer, generator = load_tokenizer(str(tok_path)), load_system(str(gen_path), ScaleARSystem)
    ours_codes = tokenizer.encode(image)
    equal = sum(int((a == b).sum()) for a, b in zip(ours_codes, codes, strict=True))
    inputs = generator.tokenizer.quantizer.teacher_forcing_inputs(codes)
    start = time.perf_counter()
    ours = (generator.sample(labels, cfg=2.5, cfg_schedule="linear", top_k=1) + 1) / 2  # VAR's cfg c = lit_ar's 1 + c
    ours_s = time.perf_counter() - start
    return {"peer": "VAR VQVAE + VAR-d16", "codes equal": f"{equal}/{sum(c.numel() for c in codes)}",
            "decoded max err": max_error(tokenizer.decode(codes), decoded),
            "logits max err": max_error(generator.model(labels[:1], inputs), logits),
            "greedy CFG": f"images max err {max_error(ours, greedy):.2g}",
            "greedy s (peer, lit_ar)": f"{peer_s:.1f}, {ours_s:.1f}"}  # fmt: skip


def mar_kl_row(root: Path, work: Path) -> dict:
    on_path(root / CHECKOUTS["mar-kl"])
    from models.vae import AutoencoderKL

    vae = AutoencoderKL(16, (1, 1, 2, 2, 4)).eval()
    perturb(vae)
    torch.save({"model": vae.state_dict()}, work / "kl16.ckpt")
    (tok_path,) = import_weights(["mar-kl", "--vae_ckpt", str(work / "kl16.ckpt"), "--output", str(work / "mar")])
    image = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(image)
        decoded = vae.decode(posterior.mean).clamp(-1, 1)
    tokenizer = load_tokenizer(str(tok_path))
    latents = tokenizer.encode(image, sample=False)  # (1, 256, 16), times MAR's 0.2325
    expected = posterior.mean.flatten(2).transpose(1, 2) * 0.2325
    return {"peer": "MAR AutoencoderKL(16)", "codes equal": f"latents max err {max_error(latents, expected):.2g}",
            "decoded max err": max_error(tokenizer.decode(latents), decoded)}  # fmt: skip


def mar_row(root: Path, work: Path) -> dict:
    """MAR-B and its diffusion head: conditions, loss per token, and a generation of 4 AR steps with 10 DDPM steps
    (CFG 2.9 linear, temperature 1), MAR's orders and noise drawn from one generator in the order lit_ar draws them."""
    from functools import partial

    from benchmarks.peers import cuda_calls_stay_on
    from lit_ar.models.diffusion_head import diffusion_loss
    from lit_ar.systems.flow_ar import FlowARSystem

    on_path(root / CHECKOUTS["mar"])
    from models.mar import mar_base
    from models.vae import AutoencoderKL

    vae = AutoencoderKL(16, (1, 1, 2, 2, 4)).eval()
    mar = mar_base(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, class_num=1000, buffer_size=64,
                   diffloss_d=6, diffloss_w=1024, num_sampling_steps="10").eval()  # fmt: skip
    perturb(vae, mar)
    torch.save({"model": vae.state_dict()}, work / "kl16.ckpt")
    torch.save({"model": mar.state_dict(), "model_ema": mar.state_dict()}, work / "checkpoint-last.pth")
    _, gen_path = import_weights(["mar", "--vae_ckpt", str(work / "kl16.ckpt"), "--mar_ckpt",
                                  str(work / "checkpoint-last.pth"), "--output", str(work / "mar_b")])  # fmt: skip
    ours = load_system(str(gen_path), FlowARSystem).eval()
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randn(2, 256, 16, generator=g), torch.rand(2, 256, generator=g).argsort(1) < 200
    labels = torch.tensor([3, 1000])  # a class and the null class (MAR's fake_latent)
    class_embedding = torch.cat([mar.class_emb(labels[:1]), mar.fake_latent])
    conditions = mar.forward_mae_decoder(mar.forward_mae_encoder(tokens, mask.float(), class_embedding), mask.float())
    rows = conditions.reshape(-1, 768)[:512]
    target, noise, t = torch.randn(512, 16, generator=g), torch.randn(512, 16, generator=g), torch.arange(512) * 1.95
    peer_loss = mar.diffloss.train_diffusion.training_losses(mar.diffloss.net, target, t.long(), dict(c=rows),
                                                             noise=noise)["loss"]  # fmt: skip
    loss = diffusion_loss(ours.head, target, rows, noise, t.long(), reduction="none")

    def generate(side: str) -> tuple[torch.Tensor, float]:
        draws = torch.Generator().manual_seed(7)
        start = time.perf_counter()
        if side == "lit_ar":
            out = ours.sample_tokens(torch.tensor([1, 4]), cfg=2.9, steps=4, flow_steps=10, generator=draws)
            return out, time.perf_counter() - start
        randn, randn_like = torch.randn, torch.randn_like
        # MAR draws its starting noise with torch.randn and each step's with torch.randn_like (both CFG halves; the
        # null half's are never used): from `draws`, in lit_ar's order
        torch.randn = partial(randn, generator=draws)
        torch.randn_like = lambda x: torch.cat([randn(x.shape[0] // 2, *x.shape[1:], generator=draws)] * 2)
        mar.sample_orders = lambda bsz: torch.rand(bsz, 256, generator=draws).argsort(dim=1)
        try:
            with cuda_calls_stay_on("cpu"):
                out = mar.sample_tokens(2, num_iter=4, cfg=2.9, labels=torch.tensor([1, 4]), temperature=1.0)
        finally:
            torch.randn, torch.randn_like = randn, randn_like
        return out.flatten(2).transpose(1, 2), time.perf_counter() - start  # lit_ar's raster token layout

    (peer_tokens, peer_s), (our_tokens, ours_s) = generate("peer"), generate("lit_ar")
    condition_err = max_error(ours.core(tokens, mask, labels), conditions)
    token_err = max_error(our_tokens, peer_tokens) / float(peer_tokens.abs().max())  # a random head's are large
    loss_err = max_error(loss, peer_loss)
    return {"peer": "MAR-B (DDPM head)", "codes equal": f"conditions max err {condition_err:.2g}",
            "decoded max err": float("nan"), "logits max err": f"loss per token max err {loss_err:.2g}",
            "greedy CFG": f"4 AR x 10 DDPM steps: tokens max err / max {token_err:.2g}",
            "greedy s (peer, lit_ar)": f"{peer_s:.1f}, {ours_s:.1f}"}  # fmt: skip


ROWS = {"llamagen": llamagen_row, "var": var_row, "mar-kl": mar_kl_row, "mar": mar_row}
CHECKOUTS = {"llamagen": "LlamaGen", "var": "VAR", "mar-kl": "mar", "mar": "mar"}


def main(args: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-root", type=Path, required=True, help="folder with LlamaGen/, VAR/ and mar/ checkouts")
    p.add_argument("--peers", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(args)
    for peer in a.peers:  # every checkout is there before any model is built
        if not (a.peer_root / CHECKOUTS[peer]).is_dir():
            raise FileNotFoundError(f"--peer-root {a.peer_root}: no {CHECKOUTS[peer]}/ checkout for {peer}")
    torch.set_grad_enabled(False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lit_ar_released_") as work:
        for peer in a.peers:
            rows.append(ROWS[peer](a.peer_root, Path(work)))
            print_table(rows[-1:])
    print_table(rows, "the released-weights import against the peers' own code")
    if a.json:
        write_json(rows, a.json)
    return rows


if __name__ == "__main__":
    main()
