"""The NLP zoo: published parameter counts, fx traceability, masking and tied heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopipe.models.nlp import MODELS, TINY_VOCAB

FULL = [name for name, spec in MODELS.items() if spec.published_params is not None]
TINY = [name for name in MODELS if name.endswith("_tiny")]


def build_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return MODELS[name].build()


def build_tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name].build()


def inputs(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    spec = MODELS[name]
    return spec.example_inputs(batch, spec.default_size, torch.Generator().manual_seed(0))


def tied_heads(module: nn.Module) -> list[str]:
    """Names of the Linear layers whose weight is an embedding's: the tied vocabulary heads."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and id(m.weight) in embeddings
    ]


def test_names() -> None:
    assert set(MODELS) == {
        "bert_base",
        "bert_large",
        "bert_tiny",
        "gpt2",
        "gpt2_medium",
        "gpt2_tiny",
        "t5_small",
        "t5_tiny",
    }
    assert set(FULL) | set(TINY) == set(MODELS)


@pytest.mark.parametrize("name", FULL)
def test_parameter_count_matches_published(name: str) -> None:
    count = sum(p.numel() for p in build_meta(name).parameters())
    published = MODELS[name].published_params
    assert abs(count - published) <= 0.01 * published, (count, published)


@pytest.mark.parametrize("name", FULL)
def test_full_model_traces_on_meta(name: str) -> None:
    spec = MODELS[name]
    traced = torch.fx.symbolic_trace(build_meta(name))
    meta_inputs = {key: value.to("meta") for key, value in inputs(name).items()}
    vocab = traced.get_submodule(tied_heads(traced)[0]).out_features
    assert traced(**meta_inputs).shape == (2, spec.default_size, vocab)


@pytest.mark.parametrize("name", FULL + TINY)
def test_head_is_tied_to_an_embedding(name: str) -> None:
    assert len(tied_heads(build_meta(name))) == 1


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_and_trace(name: str) -> None:
    spec = MODELS[name]
    model = build_tiny(name)
    batch = inputs(name)
    logits = model(**batch)
    head = model.get_submodule(tied_heads(model)[0])
    assert logits.shape == (2, spec.default_size, head.out_features)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(**batch), model(**batch))


@pytest.mark.parametrize("name", TINY)
def test_tiny_build_is_deterministic(name: str) -> None:
    first, second = build_tiny(name).state_dict(), build_tiny(name).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_bert_ignores_padded_tokens() -> None:
    model = build_tiny("bert_tiny").eval()
    batch = inputs("bert_tiny")
    batch["attention_mask"][:, -3:] = 0
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, -3:] = 7
    with torch.no_grad():
        torch.testing.assert_close(model(**changed)[:, :-3], model(**batch)[:, :-3])


@pytest.mark.parametrize(
    "name, key", [("gpt2_tiny", "input_ids"), ("t5_tiny", "decoder_input_ids")]
)
def test_decoder_is_causal(name: str, key: str) -> None:
    model = build_tiny(name).eval()
    batch = inputs(name)
    changed = dict(batch, **{key: batch[key].clone()})
    changed[key][:, -1] = (changed[key][:, -1] + 1) % TINY_VOCAB
    with torch.no_grad():
        before, after = model(**batch), model(**changed)
    torch.testing.assert_close(after[:, :-1], before[:, :-1])
    assert not torch.allclose(after[:, -1], before[:, -1])
