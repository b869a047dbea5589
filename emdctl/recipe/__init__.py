"""Recipes: YAML files validated into the schema (schema.py: every default, each spec class with its
own rules), read with bounds (loading.py), with one line per problem (messages.py)."""

from .loading import (
    DEFAULT_RECIPE_PATH,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_recipe,
    parse_yaml,
    read_yaml,
    recipe_to_dict,
)
from .schema import (
    DiscriminatorSpec,
    DistillRecipe,
    MethodSpec,
    NoiseLevels,
    Recipe,
    TeacherSpec,
    TeacherTrainRecipe,
    parse_image_count,
)

__all__ = [
    "DEFAULT_RECIPE_PATH",
    "DiscriminatorSpec",
    "DistillRecipe",
    "MethodSpec",
    "NoiseLevels",
    "Recipe",
    "TeacherSpec",
    "TeacherTrainRecipe",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "parse_image_count",
    "parse_recipe",
    "parse_yaml",
    "read_yaml",
    "recipe_to_dict",
]
