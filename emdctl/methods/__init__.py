"""Training methods: one file per method, all on the shared trainer (emdctl.trainer)."""

from __future__ import annotations

from .diff_instruct import DiffInstruct
from .emd import EMD
from .gdd import GDD
from .moment_matching import MomentMatching

DISTILLATION_METHODS = {"emd": EMD, "diff-instruct": DiffInstruct, "moment-matching": MomentMatching, "gdd": GDD}


def build_method(recipe, dist, teacher=None):
    """The method object a recipe describes (`teacher` is required for distillation)."""
    if recipe.kind == "teacher-train":
        from .edm_training import EDMTeacherTraining

        return EDMTeacherTraining(recipe, dist)
    return DISTILLATION_METHODS[recipe.method.name](recipe, teacher, dist)


__all__ = ["DISTILLATION_METHODS", "DiffInstruct", "EMD", "GDD", "MomentMatching", "build_method"]
