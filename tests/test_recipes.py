"""Every recipe in deploy/recipes loads through the one config module without error."""
from pathlib import Path

import pytest

from kakeya_kv.config import KakeyaConfig

RECIPES = sorted((Path(__file__).parent.parent / "deploy" / "recipes").glob("*.env"))


def _env(path: Path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v
    return env


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    env = _env(path)
    assert all(k.startswith("KAKEYA_") for k in env)
    head = path.read_text()
    assert "MEASURED" in head or "NOT MEASURED" in head   # every recipe says which it is
    KakeyaConfig.from_env(env, num_layers=36)
