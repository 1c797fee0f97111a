"""Every shipped recipe in configs/ validates against the recipe schema (its
checkpoint directories need not exist here)."""

from __future__ import annotations

from pathlib import Path

from vllm_mixed.recipe import Recipe, load_recipe, recipe_from_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_config_is_a_valid_recipe() -> None:
    files = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.yml"))
    assert len(files) >= 2, f"expected at least 2 recipes in {CONFIGS}, found {[f.name for f in files]}"
    for path in files:
        recipe = load_recipe(path)  # raises MixedError naming the file and key
        assert isinstance(recipe, Recipe)
        # what compose writes into config.json reads back as the same recipe
        assert recipe_from_dict(recipe.to_dict()) == recipe, path.name
