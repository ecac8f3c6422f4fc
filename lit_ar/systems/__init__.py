"""LightningModules ("systems"): training logic over the plain cores in lit_ar.models."""

from lit_ar.systems.classifier import ClassifierSystem

__all__ = ["ClassifierSystem"]
from lit_ar.systems.evaluation import NpzEvaluator  # noqa: E402

__all__ += ["NpzEvaluator"]
