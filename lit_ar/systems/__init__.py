"""LightningModules ("systems"): training logic over the plain cores in lit_ar.models."""

from lit_ar.systems.arpg import ARPGSystem
from lit_ar.systems.causal_ar import CausalARSystem
from lit_ar.systems.classifier import ClassifierSystem
from lit_ar.systems.evaluation import NpzEvaluator
from lit_ar.systems.flow_ar import FlowARSystem
from lit_ar.systems.lpd import LPDSystem
from lit_ar.systems.masked_ar import MaskedARSystem
from lit_ar.systems.scale_ar import ScaleARSystem
from lit_ar.systems.tokenizer import TokenizerSystem
from lit_ar.systems.xar import XARSystem

__all__ = [
    "ARPGSystem",
    "CausalARSystem",
    "ClassifierSystem",
    "FlowARSystem",
    "LPDSystem",
    "MaskedARSystem",
    "NpzEvaluator",
    "ScaleARSystem",
    "TokenizerSystem",
    "XARSystem",
]
