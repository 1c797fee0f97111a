"""The recipe: matching semantics (glob, ``re:`` full match, first match wins,
default), path resolution and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from vllm_mixed.errors import MixedError
from vllm_mixed.recipe import Recipe, load_recipe, recipe_from_dict, target_matches

EXPERTS = "model.layers.3.mlp.experts"


def make(tmp_path: Path, **over) -> Recipe:
    data = {"sources": {"a": "ckpt-a", "b": "ckpt-b", "c": "ckpt-c"}, "base": "a", "default": "a"}
    data.update(over)
    return recipe_from_dict(data, origin=tmp_path / "recipe.yaml")


def write(tmp_path: Path, data: object, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --- glob targets ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target,name,expected",
    [
        ("model.layers.*.mlp.experts", "model.layers.0.mlp.experts", True),
        ("model.layers.*.mlp.experts", "model.layers.47.mlp.experts", True),
        # a glob matches the whole name: no prefix match onto members
        ("model.layers.*.mlp.experts", "model.layers.0.mlp.experts.3.up_proj", False),
        ("model.layers.*.mlp.experts", "xmodel.layers.0.mlp.experts", False),
        # '*' crosses dots
        ("model.*.experts", "model.layers.0.mlp.experts", True),
        ("model.layers.0.mlp.experts.*", "model.layers.0.mlp.experts.3.up_proj", True),
        ("model.layers.0.mlp.experts.*", "model.layers.0.mlp.experts", False),
        ("model.layers.?.self_attn.o_proj", "model.layers.7.self_attn.o_proj", True),
        ("model.layers.?.self_attn.o_proj", "model.layers.17.self_attn.o_proj", False),
        ("model.layers.*.self_attn.[qkv]_proj", "model.layers.2.self_attn.k_proj", True),
        ("model.layers.*.self_attn.[qkv]_proj", "model.layers.2.self_attn.o_proj", False),
        ("model.layers.*.self_attn.[qkv]_proj", "model.layers.2.self_attn.qkv_proj", False),
        # '.' is literal in a glob, and matching is case-sensitive
        ("model.layers.0.mlp.gate", "model.layers.0Xmlp.gate", False),
        ("LM_HEAD", "lm_head", False),
        ("lm_head", "lm_head", True),
    ],
)
def test_glob_target(target: str, name: str, expected: bool) -> None:
    assert target_matches(target, name) is expected


# --- regex targets ---------------------------------------------------------------


@pytest.mark.parametrize(
    "target,name,expected",
    [
        (r"re:model\.layers\.\d+\.mlp\.experts", "model.layers.12.mlp.experts", True),
        # full match: neither a prefix (re.match) nor a substring (re.search) is enough
        (r"re:model\.layers\.\d+\.mlp\.experts", "model.layers.12.mlp.experts.0.up_proj", False),
        (r"re:model\.layers\.\d+\.mlp\.experts", "xmodel.layers.12.mlp.experts", False),
        ("re:experts", "model.layers.0.mlp.experts", False),
        ("re:.*experts", "model.layers.0.mlp.experts", True),
        (r"re:lm_head|model\.embed_tokens", "model.embed_tokens", True),
        (r"re:lm_head|model\.embed_tokens", "lm_head", True),
        (r"re:lm_head|model\.embed_tokens", "model.embed_tokens_x", False),
        (r"re:model\.layers\.(0|1)\..*", "model.layers.1.self_attn.qkv_proj", True),
        (r"re:model\.layers\.(0|1)\..*", "model.layers.10.self_attn.qkv_proj", False),
        # without the prefix the same text is a glob, where '+' and '\d' are literal
        (r"model\.layers\.\d+\.mlp\.experts", "model.layers.12.mlp.experts", False),
        # with the prefix, '*' is a regex quantifier, not a glob
        ("re:model.layers.*", "model.layers.0.mlp.gate", True),
        ("re:model.layers.[0-9]", "model.layers.12", False),
    ],
)
def test_regex_target_is_full_match(target: str, name: str, expected: bool) -> None:
    assert target_matches(target, name) is expected


# --- first match wins, default -----------------------------------------------------


def test_first_matching_rule_wins(tmp_path: Path) -> None:
    rules = [
        {"targets": ["model.layers.*.mlp.experts"], "source": "b"},
        {"targets": ["re:.*experts"], "source": "c"},
    ]
    assert make(tmp_path, rules=rules).source_for((EXPERTS,)) == ("b", 0)
    assert make(tmp_path, rules=rules[::-1]).source_for((EXPERTS,)) == ("c", 0)
    # a third rule that also matches never wins
    third = [*rules, {"targets": [EXPERTS], "source": "a"}]
    assert make(tmp_path, rules=third).source_for((EXPERTS,)) == ("b", 0)


def test_later_rule_applies_when_earlier_ones_miss(tmp_path: Path) -> None:
    recipe = make(
        tmp_path,
        rules=[
            {"targets": ["lm_head"], "source": "c"},
            {"targets": ["model.layers.1.*", "model.layers.*.mlp.experts"], "source": "b"},
        ],
    )
    assert recipe.source_for((EXPERTS,)) == ("b", 1)
    assert recipe.source_for(("lm_head",)) == ("c", 0)


def test_unmatched_name_takes_default(tmp_path: Path) -> None:
    recipe = make(tmp_path, default="c", rules=[{"targets": ["lm_head"], "source": "b"}])
    assert recipe.source_for(("model.embed_tokens",)) == ("c", None)
    no_default = make(tmp_path, default=None, rules=[{"targets": ["lm_head"], "source": "b"}])
    assert no_default.default is None
    assert no_default.source_for(("model.embed_tokens",)) == (None, None)
    assert no_default.source_for(("lm_head",)) == ("b", 0)


def test_source_for_matches_any_of_the_names(tmp_path: Path) -> None:
    """A member is looked up under its own name and its fused layer's name."""
    recipe = make(
        tmp_path,
        rules=[
            {"targets": ["model.layers.0.self_attn.q_proj"], "source": "b"},
            {"targets": ["model.layers.0.self_attn.qkv_proj"], "source": "c"},
        ],
    )
    layer = "model.layers.0.self_attn.qkv_proj"
    assert recipe.source_for(("model.layers.0.self_attn.q_proj", layer)) == ("b", 0)
    assert recipe.source_for(("model.layers.0.self_attn.k_proj", layer)) == ("c", 1)
    assert recipe.source_for(("model.layers.0.self_attn.k_proj",)) == ("a", None)


