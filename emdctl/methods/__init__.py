"""Training methods: one file per method, all on the shared trainer (emdctl.trainer)."""

from __future__ import annotations

from .diff_instruct import DiffInstruct
from .dmd2 import DMD2
from .emd import EMD
from .gdd import GDD
from .moment_matching import MomentMatching
from .sid import SiD
from .sida import SiDA

DISTILLATION_METHODS = {
    "emd": EMD,
    "diff-instruct": DiffInstruct,
    "moment-matching": MomentMatching,
    "gdd": GDD,
    "sid": SiD,
    "sida": SiDA,
    "dmd2": DMD2,
}


def build_method(recipe, dist, teacher=None):
    """The method object a recipe describes (`teacher` is required for distillation)."""
    if recipe.kind == "teacher-train":
        from .edm_training import EDMTeacherTraining

        return EDMTeacherTraining(recipe, dist)
    if recipe.kind == "teacher-train-text":
        from .text_teacher_training import TextTeacherTraining

        return TextTeacherTraining(recipe, dist)
    return DISTILLATION_METHODS[recipe.method.name](recipe, teacher, dist)


__all__ = [
    "DISTILLATION_METHODS",
    "DMD2",
    "DiffInstruct",
    "EMD",
    "GDD",
    "MomentMatching",
    "SiD",
    "SiDA",
    "build_method",
]
