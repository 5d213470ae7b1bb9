"""Method names -> classes. Adding a method: one file in methods/ and one line here."""

from __future__ import annotations

from datablame.errors import UserError
from datablame.methods.base import Method
from datablame.methods.datainf import DataInf
from datablame.methods.grad_similarity import GradCos, GradDot
from datablame.methods.influence import (
    ArnoldiInfluence,
    ConjugateGradientInfluence,
    ExactInfluence,
    LissaInfluence,
)
from datablame.methods.tracin import TracIn
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
}


def get_method(name: str, **params) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    try:
        return METHODS[name](**params)
    except TypeError as exc:
        raise UserError(f"bad option for method '{name}': {exc}") from None
