"""LightningModules ("systems"): training logic over the plain cores in lit_ar.models."""

from lit_ar.systems.causal_ar import CausalARSystem
from lit_ar.systems.classifier import ClassifierSystem

__all__ = ["ClassifierSystem", "CausalARSystem"]
