"""Vision zoo: parameter counts, output shapes and torch.fx traceability."""

import pytest
import torch

from autopipe.models.vision import MODELS

PUBLISHED = [name for name, spec in MODELS.items() if spec.published_params is not None]
SMALL = [name for name in MODELS if "tiny" in name or "16x4" in name]
FULL = [name for name in MODELS if name not in SMALL]


def _meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return MODELS[name].build()


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_matches_published(name: str) -> None:
    count = sum(p.numel() for p in _meta_model(name).parameters())
    published = MODELS[name].published_params
    assert abs(count - published) <= 0.01 * published, (count, published)


@pytest.mark.parametrize("name", SMALL)
def test_small_model_runs_and_traces(name: str) -> None:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    # Perturb every parameter so that zero-initialised layers (the ViT head) do not make
    # the comparison below trivial.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    inputs = spec.example_inputs(2, spec.default_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(*inputs)
        traced = torch.fx.symbolic_trace(model)
        actual = traced(*inputs)
    assert expected.shape == (2, model.num_classes)
    assert expected.std() > 0
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", FULL)
def test_full_model_traces(name: str) -> None:
    graph = torch.fx.symbolic_trace(_meta_model(name)).graph
    assert any(node.op == "call_module" for node in graph.nodes)


@pytest.mark.parametrize("name", SMALL)
def test_build_is_deterministic(name: str) -> None:
    torch.manual_seed(0)
    first = MODELS[name].build().state_dict()
    torch.manual_seed(0)
    second = MODELS[name].build().state_dict()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0)
