"""Recipes: YAML lists of gated steps, validated against each pass's config before any work.

    name: default
    description: what it is for
    seed: 0
    probes: 64              # probe samples for the fidelity gates
    steps:
      - pass: prune.magnitude
        options: {sparsity: 0.5}
        gate: {min_cosine: 0.99}
        on_fail: rollback   # or stop (default): fail with nothing written

A step may also be a `schedule:` entry (iterative pruning, see
`pass_base.SCHEDULE_STEP`), expanded into its prune (+ finetune)
rounds when the recipe is read.

Built-in recipes ship in `onnxcompress/recipes/` and are named without `.yaml`.
"""

from __future__ import annotations

__all__ = ["Recipe", "load_recipe", "builtin_recipes", "recipe_schema"]

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import pydantic
import yaml

from onnxcompress.errors import RecipeError
from onnxcompress.fidelity import Gate
from onnxcompress.pass_base import get_pass, make_config, pass_names, schedule_step
from onnxcompress.pipeline import Step
from onnxcompress.probes import DEFAULT_PROBES


class Recipe(pydantic.BaseModel):
    """A validated recipe: gated steps in order, with the seed and probe count they share."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    name: str = pydantic.Field("custom", description="Short name shown in reports.")
    description: str = pydantic.Field("", description="What the recipe is for.")
    seed: int = pydantic.Field(
        0, ge=0, description="Seed for probes and every randomised pass (0 or more)."
    )
    probes: int = pydantic.Field(
        DEFAULT_PROBES, ge=1, le=4096, description="Probe samples for fidelity gates."
    )
    steps: list[Step] = pydantic.Field(min_length=1, description="Passes in order, each gated.")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _expand_schedules(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list):
            return raw
        steps: list[Any] = []
        for index, entry in enumerate(raw["steps"], start=1):
            if isinstance(entry, dict) and "schedule" in entry:
                try:
                    steps += schedule_step().model_validate(entry).steps()
                except (pydantic.ValidationError, RecipeError, ValueError) as error:
                    raise ValueError(f"step {index} (schedule): {_first_problem(error)}") from None
            else:
                steps.append(entry)
        return {**raw, "steps": steps}

    @pydantic.model_validator(mode="after")
    def _steps_known(self) -> Recipe:
        for index, step in enumerate(self.steps, start=1):
            try:
                make_config(get_pass(step.pass_name).Config, step.options)
            except RecipeError as error:
                raise ValueError(f"step {index} ({step.pass_name}): {error}") from None
        return self


def _first_problem(error: Exception) -> str:
    if isinstance(error, pydantic.ValidationError):
        first = error.errors()[0]
        return (
            f"{'.'.join(str(p) for p in first['loc'])}: "
            f"{first['msg'].removeprefix('Value error, ')}"
        )
    return str(error)


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped in the package, by name, read through importlib.resources."""
    folder = resources.files("onnxcompress") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


#: Values a recipe may hold once its aliases are expanded: a few anchors can stand for billions.
MAX_VALUES = 100_000


def _too_many_values(tree: Any) -> bool:
    """Walk the tree as validation and reports would, each alias as often as used; stop early."""
    stack, seen = [tree], 0
    while stack:
        seen += 1
        if seen > MAX_VALUES:
            return True
        node = stack.pop()
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            stack += node
    return False


def parse_recipe(text: str, origin: str) -> Recipe:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{origin}: not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:  # the YAML composer recurses once per nesting level
        raise RecipeError(f"{origin}: nested too deeply to be a recipe") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping with a 'steps' list")
    if _too_many_values(raw):
        raise RecipeError(f"{origin}: expands to more than {MAX_VALUES:,} values (YAML aliases?); "
                          "a recipe is a short list of steps")
    try:
        return Recipe.model_validate(raw)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        raise RecipeError(f"{origin}: {problems}") from None


def load_recipe(name_or_path: str | os.PathLike[str]) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    builtins = builtin_recipes()
    if str(name_or_path) in builtins:
        path = builtins[str(name_or_path)]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(
                f"{name_or_path}: no such recipe file or built-in recipe (built-in: "
                f"{', '.join(sorted(builtins))})"
            )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{name_or_path}: not a readable recipe ({error})") from None
    return parse_recipe(text, str(name_or_path))


def recipe_schema() -> dict[str, Any]:
    """JSON Schema of a recipe, with each step's options typed by its pass's config."""
    variants: list[type[pydantic.BaseModel]] = []
    for name in pass_names():
        fields: dict[str, Any] = {
            "pass": (Literal[name], ...),  # type: ignore[valid-type]
            "options": (get_pass(name).Config, pydantic.Field(default_factory=dict)),
            "gate": (Gate, pydantic.Field(default_factory=Gate)),
            "on_fail": (Literal["stop", "rollback"], "stop"),
            "margin": (float, Step.model_fields["margin"]),
        }
        step = pydantic.create_model(
            f"Step_{name.replace('.', '_')}",
            __config__=pydantic.ConfigDict(extra="forbid"),
            **fields,
        )
        variants.append(step)
    variants.append(schedule_step())
    step_union = Union[tuple(variants)]  # type: ignore[valid-type]  # noqa: UP007  (built at run time)
    document = pydantic.create_model(
        "Recipe",
        __config__=pydantic.ConfigDict(extra="forbid"),
        name=(str, "custom"),
        description=(str, ""),
        seed=(int, 0),
        probes=(int, DEFAULT_PROBES),
        steps=(list[step_union], ...),  # type: ignore[valid-type]
    )
    return document.model_json_schema()
