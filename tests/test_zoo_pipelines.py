"""Every zoo model (its small variant where the full one is slow) at p = 2 and 4 generates,
imports and verifies: same outputs and same gradients as the original."""

import re
from pathlib import Path

import pytest

import autopipe
from autopipe.tasks import FAMILIES, zoo_task

FAST = {
    "vision": ["wrn_16x4_c10", "wrn_16x4_c100", "resnet_tiny", "vgg_tiny", "vit_tiny"],
    "nlp": ["bert_tiny", "gpt2_tiny", "t5_tiny"],
}
CASES = [(family, name, p) for family, names in FAST.items() for name in names for p in (2, 4)]


def test_every_zoo_family_has_a_fast_variant_here() -> None:
    for family, names in FAST.items():
        assert set(names) <= set(FAMILIES[family])
    stems = {re.match("[a-z]+", name).group() for names in FAMILIES.values() for name in names}
    covered = {re.match("[a-z]+", name).group() for names in FAST.values() for name in names}
    assert stems == covered


@pytest.mark.parametrize("family, name, n_stages", CASES, ids=lambda v: str(v))
def test_zoo_model_is_transparent(family: str, name: str, n_stages: int, tmp_path: Path) -> None:
    task = zoo_task(family, name, 2)
    result = autopipe.compile(
        task.model, task.example_inputs, n_stages, output=tmp_path / f"{name}.py"
    )
    assert len(result.stages) == n_stages
    report = result.verify()
    assert report.outputs >= 1
    assert report.gradients == sum(1 for p in task.model.parameters() if p.requires_grad)
