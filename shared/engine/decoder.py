"""A decoder over the model's own layers with a slot KV cache: what continuous batching needs.

`model.generate` runs one batch from start to end: every row waits for the longest, a finished
row keeps its place, nobody joins. Here every row (one sampled sequence) owns a slot of a
preallocated KV cache and its own position, so rows of different lengths decode in one forward
pass, a finished row frees its slot at once and a new request's prefill fills a free slot
between two steps.

The forward pass calls the model's own modules (embeddings, norms, projections, rotary
embedding, MLP, head), so it is exact for the Llama layout that SmolLM2, TinyLlama, Llama 3,
Mistral and Qwen2 share; `supports()` says whether a model has it (others use the fallback
in `fallback.py`). Attention is computed here: per row, over that row's own positions; a decode
step's attention, on CPU, by `attention.c` (native_attention.py), which also rotates and writes the
new keys and values and reads each row's positions in place, else by torch's ops (torch_attention.py).
On CPU each residual add and the RMS norm after it, and the MLP's silu(gate) * up, run fused in
`layer_ops.c` (native_layer_ops.py).

Active rows are kept in slots 0..n-1 (a freed slot is filled by moving the last row into it),
so the cache of the active rows is one strided view and attention needs no gather (torch's ops
run it over the longest active row's positions, masked). A prompt that begins like the previous one (requests share
a system prompt) copies that prefix's keys and values instead of computing them; where prompts
come from several tenants, only a pinned, public prefix is reused (`pinned_prefix`): otherwise a
request's time to first token would tell whether the previous request began with the same text.

Projections that read the same input run as one matmul (q/k/v, gate/up), over weights packed
once for the CPU's matmul library (`Projection`), and the rotary embedding turns q and k in one
pass: at 32 rows on 2 cores the small k/v matmuls ran at half the machine's rate, plain weights
are re-laid-out in every call, and every per-layer op costs its dispatch.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from shared.engine.native_attention import decode_attention
from shared.engine.native_layer_ops import layer_ops
from shared.engine.torch_attention import TorchDecodeAttention, rotated

ROW_BLOCK = 8
"""the cache is allocated for a multiple of this many rows"""
LENGTH_BLOCK = 64
"""the cache is zeroed ahead of the longest row by this many positions at a time"""
INITIAL_LENGTH = 512
"""positions a new cache is allocated for (untouched pages cost no memory)"""


PACK_ROWS = 32
"""the row count oneDNN lays packed weights out for (any count works)"""


def _packable(linears: list[nn.Module]) -> bool:
    weight = getattr(linears[0], "weight", None)
    return (all(type(m) is nn.Linear for m in linears) and weight is not None and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available())


class Projection:
    """x @ W.T + b for one or more nn.Linear that read the same input, as one matmul.

    On CPU the (concatenated) weight is reordered once into oneDNN's blocked layout, as
    torch.compile's CPU freezing does: a plain weight is re-laid-out inside every call, and on
    SmolLM2's decode shapes the packed matmul was 1.3-2.4x faster (1 to 32 rows, bf16 and fp32;
    benchmarks/generation.py). The packed copy costs the projections' size again in memory; the
    model's own weights stay as they are (its forward still uses them), and the copy is taken once:
    an engine's model is loaded for it and never trained in place. Elsewhere, and for
    anything but a plain nn.Linear (quantized, adapter-wrapped), the modules run themselves."""

    def __init__(self, *linears: nn.Module) -> None:
        self.modules = linears
        self.packed = self.bias = None
        if not _packable(list(linears)):
            return
        weight = torch.cat([m.weight.detach() for m in linears])
        if any(m.bias is not None for m in linears):
            self.bias = torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                                   for m in linears])
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        except (AttributeError, RuntimeError):  # a torch build without the op: plain matmuls
            self.bias = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        out = [m(x) for m in self.modules]
        return out[0] if len(out) == 1 else torch.cat(out, -1)


class LayerProjections:
    """One decoder layer's matmuls: q/k/v as one, o, gate/up as one, down."""

    def __init__(self, layer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.layer = layer
        self.qkv = Projection(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = Projection(attn.o_proj)
        self.gate_up = Projection(mlp.gate_proj, mlp.up_proj)
        self.down = Projection(mlp.down_proj)


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

    def __init__(self, model, max_rows: int = ROW_BLOCK, pinned_prefix: list[int] | None = None,
                 native_kernels: bool = True) -> None:
        self.model = model
        self.pinned_prefix = pinned_prefix
        """None: a prompt reuses what it shares with the previous prompt. A list: only these leading
        tokens are ever reused, their cache computed when the decoder is built and kept through
        reset(), so whether a prefill copies a prefix never depends on other prompts; [] reuses nothing"""
        inner, config = model.model, model.config
        self.layers = list(inner.layers)
        self.projections = [LayerProjections(layer) for layer in self.layers]
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.head = Projection(model.lm_head)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.group = self.heads // self.kv_heads
        self.scaling = attn.scaling
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(config, "max_position_embeddings", 2048))
        self.native_attention = decode_attention(self.dtype, self.device, self.kv_heads, self.group, self.head_dim,
                                                 self.scaling) if native_kernels else None
        """decode attention read in place from the cache, each row over its own positions
        (native_attention.py); None, or where it returns None: torch_attention"""
        self.native_kernels = native_kernels
        """asked for: the C kernels where they run (the scheduler's sampler reads it too)"""
        self.layer_ops = layer_ops(self.dtype, self.device, native_kernels)
        """residual add + norm and silu(gate) * up: layer_ops.c's on CPU, else the modules' own"""
        self.torch_attention = TorchDecodeAttention(self.heads, self.kv_heads, self.head_dim, self.scaling,
                                                    self.device, self.dtype)
        self.max_rows = max(ROW_BLOCK, max_rows)
        """slots the cache is allocated for (its pages are touched only as rows use them)"""
        self.k = self.v = torch.empty(0)
        self.capacity = (0, 0)  # (rows, positions) allocated
        self.finite = 0
        """every active row's cache holds finite numbers at positions below this (a LENGTH_BLOCK
        multiple past the longest row); torch's decode attention reads up to the longest row's positions"""
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        """next position to write, per active slot (= tokens in the cache for that row)"""
        self._prefix: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        """the last prompt prefilled (or the pinned prefix) and its keys and values, [layers, kv_heads, tokens, head_dim]"""
        if self.pinned_prefix:
            self.prefill(self.pinned_prefix + self.pinned_prefix[-1:])  # a row that begins with it, then gone
            self.free(self.active - 1)

    @property
    def active(self) -> int:
        return int(self.positions.numel())

    # -- cache management ------------------------------------------------------
    def _blocks(self, length: int) -> int:
        top = math.ceil(self.max_positions / LENGTH_BLOCK) * LENGTH_BLOCK
        return min(max(LENGTH_BLOCK, math.ceil(length / LENGTH_BLOCK) * LENGTH_BLOCK), top)

    @torch.inference_mode()
    def _reserve(self, rows: int, length: int) -> None:
        """Room for `rows` slots, and a finite cache for every active row below `length` positions.

        The allocation is made with torch.empty (on CPU for max_rows slots and at least
        INITIAL_LENGTH positions: pages are touched only as rows use them), grows to at least
        twice its length when a row outgrows it, and is kept when rows finish: the next rows reuse
        it. A zeroed cache allocated for every change of shape (rows joining 8 at a time, every 64
        positions, and again for every generate call) cost 11-18% of a generator batch on SmolLM2
        in page faults. Positions attention may newly cover are zeroed for the active rows a
        block ahead (a row's positions past its own are masked, but garbage could be NaN, and
        NaN - inf and NaN * 0 are NaN); a prefill zeroes its own slots' tail."""
        length = self._blocks(length)
        cap_rows, cap_length = self.capacity
        if rows > cap_rows or length > cap_length:
            lazy = self.device.type == "cpu"  # an accelerator's memory is committed when allocated
            new_rows = math.ceil(max(rows, self.max_rows if lazy else 0, cap_rows) / ROW_BLOCK) * ROW_BLOCK
            new_length = cap_length if length <= cap_length else \
                self._blocks(max(length, 2 * cap_length, INITIAL_LENGTH if lazy else 0))
            shape = (len(self.layers), new_rows * self.kv_heads, new_length, self.head_dim)
            k = torch.empty(shape, dtype=self.dtype, device=self.device)
            v = torch.empty(shape, dtype=self.dtype, device=self.device)
            keep = self.active * self.kv_heads
            if keep and self.finite:
                k[:, :keep, :self.finite] = self.k[:, :keep, :self.finite]
                v[:, :keep, :self.finite] = self.v[:, :keep, :self.finite]
            self.k, self.v, self.capacity = k, v, (new_rows, new_length)
        if length > self.finite:
            for cache in (self.k, self.v):
                cache[:, :self.active * self.kv_heads, self.finite:length] = 0
            self.finite = length

    def fit(self) -> None:
        """Forget the finite span far past the longest row (after long rows finished: free() then
        copies less). The allocation stays on CPU; an accelerator's is given back when no row is
        left (its caching allocator makes the next one cheap)."""
        if not self.active and self.device.type != "cpu":
            self.reset()
            return
        longest = int(self.positions.max()) + 1 if self.active else 0
        if self.finite > longest + 2 * LENGTH_BLOCK:
            self.finite = self._blocks(longest)

    def reset(self) -> None:
        """Drop every row and the cache (after a failed step, when idle on an accelerator, and when the
        engine closes); a pinned prefix's cache stays (it depends on the weights alone)."""
        self.positions = self.positions[:0]
        if self.pinned_prefix is None:
            self._prefix = None
        self.k = self.v = torch.empty(0)
        self.capacity = (0, 0)
        self.finite = 0

    @torch.inference_mode()
    def free(self, slot: int) -> int | None:
        """Release `slot`; the last active row moves into it. Returns that row's old slot (or None)."""
        last = self.active - 1
        if slot != last:
            h = self.kv_heads
            for cache in (self.k, self.v):
                cache[:, slot * h:(slot + 1) * h, :self.finite] = cache[:, last * h:(last + 1) * h, :self.finite]
            self.positions[slot] = self.positions[last]
        self.positions = self.positions[:last].clone()
        return last if slot != last else None

    # -- forward passes -----------------------------------------------------------
    def _layers(self, x: torch.Tensor, attend, last_only: bool = False) -> torch.Tensor:
        """Every layer over x [rows, hidden]; attend(i, qkv) gives layer i's attention output [rows, heads * d]
        from its q, k and v projections side by side (not yet rotated). Returns the final norm's output, of
        the last row only where `last_only` (a prompt's). Each residual add is done by the norm that follows it."""
        ops, pending = self.layer_ops, None
        for i, part in enumerate(self.projections):
            h, x = ops.norm(part.layer.input_layernorm, x, pending)
            h, x = ops.norm(part.layer.post_attention_layernorm, x, part.o(attend(i, part.qkv(h))))
            pending = part.down(ops.silu_mul(part.gate_up(h)))
        if last_only:
            x, pending = x[-1:], pending[-1:]
        return ops.norm(self.norm, x, pending)[0]

    def _shared_prefix(self, ids: list[int]) -> int:
        """Leading tokens of `ids` that the previous prompt had: their cache is copied, not computed
        (requests share a system prompt: 49 of a generator prompt's 62-102 SmolLM2 tokens). At most
        all but the last token, whose logits are needed."""
        if self._prefix is None:
            return 0
        if self.pinned_prefix is not None:
            return len(self.pinned_prefix) if self._begins_with_pinned(ids) else 0
        return min(len(os.path.commonprefix([self._prefix[0], ids])), len(ids) - 1)

    def _begins_with_pinned(self, ids: list[int]) -> bool:
        n = len(self.pinned_prefix or [])
        return 0 < n < len(ids) and ids[:n] == self.pinned_prefix

    @torch.inference_mode()
    def prefill(self, ids: list[int], copies: int = 1) -> torch.Tensor:
        """Run a prompt, store its cache in `copies` new slots (n samples share one prefill).
        Returns the last position's logits, [vocab] (float32)."""
        n, h = len(ids), self.kv_heads
        if not n:
            raise ValueError("an empty prompt has no position to predict from")
        first = self.active
        self._reserve(first + copies, n + 1)
        for cache in (self.k, self.v):  # the new slots' positions past the prompt: see _reserve
            cache[:, first * h:(first + copies) * h, n:self.finite] = 0
        shared = self._shared_prefix(ids)
        positions = torch.arange(shared, n, device=self.device)
        x = self.embed(torch.tensor(ids[shared:], device=self.device))  # [n - shared, hidden]
        cos, sin = (t[0, :, None] for t in self.rotary(x, positions[None]))
        # query i (at position shared + i) sees keys 0..shared + i; without a shared prefix: causal
        mask = torch.arange(n, device=self.device)[None] <= positions[:, None] if shared else None
        keys = torch.empty(len(self.layers), h, n, self.head_dim, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        if shared:
            keys[:, :, :shared], values[:, :, :shared] = self._prefix[1][:, :, :shared], self._prefix[2][:, :, :shared]

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            q, k, v = (t.transpose(0, 1)  # [heads, n - shared, d]
                       for t in rotated(qkv, cos, sin, self.heads, h, self.head_dim))
            keys[i, :, shared:], values[i, :, shared:] = k, v
            for slot in range(first, first + copies):
                self.k[i, slot * h:(slot + 1) * h, :n] = keys[i]
                self.v[i, slot * h:(slot + 1) * h, :n] = values[i]
            o = F.scaled_dot_product_attention(q[None], keys[i][None], values[i][None], attn_mask=mask,
                                               is_causal=mask is None, scale=self.scaling, enable_gqa=True)
            return o[0].transpose(0, 1).reshape(n - shared, -1)

        last = self._layers(x, attend, last_only=True)
        if self.pinned_prefix is None:
            self._prefix = (list(ids), keys, values)
        elif self._prefix is None and self._begins_with_pinned(ids):
            p = len(self.pinned_prefix)
            self._prefix = (list(self.pinned_prefix), keys[:, :, :p].clone(), values[:, :, :p].clone())
        self.positions = torch.cat([self.positions, torch.full((copies,), n, dtype=torch.long, device=self.device)])
        return self.head(last)[0].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for every active slot (tokens[i] goes to slot i). Returns logits [active, vocab]."""
        positions = self.positions
        self._reserve(self.active, int(positions.max()) + 1)
        x = self.embed(tokens.to(self.device))  # [n, hidden]
        cos, sin = (t[:, 0, None] for t in self.rotary(x, positions[:, None]))  # [n, 1, d]

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            o = self.native_attention(qkv, cos, sin, self.k[i], self.v[i], positions) if self.native_attention else None
            return self.torch_attention(qkv, cos, sin, self.k[i], self.v[i], positions) if o is None else o

        out = self._layers(x, attend)
        self.positions = positions + 1
        return self.head(out).float()
