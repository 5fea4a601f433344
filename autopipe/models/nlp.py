"""NLP models of the zoo: BERT, GPT-2 and T5 written in plain PyTorch.

Every forward is free of Python control flow on tensor values, so ``torch.fx.symbolic_trace``
captures it whole with the ``torch.nn`` layers as leaves. Position ids and masks are built inside
forward from the inputs with tensor ops, so the models hold parameters only, no buffers. Module
names stay close to the published implementations (without their ``bert.``/``transformer.``
prefixes, and with ``nn.Linear`` where GPT-2 has its transposed ``Conv1D``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn

from autopipe.models.spec import ExampleInputs, ModelSpec, token_inputs


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(batch, seq, heads * dim)`` to ``(batch, heads, seq, dim)``."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, seq, dim)`` back to ``(batch, seq, heads * dim)``."""
    return x.transpose(1, 2).flatten(2)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """BERT/GPT-2 initialisation: normal weights for Linear and Embedding, zero biases.

    Apply with ``Module.apply``; LayerNorm keeps its default ones/zeros.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


# BERT ----------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Sum of word, position and token-type embeddings, then LayerNorm and dropout.

    All tokens get token type 0, as for a single-segment input.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_position_embeddings: int,
        type_vocab_size: int,
        layer_norm_eps: float,
        dropout_p: float,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        token_types = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_types)
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with an additive padding mask."""

    def __init__(self, hidden_size: int, num_attention_heads: int, dropout_p: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.dropout_p = dropout_p
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.query(x), self.num_attention_heads)
        k = split_heads(self.key(x), self.num_attention_heads)
        v = split_heads(self.value(x), self.num_attention_heads)
        scale = (self.hidden_size // self.num_attention_heads) ** -0.5
        scores = q @ k.transpose(-2, -1) * scale + mask_bias
        return merge_heads(self.dropout(scores.softmax(dim=-1)) @ v)


class BertOutput(nn.Module):
    """Projection, dropout, residual add and post-LayerNorm closing an attention or FFN."""

    def __init__(
        self, in_features: int, hidden_size: int, layer_norm_eps: float, dropout_p: float
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """Self-attention followed by its output block."""

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        layer_norm_eps: float,
        dropout_p: float,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.self = BertSelfAttention(hidden_size, num_attention_heads, dropout_p)
        self.output = BertOutput(hidden_size, hidden_size, layer_norm_eps, dropout_p)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    """First half of the feed-forward block: widen and apply GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertLayer(nn.Module):
    """One post-LN encoder layer: attention then feed-forward, each closed by add & norm."""

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        intermediate_size: int,
        layer_norm_eps: float,
        dropout_p: float,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.attention = BertAttention(hidden_size, num_attention_heads, layer_norm_eps, dropout_p)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertOutput(intermediate_size, hidden_size, layer_norm_eps, dropout_p)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """A stack of identical encoder layers."""

    def __init__(
        self,
        num_hidden_layers: int,
        hidden_size: int,
        num_attention_heads: int,
        intermediate_size: int,
        layer_norm_eps: float,
        dropout_p: float,
    ) -> None:
        super().__init__()
        self.num_hidden_layers = num_hidden_layers
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.layer = nn.ModuleList(
            BertLayer(
                hidden_size, num_attention_heads, intermediate_size, layer_norm_eps, dropout_p
            )
            for _ in range(num_hidden_layers)
        )

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class BertPredictionHeadTransform(nn.Module):
    """Dense, GELU and LayerNorm applied before the vocabulary projection."""

    def __init__(self, hidden_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_norm_eps = layer_norm_eps
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Masked-LM head: transform, then a vocabulary projection with its own output bias.

    The owner ties ``decoder.weight`` to the word embedding.
    """

    def __init__(self, vocab_size: int, hidden_size: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.layer_norm_eps = layer_norm_eps
        self.transform = BertPredictionHeadTransform(hidden_size, layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertForMaskedLM(nn.Module):
    """BERT encoder with the masked-LM head (no pooler), returning ``(batch, seq, vocab)`` logits.

    ``attention_mask`` holds 1 for tokens to attend to and 0 for padding; it becomes an additive
    bias of -10000 on the padded keys, as in the original BERT.
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        dropout_p: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.embeddings = BertEmbeddings(
            vocab_size,
            hidden_size,
            max_position_embeddings,
            type_vocab_size,
            layer_norm_eps,
            dropout_p,
        )
        self.encoder = BertEncoder(
            num_hidden_layers,
            hidden_size,
            num_attention_heads,
            intermediate_size,
            layer_norm_eps,
            dropout_p,
        )
        self.cls = BertLMPredictionHead(vocab_size, hidden_size, layer_norm_eps)
        self.apply(init_normal)
        self.cls.decoder.weight = self.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        return self.cls(self.encoder(x, mask_bias))


def bert_inputs(vocab_size: int) -> Callable[[int, int, torch.Generator], ExampleInputs]:
    """Token ids with an ``attention_mask`` that pads up to ``size // 8`` tokens at each row's end.

    Padded positions get token id 0, the padding token.
    """
    make_ids = token_inputs(vocab_size)

    def make(batch: int, size: int, generator: torch.Generator) -> ExampleInputs:
        input_ids = make_ids(batch, size, generator)["input_ids"]
        pads = torch.randint(0, size // 8 + 1, (batch, 1), generator=generator)
        attention_mask = (torch.arange(size) < size - pads).long()
        return {
            "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
            "attention_mask": attention_mask,
        }

    return make


# GPT-2 ---------------------------------------------------------------------------------------


class GPT2Attention(nn.Module):
    """Causal multi-head attention with one fused query/key/value projection."""

    def __init__(self, n_embd: int, n_head: int, dropout_p: float) -> None:
        super().__init__()
        self.n_embd = n_embd
        self.n_head = n_head
        self.dropout_p = dropout_p
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout_p)
        self.resid_dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.n_embd, dim=-1)
        q = split_heads(q, self.n_head)
        k = split_heads(k, self.n_head)
        v = split_heads(v, self.n_head)
        positions = torch.arange(x.size(1), device=x.device)
        future = positions[None, :] > positions[:, None]
        scores = q @ k.transpose(-2, -1) * (self.n_embd // self.n_head) ** -0.5
        scores = scores.masked_fill(future, float("-inf"))
        y = merge_heads(self.attn_dropout(scores.softmax(dim=-1)) @ v)
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    """Feed-forward block: widen four times, tanh-approximated GELU, project back."""

    def __init__(self, n_embd: int, dropout_p: float) -> None:
        super().__init__()
        self.n_embd = n_embd
        self.dropout_p = dropout_p
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, layer_norm_eps: float, dropout_p: float) -> None:
        super().__init__()
        self.n_embd = n_embd
        self.n_head = n_head
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.ln_1 = nn.LayerNorm(n_embd, eps=layer_norm_eps)
        self.attn = GPT2Attention(n_embd, n_head, dropout_p)
        self.ln_2 = nn.LayerNorm(n_embd, eps=layer_norm_eps)
        self.mlp = GPT2MLP(n_embd, dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    """GPT-2 language model returning ``(batch, seq, vocab)`` logits.

    ``lm_head.weight`` is the same Parameter as ``wte.weight`` (tied, counted once). The residual
    projections (``c_proj``) start with std ``0.02 / sqrt(2 * n_layer)``, as in the GPT-2 paper.
    """

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        layer_norm_eps: float = 1e-5,
        dropout_p: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(dropout_p)
        self.h = nn.ModuleList(
            GPT2Block(n_embd, n_head, layer_norm_eps, dropout_p) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, eps=layer_norm_eps)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(init_normal)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * n_layer))
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# T5 ------------------------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset.

    Half of the buckets hold exact distances, the other half log-spaced distances up to
    ``max_distance`` (farther ones share the last bucket). Bidirectional attention splits the
    buckets in two halves, for keys before and after the query; causal attention only sees keys
    at or before the query.
    """
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_scale = (num_buckets - max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (torch.log(distance.clamp(min=1).float() / max_exact) * log_scale).long()
    far = far.clamp(max=num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance, far)


class T5Attention(nn.Module):
    """Unscaled multi-head attention without biases; the scale is folded into the init.

    With ``has_relative_attention_bias`` it owns the bucketed position bias that the whole stack
    shares (see ``compute_bias``); ``is_decoder`` makes that bias one-sided.
    """

    def __init__(
        self,
        d_model: int,
        d_kv: int,
        num_heads: int,
        dropout_p: float,
        has_relative_attention_bias: bool = False,
        is_decoder: bool = False,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_kv = d_kv
        self.num_heads = num_heads
        self.dropout_p = dropout_p
        self.has_relative_attention_bias = has_relative_attention_bias
        self.is_decoder = is_decoder
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        inner_dim = num_heads * d_kv
        self.q = nn.Linear(d_model, inner_dim, bias=False)
        self.k = nn.Linear(d_model, inner_dim, bias=False)
        self.v = nn.Linear(d_model, inner_dim, bias=False)
        self.o = nn.Linear(inner_dim, d_model, bias=False)
        self.dropout = nn.Dropout(dropout_p)
        nn.init.normal_(self.q.weight, std=(d_model * d_kv) ** -0.5)
        nn.init.normal_(self.k.weight, std=d_model**-0.5)
        nn.init.normal_(self.v.weight, std=d_model**-0.5)
        nn.init.normal_(self.o.weight, std=inner_dim**-0.5)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(relative_attention_num_buckets, num_heads)
            nn.init.normal_(self.relative_attention_bias.weight, std=d_model**-0.5)

    def compute_bias(
        self, query_length: int, key_length: int, device: torch.device
    ) -> torch.Tensor:
        """Position bias of shape ``(1, heads, query_length, key_length)``."""
        queries = torch.arange(query_length, device=device)
        keys = torch.arange(key_length, device=device)
        buckets = relative_position_bucket(
            keys[None, :] - queries[:, None],
            bidirectional=not self.is_decoder,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(
        self, x: torch.Tensor, key_value: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = split_heads(self.q(x), self.num_heads)
        k = split_heads(self.k(key_value), self.num_heads)
        v = split_heads(self.v(key_value), self.num_heads)
        scores = q @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        return self.o(merge_heads(self.dropout(scores.softmax(dim=-1)) @ v))


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention sublayer; ``bias`` carries positions and the causal mask."""

    def __init__(
        self,
        d_model: int,
        d_kv: int,
        num_heads: int,
        layer_norm_eps: float,
        dropout_p: float,
        has_relative_attention_bias: bool,
        is_decoder: bool,
        relative_attention_num_buckets: int,
        relative_attention_max_distance: int,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_kv = d_kv
        self.num_heads = num_heads
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.has_relative_attention_bias = has_relative_attention_bias
        self.is_decoder = is_decoder
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.SelfAttention = T5Attention(
            d_model,
            d_kv,
            num_heads,
            dropout_p,
            has_relative_attention_bias,
            is_decoder,
            relative_attention_num_buckets,
            relative_attention_max_distance,
        )
        self.layer_norm = nn.RMSNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        normed = self.layer_norm(x)
        return x + self.dropout(self.SelfAttention(normed, normed, bias))


class T5LayerCrossAttention(nn.Module):
    """Pre-norm residual attention from the decoder to the encoder output, without bias."""

    def __init__(
        self, d_model: int, d_kv: int, num_heads: int, layer_norm_eps: float, dropout_p: float
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_kv = d_kv
        self.num_heads = num_heads
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.EncDecAttention = T5Attention(d_model, d_kv, num_heads, dropout_p)
        self.layer_norm = nn.RMSNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor, encoder_hidden: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), encoder_hidden))


class T5DenseActDense(nn.Module):
    """ReLU feed-forward without biases."""

    def __init__(self, d_model: int, d_ff: int, dropout_p: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_ff = d_ff
        self.dropout_p = dropout_p
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout_p)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        nn.init.normal_(self.wi.weight, std=d_model**-0.5)
        nn.init.normal_(self.wo.weight, std=d_ff**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi(x))))


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward sublayer."""

    def __init__(self, d_model: int, d_ff: int, layer_norm_eps: float, dropout_p: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_ff = d_ff
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.DenseReluDense = T5DenseActDense(d_model, d_ff, dropout_p)
        self.layer_norm = nn.RMSNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder only) and feed-forward sublayers in ``layer``."""

    def __init__(
        self,
        d_model: int,
        d_kv: int,
        d_ff: int,
        num_heads: int,
        relative_attention_num_buckets: int,
        relative_attention_max_distance: int,
        layer_norm_eps: float,
        dropout_p: float,
        is_decoder: bool,
        has_relative_attention_bias: bool,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.is_decoder = is_decoder
        self.has_relative_attention_bias = has_relative_attention_bias
        self.layer = nn.ModuleList()
        self.layer.append(
            T5LayerSelfAttention(
                d_model,
                d_kv,
                num_heads,
                layer_norm_eps,
                dropout_p,
                has_relative_attention_bias,
                is_decoder,
                relative_attention_num_buckets,
                relative_attention_max_distance,
            )
        )
        if is_decoder:
            self.layer.append(
                T5LayerCrossAttention(d_model, d_kv, num_heads, layer_norm_eps, dropout_p)
            )
        self.layer.append(T5LayerFF(d_model, d_ff, layer_norm_eps, dropout_p))

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, encoder_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.layer[0](x, bias)
        if self.is_decoder:
            x = self.layer[1](x, encoder_hidden)
        return self.layer[-1](x)


class T5Stack(nn.Module):
    """Encoder or decoder stack over already embedded tokens.

    The first block's self-attention computes the relative position bias once; every block adds
    it to its self-attention scores. The decoder also masks future positions with -inf.
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        d_kv: int,
        d_ff: int,
        num_heads: int,
        relative_attention_num_buckets: int,
        relative_attention_max_distance: int,
        layer_norm_eps: float,
        dropout_p: float,
        is_decoder: bool,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.is_decoder = is_decoder
        self.block = nn.ModuleList(
            T5Block(
                d_model,
                d_kv,
                d_ff,
                num_heads,
                relative_attention_num_buckets,
                relative_attention_max_distance,
                layer_norm_eps,
                dropout_p,
                is_decoder,
                has_relative_attention_bias=i == 0,
            )
            for i in range(num_layers)
        )
        self.final_layer_norm = nn.RMSNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(
        self, embeds: torch.Tensor, encoder_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.dropout(embeds)
        seq = x.size(1)
        bias = self.block[0].layer[0].SelfAttention.compute_bias(seq, seq, x.device)
        if self.is_decoder:
            positions = torch.arange(seq, device=x.device)
            bias = bias.masked_fill(positions[None, :] > positions[:, None], float("-inf"))
        for block in self.block:
            x = block(x, bias, encoder_hidden)
        return self.dropout(self.final_layer_norm(x))


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder returning decoder logits ``(batch, decoder_seq, vocab)``.

    ``lm_head.weight`` is the same Parameter as ``shared.weight``; the decoder output is scaled by
    ``d_model ** -0.5`` before it, as T5 does with a tied head.
    """

    def __init__(
        self,
        vocab_size: int = 32128,
        d_model: int = 512,
        d_kv: int = 64,
        d_ff: int = 2048,
        num_layers: int = 6,
        num_heads: int = 8,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        layer_norm_eps: float = 1e-6,
        dropout_p: float = 0.1,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.layer_norm_eps = layer_norm_eps
        self.dropout_p = dropout_p
        self.shared = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.shared.weight, std=1.0)
        stack = partial(
            T5Stack,
            num_layers,
            d_model,
            d_kv,
            d_ff,
            num_heads,
            relative_attention_num_buckets,
            relative_attention_max_distance,
            layer_norm_eps,
            dropout_p,
        )
        self.encoder = stack(is_decoder=False)
        self.decoder = stack(is_decoder=True)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.shared.weight

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        encoder_hidden = self.encoder(self.shared(input_ids))
        x = self.decoder(self.shared(decoder_input_ids), encoder_hidden)
        return self.lm_head(x * self.d_model**-0.5)


# Zoo -----------------------------------------------------------------------------------------

TINY_VOCAB = 1000
T5_INPUTS = ("input_ids", "decoder_input_ids")

MODELS: dict[str, ModelSpec] = {
    "bert_base": ModelSpec(
        build=BertForMaskedLM,
        example_inputs=bert_inputs(30522),
        default_size=128,
        published_params=109_514_298,
        description="BERT-Base with masked-LM head (12 layers, hidden 768, 12 heads)",
    ),
    "bert_large": ModelSpec(
        build=partial(
            BertForMaskedLM,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
        ),
        example_inputs=bert_inputs(30522),
        default_size=128,
        published_params=335_174_458,
        description="BERT-Large with masked-LM head (24 layers, hidden 1024, 16 heads)",
    ),
    "bert_tiny": ModelSpec(
        build=partial(
            BertForMaskedLM,
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
            max_position_embeddings=64,
        ),
        example_inputs=bert_inputs(TINY_VOCAB),
        default_size=32,
        published_params=None,
        description="2-layer BERT with masked-LM head for fast tests",
    ),
    "gpt2": ModelSpec(
        build=GPT2LMHeadModel,
        example_inputs=token_inputs(50257),
        default_size=128,
        published_params=124_439_808,
        description="GPT-2 small language model (12 layers, 768 wide, 12 heads)",
    ),
    "gpt2_medium": ModelSpec(
        build=partial(GPT2LMHeadModel, n_embd=1024, n_layer=24, n_head=16),
        example_inputs=token_inputs(50257),
        default_size=128,
        published_params=354_823_168,
        description="GPT-2 medium language model (24 layers, 1024 wide, 16 heads)",
    ),
    "gpt2_tiny": ModelSpec(
        build=partial(
            GPT2LMHeadModel, vocab_size=TINY_VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4
        ),
        example_inputs=token_inputs(TINY_VOCAB),
        default_size=32,
        published_params=None,
        description="2-layer GPT-2 for fast tests",
    ),
    "t5_small": ModelSpec(
        build=T5ForConditionalGeneration,
        example_inputs=token_inputs(32128, T5_INPUTS),
        default_size=64,
        published_params=60_506_624,
        description="T5-small encoder-decoder (6+6 layers, d_model 512, 8 heads)",
    ),
    "t5_tiny": ModelSpec(
        build=partial(
            T5ForConditionalGeneration,
            vocab_size=TINY_VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=256,
            num_layers=2,
            num_heads=4,
        ),
        example_inputs=token_inputs(TINY_VOCAB, T5_INPUTS),
        default_size=16,
        published_params=None,
        description="2+2-layer T5 for fast tests",
    ),
}
