"""A decoder over the model's own layers with a slot KV cache: what continuous batching needs.

`model.generate` runs one batch from start to end: every row waits for the longest, a finished
row keeps its place, nobody joins. Here every row (one sampled sequence) owns a slot of a
preallocated KV cache and its own position, so rows of different lengths decode in one forward
pass, a finished row frees its slot at once and a new request's prefill fills a free slot
between two steps.

The forward pass calls the model's own modules (embeddings, norms, projections, rotary
embedding, MLP, head), so it is exact for the Llama layout that SmolLM2, TinyLlama, Llama 3,
Mistral and Qwen2 share; `supports()` says whether a model has it (others use the fallback
in `fallback.py`). Attention is computed here: per row, over that row's own positions.

Active rows are kept in slots 0..n-1 (a freed slot is filled by moving the last row into it),
so the cache of the active rows is one contiguous view and attention needs no gather.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

ROW_BLOCK = 8
"""the cache grows and shrinks by this many rows"""
LENGTH_BLOCK = 64
"""and by this many positions: attention runs over the allocated length, so it tracks the longest row"""


def supports(model) -> bool:
    """True for decoder-only models with the Llama module layout (and nothing this decoder would skip)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not layers or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return False
    config = model.config
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        return False  # a window would change which positions a row may see
    attn, mlp = layers[0].self_attn, layers[0].mlp
    needed = (hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    extra = {n for n, _ in attn.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb"}
    layer_parts = {n for n, _ in layers[0].named_children()}
    return (all(needed) and not extra and {"gate_proj", "up_proj", "down_proj"} <= {n for n, _ in mlp.named_children()}
            and layer_parts <= {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
            and getattr(config, "hidden_act", "silu") == "silu"
            and getattr(config, "model_type", "") in ("llama", "mistral", "qwen2"))


class SlotDecoder:
    """Prefill prompts into slots, decode one token for every active slot, free slots."""

    def __init__(self, model) -> None:
        self.model = model
        inner, config = model.model, model.config
        self.layers = list(inner.layers)
        self.embed, self.norm, self.rotary, self.head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.scaling = attn.scaling
        self.rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(config, "max_position_embeddings", 2048))
        self.k = self.v = torch.empty(0)
        self.rows = 0  # allocated rows
        self.length = 0  # allocated positions
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        """next position to write, per active slot (= tokens in the cache for that row)"""

    @property
    def active(self) -> int:
        return int(self.positions.numel())

    # -- cache management ------------------------------------------------------
    @torch.inference_mode()
    def _resize(self, rows: int, length: int) -> None:
        rows = max(ROW_BLOCK, math.ceil(rows / ROW_BLOCK) * ROW_BLOCK)
        length = min(max(LENGTH_BLOCK, math.ceil(length / LENGTH_BLOCK) * LENGTH_BLOCK),
                     math.ceil(self.max_positions / LENGTH_BLOCK) * LENGTH_BLOCK)
        if (rows, length) == (self.rows, self.length):
            return
        shape = (len(self.layers), rows * self.kv_heads, length, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        keep_rows, keep_len = min(rows, self.rows, self.active) * self.kv_heads, min(length, self.length)
        if keep_rows and keep_len:
            k[:, :keep_rows, :keep_len] = self.k[:, :keep_rows, :keep_len]
            v[:, :keep_rows, :keep_len] = self.v[:, :keep_rows, :keep_len]
        self.k, self.v, self.rows, self.length = k, v, rows, length

    def fit(self) -> None:
        """Shrink the cache to what the active rows use (after long rows finished)."""
        longest = int(self.positions.max()) + 1 if self.active else 0
        if self.rows > self.active + 2 * ROW_BLOCK or self.length > longest + 2 * LENGTH_BLOCK:
            self._resize(self.active, longest)

    def reset(self) -> None:
        """Drop every row and the cache (after a failed step)."""
        self.positions = self.positions[:0]
        self.k = self.v = torch.empty(0)
        self.rows = self.length = 0

    @torch.inference_mode()
    def free(self, slot: int) -> int | None:
        """Release `slot`; the last active row moves into it. Returns that row's old slot (or None)."""
        last = self.active - 1
        if slot != last:
            h = self.kv_heads
            self.k[:, slot * h:(slot + 1) * h] = self.k[:, last * h:(last + 1) * h]
            self.v[:, slot * h:(slot + 1) * h] = self.v[:, last * h:(last + 1) * h]
            self.positions[slot] = self.positions[last]
        self.positions = self.positions[:last].clone()
        return last if slot != last else None

    # -- forward passes -----------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[int], copies: int = 1) -> torch.Tensor:
        """Run a prompt, store its cache in `copies` new slots (n samples share one prefill).
        Returns the last position's logits, [vocab] (float32)."""
        n = len(ids)
        first = self.active
        self._resize(max(self.rows, first + copies), max(self.length, n + 1))
        x = self.embed(torch.tensor([ids], device=self.device))
        cos, sin = self.rotary(x, torch.arange(n, device=self.device)[None])
        h = self.kv_heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q = attn.q_proj(y).view(1, n, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(y).view(1, n, h, self.head_dim).transpose(1, 2)
            v = attn.v_proj(y).view(1, n, h, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            for c in range(copies):
                slot = first + c
                self.k[i, slot * h:(slot + 1) * h, :n] = k[0]
                self.v[i, slot * h:(slot + 1) * h, :n] = v[0]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.positions = torch.cat([self.positions, torch.full((copies,), n, dtype=torch.long, device=self.device)])
        return self.head(self.norm(x[:, -1]))[0].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for every active slot (tokens[i] goes to slot i). Returns logits [active, vocab]."""
        n, h, d = self.active, self.kv_heads, self.head_dim
        positions = self.positions
        self._resize(self.rows, max(self.length, int(positions.max()) + 1))  # grows only; fit() shrinks
        length = self.length
        x = self.embed(tokens.to(self.device))[:, None]
        cos, sin = self.rotary(x, positions[:, None])
        masked = (torch.arange(length, device=self.device)[None] > positions[:, None])[:, None, None]
        rows = torch.arange(n, device=self.device)
        kv_rows = (rows[:, None] * h + torch.arange(h, device=self.device)[None]).reshape(-1)
        kv_pos = positions.repeat_interleave(h)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q = attn.q_proj(y).view(n, 1, self.heads, d).transpose(1, 2)
            k = attn.k_proj(y).view(n, 1, h, d).transpose(1, 2)
            v = attn.v_proj(y).view(n, 1, h, d).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            self.k[i, kv_rows, kv_pos] = k.reshape(n * h, d)
            self.v[i, kv_rows, kv_pos] = v.reshape(n * h, d)
            keys, values = self.k[i, :n * h], self.v[i, :n * h]  # contiguous: no copy
            scores = torch.bmm(q.reshape(n * h, self.group, d), keys.transpose(1, 2)).view(n, h, self.group, length)
            weights = (scores.float() * self.scaling).masked_fill(masked, float("-inf")).softmax(-1).to(self.dtype)
            o = torch.bmm(weights.view(n * h, self.group, length), values).reshape(n, 1, self.heads * d)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.positions = positions + 1
        return self.head(self.norm(x[:, 0])).float()