def test_rule_with_several_targets_matches_each(tmp_path: Path) -> None:
    recipe = make(tmp_path, rules=[{"targets": ["lm_head", r"re:model\.embed_tokens"], "source": "b"}])
    assert recipe.source_for(("lm_head",)) == ("b", 0)
    assert recipe.source_for(("model.embed_tokens",)) == ("b", 0)
    assert recipe.source_for(("model.norm",)) == ("a", None)


# --- loading and paths -------------------------------------------------------------------


def test_relative_sources_resolve_against_recipe_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = tmp_path / "deep" / "recipes"
    recipes.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    absolute = tmp_path / "abs-ckpt"
    path = write(recipes, {"sources": {"a": "../ckpt-a", "b": "sub/ckpt-b", "c": str(absolute)}, "base": "a"})
    recipe = load_recipe(path)
    assert recipe.sources == {
        "a": str((tmp_path / "deep" / "ckpt-a").resolve()),
        "b": str((recipes / "sub" / "ckpt-b").resolve()),
        "c": str(absolute.resolve()),
    }
    # the same file loaded through a relative path gives the same result
    monkeypatch.chdir(tmp_path)
    assert load_recipe(Path("deep/recipes") / path.name).sources == recipe.sources


def test_paths_are_data_not_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``~``, variable or shell expansion: a recipe is data."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELS", str(tmp_path / "models"))
    recipe = load_recipe(write(tmp_path, {"sources": {"a": "~/x", "b": "$MODELS/y"}, "base": "a"}))
    assert recipe.sources["a"] == str((tmp_path / "~" / "x").resolve())
    assert recipe.sources["b"] == str((tmp_path / "$MODELS" / "y").resolve())


def test_binary_recipe_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MixedError, match="not UTF-8 text"):
        load_recipe(path)


