"""Method names -> classes. Adding a method: one file in methods/ and one line here."""

from __future__ import annotations

from datablame.errors import UserError
from datablame.methods.base import Method
from datablame.methods.boostin import BoostIn
from datablame.methods.datainf import DataInf
from datablame.methods.ekfac import EKFAC
from datablame.methods.families import FAMILY_METHODS, FAMILY_NOUNS
from datablame.methods.grad_similarity import GradCos, GradDot
from datablame.methods.influence import (
    ArnoldiInfluence,
    ConjugateGradientInfluence,
    ExactInfluence,
    LissaInfluence,
)
from datablame.methods.knn_shapley import KnnShapley
from datablame.methods.leaf_influence import LeafInfluence
from datablame.methods.leaf_share import LeafShare
from datablame.methods.leaf_sim import LeafSim
from datablame.methods.linear_exact import LinearExact
from datablame.methods.shap_neighbors import ShapNeighbors
from datablame.methods.simplex import Simplex
from datablame.methods.tracin import TracIn
from datablame.methods.trackstar import TrackStar
from datablame.methods.trak import Trak

METHODS: dict[str, type[Method]] = {
    "grad-dot": GradDot,
    "grad-cos": GradCos,
    "if-exact": ExactInfluence,
    "if-cg": ConjugateGradientInfluence,
    "if-lissa": LissaInfluence,
    "if-arnoldi": ArnoldiInfluence,
    "trak": Trak,
    "tracin": TracIn,
    "datainf": DataInf,
    "ekfac": EKFAC,
    "trackstar": TrackStar,
    "leaf-sim": LeafSim,
    "boostin": BoostIn,
    "leaf-share": LeafShare,
    "leaf-influence": LeafInfluence,
    "simplex": Simplex,
    "knn-shapley": KnnShapley,
    "shap-neighbors": ShapNeighbors,
    "linear-exact": LinearExact,
}



def check_fits(name: str, family: str) -> None:
    """Refuse, before any fitting, a method the model family cannot run (FAMILY_METHODS)."""
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    if name not in FAMILY_METHODS[family]:
        raise UserError(f"method '{name}' does not fit a {FAMILY_NOUNS[family]} model (use "
                        f"{', '.join(FAMILY_METHODS[family])})")


def get_method(name: str, **params) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    try:
        return METHODS[name](**params)
    except TypeError as exc:
        raise UserError(f"bad option for method '{name}': {exc}") from None
