"""Check lit_ar's FID InceptionV3 against torch-fidelity's, bit for bit, without torchvision.

torch-fidelity's package imports torchvision, which lit_ar must not install; its InceptionV3 module itself needs
only torch. This script takes the torch-fidelity wheel (`pip download --no-deps torch-fidelity`), loads just that
module from it, gives both networks the same random weights (BatchNorm statistics calibrated so that the features
depend on the input), and prints the largest feature and logit differences on uint8 images of several sizes.

    pip download --no-deps torch-fidelity -d /tmp/tf
    python benchmarks/inception_parity.py /tmp/tf/torch_fidelity-*.whl
"""

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from lit_ar.models.inception import FIDInceptionV3

MODULES = ("helpers", "defaults", "deprecations", "feature_extractor_base", "interpolate_compat_tensorflow",
           "feature_extractor_inceptionv3")  # fmt: skip


def load_torch_fidelity_inception(wheel: str, workdir: Path):
    package = workdir / "torch_fidelity"
    package.mkdir()
    (package / "__init__.py").write_text("")  # the real one imports torchvision
    with zipfile.ZipFile(wheel) as zf:
        for name in MODULES:
            (package / f"{name}.py").write_bytes(zf.read(f"torch_fidelity/{name}.py"))
    sys.path.insert(0, str(workdir))
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="path of a torch_fidelity-*.whl")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256, 299])
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = FIDInceptionV3()
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running stats := one batch's stats, so the signal survives 40 random layers
    with torch.no_grad():
        ours.train()(torch.randint(0, 256, (4, 3, 64, 64)).float())
    ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        torch.save(ours.state_dict(), weights)
        reference_cls = load_torch_fidelity_inception(args.wheel, Path(tmp))
        theirs = reference_cls("inception-v3-compat", ["2048", "logits_unbiased"], str(weights))
        print(f"{'size':>5} {'max |feature diff|':>19} {'max |logit diff|':>17} {'feature std':>12} "
              f"{'torch-fidelity s':>17} {'lit_ar s':>9}")  # fmt: skip
        for size in args.sizes:
            x = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
            with torch.no_grad():
                t0 = time.perf_counter()
                f_ref, l_ref = theirs(x)
                t1 = time.perf_counter()
                f = ours(x.float())
                logits = ours.logits_unbiased(f)
                t2 = time.perf_counter()
            print(f"{size:>5} {(f - f_ref).abs().max().item():>19.3g} {(logits - l_ref).abs().max().item():>17.3g} "
                  f"{f_ref.std(0).mean().item():>12.3g} {t1 - t0:>17.2f} {t2 - t1:>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