def test_without_origin_paths_resolve_against_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict({"sources": {"a": "ckpt"}, "base": "a"})
    assert recipe.sources["a"] == str((tmp_path / "ckpt").resolve())


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path, {"sources": {"a": "x", "b": "y"}, "base": "b", "rules": [{"targets": ["lm_head"], "source": "a"}]}
        )
    )
    assert recipe.dtype == "bfloat16"
    assert recipe.default is None
    assert recipe.base == "b"
    assert [(r.targets, r.source) for r in recipe.rules] == [(["lm_head"], "a")]
    # what compose writes into config.json reads back as the same recipe
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_recipe_is_frozen(tmp_path: Path) -> None:
    recipe = make(tmp_path)
    with pytest.raises(ValidationError):
        recipe.default = "b"  # type: ignore[misc]
    assert recipe.default == "a"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_accepted(tmp_path: Path, dtype: str) -> None:
    assert make(tmp_path, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("dtype", ["float32", "bf16", "fp8", "int4", 16])
def test_dtype_rejected(tmp_path: Path, dtype: object) -> None:
    with pytest.raises(MixedError) as exc:
        make(tmp_path, dtype=dtype)
    msg = str(exc.value)
    assert f"dtype: {dtype!r} is not supported" in msg
    assert "use one of: bfloat16, float16" in msg


# --- validation messages ---------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        load_recipe(write(tmp_path, {"sources": {"a": "x"}, "base": "a", "colour": "red"}))
    msg = str(exc.value)
    assert str(tmp_path / "recipe.yaml") in msg
    assert "unknown key 'colour'" in msg
    assert "allowed keys here: base, default, dtype, kernels, rules, sources" in msg


def test_unknown_rule_key(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        make(
            tmp_path,
            rules=[{"targets": ["lm_head"], "source": "b"}, {"targets": ["x"], "source": "b", "format": "int4"}],
        )
    msg = str(exc.value)
    assert "unknown key 'rules[1].format'" in msg
    assert "allowed keys here: source, targets" in msg


def test_rule_naming_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        make(
            tmp_path, rules=[{"targets": ["lm_head"], "source": "b"}, {"targets": ["model.layers.*"], "source": "int8"}]
        )
    msg = str(exc.value)
    assert "rules[1].source: 'int8'" in msg
    assert "['model.layers.*']" in msg
    assert "use one of: a, b, c" in msg
    assert "add it under 'sources:'" in msg


@pytest.mark.parametrize("key", ["base", "default"])
def test_base_or_default_naming_unknown_source(tmp_path: Path, key: str) -> None:
    with pytest.raises(MixedError) as exc:
        make(tmp_path, **{key: "zz"})
    assert f"{key}: 'zz' is not a source; use one of: a, b, c" in str(exc.value)


@pytest.mark.parametrize("missing", ["sources", "base"])
def test_missing_required_key(tmp_path: Path, missing: str) -> None:
    data = {"sources": {"a": "x"}, "base": "a"}
    del data[missing]
    with pytest.raises(MixedError) as exc:
        load_recipe(write(tmp_path, data))
    assert f"missing key '{missing}'" in str(exc.value)


def test_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        recipe_from_dict({"sources": {}, "base": "a"}, origin=tmp_path / "r.yaml")
    assert "sources: is empty; give at least one checkpoint as name: directory" in str(exc.value)


def test_targets_empty_list(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        make(tmp_path, rules=[{"targets": [], "source": "b"}])
    assert "rules[0].targets: is empty; give at least one layer name, glob or 're:<regex>'" in str(exc.value)


def test_targets_not_a_list(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        make(tmp_path, rules=[{"targets": "model.layers.*.mlp.experts", "source": "b"}])
    msg = str(exc.value)
    assert "rules[0].targets: must be a YAML list" in msg
    assert "'model.layers.*.mlp.experts'" in msg


@pytest.mark.parametrize("target", ["", "   "])
def test_target_empty_string(tmp_path: Path, target: str) -> None:
    with pytest.raises(MixedError) as exc:
        make(tmp_path, rules=[{"targets": ["lm_head", target], "source": "b"}])
    assert "rules[0].targets: a target is empty; write a layer name, a glob or 're:<regex>'" in str(exc.value)


@pytest.mark.parametrize("pattern", ["(", "model.layers.[0-", "*experts", "a{2,1}"])
def test_target_invalid_regex(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(MixedError) as exc:
        make(tmp_path, rules=[{"targets": [f"re:{pattern}"], "source": "b"}])
    msg = str(exc.value)
    assert f"target 're:{pattern}' is not a valid regular expression" in msg
    assert "rules[0].targets" in msg


def test_invalid_regex_text_is_a_valid_glob(tmp_path: Path) -> None:
    """Without ``re:`` the same text is a glob and needs no compiling."""
    recipe = make(tmp_path, rules=[{"targets": ["model.layers.[0-"], "source": "b"}])
    assert recipe.source_for(("model.layers.[0-",)) == ("b", 0)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("sources:\n  a: x\nbase: a\nrules:\n  - targets: [lm_head\n    source: a\n")
    with pytest.raises(MixedError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "YAML syntax error at line" in msg
    line = int(msg.split("at line ")[1].split(",")[0])
    assert 5 <= line <= 7  # the unclosed '[' of line 5, reported where the parser gives up
    assert "fix the YAML" in msg


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("", "NoneType"), ("just text\n", "str")])
def test_recipe_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(MixedError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert f"expected a mapping with keys sources, base, default, dtype, rules; got {kind}" in msg


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        load_recipe(tmp_path / "nope.yaml")
    assert f"recipe {tmp_path / 'nope.yaml'}: no such file" in str(exc.value)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(MixedError) as exc:
        make(tmp_path, dtype="float32", colour="red")
    msg = str(exc.value)
    assert "unknown key 'colour'" in msg and "dtype: 'float32'" in msg
