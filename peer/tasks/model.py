"""A small causal transformer language model (nanoGPT-like), fast on CPU.

Token + learned position embeddings, ``n_layers`` pre-LayerNorm blocks (causal
self-attention through ``scaled_dot_product_attention(is_causal=True)``, then
a GELU MLP), a final LayerNorm and a linear head. No dropout, so a forward
pass is a pure function of weights and inputs.

Parameter names are stable and grouped by layer (code that splits the model
into fragments "by layer" relies on it)::

    tok_emb.weight, pos_emb.weight
    blocks.<i>.ln1.{weight,bias}, blocks.<i>.attn.qkv.{weight,bias}, blocks.<i>.attn.proj.{weight,bias}
    blocks.<i>.ln2.{weight,bias}, blocks.<i>.mlp.fc.{weight,bias}, blocks.<i>.mlp.proj.{weight,bias}
    ln_f.{weight,bias}, head.weight

The head is untied by default: a tied head would appear twice in
``state_dict()`` (same storage under two names), which makes flattening the
state for a collective error-prone; at vocabularies of a few dozen tokens it
costs only ``vocab * d_model`` parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peer.tasks.base import seeded_torch


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a TransformerLM."""

    vocab_size: int
    max_len: int  # longest input sequence (size of the position embedding)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    tie_weights: bool = False

    def settings(self) -> tuple[str, ...]:
        """The shape as a task's model_settings: every field, heads included (they change no parameter's shape)."""
        return ("model transformer", f"vocab {self.vocab_size}", f"max len {self.max_len}", f"d model {self.d_model}",
                f"layers {self.n_layers}", f"heads {self.n_heads}", f"mlp ratio {self.mlp_ratio}",
                f"tied {'on' if self.tie_weights else 'off'}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, d_model) -> (batch, time, d_model): each position attends to itself and those before."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (b, t, c) -> (b, heads, t, head_dim)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear, GELU, Linear."""

    def __init__(self, d_model: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.proj = nn.Linear(ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (..., d_model), each position on its own."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, d_model) -> (batch, time, d_model): the attention's residual step, then the MLP's."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Causal LM: int64 tokens (batch, time) -> logits (batch, time, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model ({config.d_model}) must be a multiple of n_heads ({config.n_heads})")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.mlp_ratio) for _ in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        # GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layers)
        # so the residual stream's variance does not grow with depth
        residual_std = 0.02 / math.sqrt(2 * max(1, self.config.n_layers))
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 tokens (batch, time) -> logits (batch, time, vocab); time is at most ``config.max_len``."""
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's max_len {self.config.max_len}")
        positions = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_transformer(config: ModelConfig, seed: int) -> TransformerLM:
    """A TransformerLM initialised from ``seed`` alone; the caller's global RNG state is left untouched."""
    with seeded_torch(seed):
        return TransformerLM(config)
