"""LightningModules ("systems"): training logic over the plain cores in lit_ar.models."""

from lit_ar.systems.classifier import ClassifierSystem
from lit_ar.systems.tokenizer import TokenizerSystem

__all__ = ["ClassifierSystem"]
__all__ += ["TokenizerSystem"]

from lit_ar.systems.flow_ar import FlowARSystem  # noqa: E402

__all__ += ["FlowARSystem"]
