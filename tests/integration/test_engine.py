"""The engine on the real tiny model: the slot decoder computes what the model computes, and
continuous batching lets requests join, leave and be cancelled between steps."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from shared.engine import GenerationEngine, GenerationRequest
from shared.engine import decoder as decoder_module
from shared.engine.decoder import SlotDecoder, supports
from shared.engine.native_layer_ops import NativeLayerOps, TorchLayerOps
from shared.registry import ModelRegistry
from shared.wire import ChatMessage, SamplingParams
from tests.helpers import random_tiny_model, wait_for


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


@pytest.fixture(scope="module")
def fp32(tiny_registry):
    path = ModelRegistry(tiny_registry).verified_path("v0001")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("attention", ["native", "strided-keys", "copied-keys"])
def test_slot_decoder_matches_the_models_own_forward_across_joins_and_frees(fp32, monkeypatch, attention):
    """Small blocks make the cache reallocate while rows are active (rows 2 -> 4, positions 64 ->
    128). torch.empty's memory may hold anything, and a NaN that reached a masked position would
    spread through the attention (NaN - inf and NaN * 0 are NaN): here torch.empty returns NaNs,
    and after each reservation the cache outside the active rows' finite span is poisoned too.
    Every decode attention path: attention.c reading each row's own positions in place (which must
    never read a poisoned position), and torch's ops with keys read in place (fp32) and copied out
    first (bf16 on CPU)."""
    assert supports(fp32)
    empty = torch.empty

    def nan_empty(*args, **kwargs) -> torch.Tensor:
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(decoder_module, "ROW_BLOCK", 2)
    monkeypatch.setattr(decoder_module, "INITIAL_LENGTH", 64)
    reserve = SlotDecoder._reserve
    grown: set[tuple[int, int]] = set()

    def poisoning(self, rows: int, length: int) -> None:
        reserve(self, rows, length)
        grown.add(self.capacity)
        h = self.kv_heads
        for cache in (self.k, self.v):
            cache[:, self.active * h:] = float("nan")
            cache[:, :, self.finite:] = float("nan")

    monkeypatch.setattr(SlotDecoder, "_reserve", poisoning)
    decoder = SlotDecoder(fp32, max_rows=2)
    assert decoder.torch_attention.contiguous_keys is False  # fp32: the strided bmm is as fast
    assert decoder.native_attention is not None  # this machine has a C compiler
    assert isinstance(decoder.layer_ops, NativeLayerOps)  # the fused residual add + norm and silu * up
    if attention != "native":  # torch's ops throughout
        decoder.native_attention = None
        decoder.layer_ops = TorchLayerOps()
        decoder.torch_attention.contiguous_keys = attention == "copied-keys"
    prompts = [[5, 17, 33, 101, 7], [9, 8, 7], [40, 41, 42, 43, 44, 45, 46, 47]]
    rows = [list(p) for p in prompts]

    def reference(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return fp32(torch.tensor([ids])).logits[0, -1]

    for ids in rows[:2]:
        assert torch.allclose(decoder.prefill(ids), reference(ids), atol=1e-4)
    logits = decoder.decode(torch.tensor([11, 12]))  # two rows of different lengths in one step
    rows[0].append(11)
    rows[1].append(12)
    assert all(torch.allclose(logits[i], reference(rows[i]), atol=1e-4) for i in range(2))
    decoder.prefill(rows[2])  # joins between steps
    decoder.free(0)  # row 0 leaves; row 2 moves into slot 0
    logits = decoder.decode(torch.tensor([21, 22]))
    rows[2].append(21)
    rows[1].append(22)
    assert torch.allclose(logits[0], reference(rows[2]), atol=1e-4)
    assert torch.allclose(logits[1], reference(rows[1]), atol=1e-4)
    for step in range(70):  # past the first cache block: the cache grows and keeps what it held
        logits = decoder.decode(torch.tensor([30 + step, 31 + step]))
        rows[2].append(30 + step)
        rows[1].append(31 + step)
    assert torch.allclose(logits[0], reference(rows[2]), atol=1e-4)
    assert torch.allclose(logits[1], reference(rows[1]), atol=1e-4)
    assert grown == {(2, 64), (4, 64), (4, 128)}  # both reallocations happened with rows active
    joined = prompts[2][:6] + [60, 61, 62]  # the last prompt's first 6 tokens: their cache is copied
    assert decoder._shared_prefix(joined) == 6
    assert torch.allclose(decoder.prefill(joined), reference(joined), atol=1e-4)
    assert decoder._shared_prefix(joined) == len(joined) - 1  # the same prompt again: all but its last token
    assert torch.allclose(decoder.prefill(joined, copies=2), reference(joined), atol=1e-4)  # two samples
    logits = decoder.decode(torch.tensor([1, 2, 3, 4, 5]))
    for slot, (ids, token) in enumerate(zip([rows[2], rows[1], joined, joined, joined], [1, 2, 3, 4, 5])):
        assert torch.allclose(logits[slot], reference(ids + [token]), atol=1e-4)
    assert grown == {(2, 64), (4, 64), (4, 128), (6, 128)}
    for slot in range(decoder.active - 1, -1, -1):
        decoder.free(slot)
    decoder.fit()
    assert decoder.capacity == (6, 128)  # on CPU the next rows reuse the pages
    decoder.reset()
    assert decoder.capacity == (0, 0) and decoder._shared_prefix(joined) == 0
    assert torch.allclose(decoder.prefill(joined), reference(joined), atol=1e-4)


def test_a_pinned_prefix_is_the_only_cache_prompts_reuse(fp32, tiny_registry):
    """Several tenants (the gateway): a prefill copies only the pinned, public prefix's cache, computed
    when the decoder is built and kept through reset(), never what a prompt shares with the previous
    one beyond it; so whether a prefill copies anything never depends on other requests, and the
    logits stay the model's own. The gateway pins its default system prompt's rendering."""
    pinned = [5, 17, 33]
    decoder = SlotDecoder(fp32, max_rows=4, pinned_prefix=pinned)

    def reference(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return fp32(torch.tensor([ids])).logits[0, -1]

    first, second = pinned + [101, 7, 8, 9], pinned + [101, 7, 8, 10]  # they share 6 tokens, 3 of them pinned
    assert decoder.active == 0 and decoder._shared_prefix(first) == 3  # pinned before any request came
    assert torch.allclose(decoder.prefill(first), reference(first), atol=1e-4)
    assert decoder._shared_prefix(second) == 3  # not 6: the overlap past the pinned prefix is computed again
    assert torch.allclose(decoder.prefill(second, copies=2), reference(second), atol=1e-4)
    assert decoder._shared_prefix([9, 9, 9, 9]) == 0 and decoder._shared_prefix(pinned) == 0  # all but the last
    held = [t.clone() for t in decoder._prefix[1:]]
    other = [6, 17, 33, 101]
    assert torch.allclose(decoder.prefill(other), reference(other), atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(held, decoder._prefix[1:]))  # other prompts never replace it
    decoder.reset()  # a failed step; an accelerator's idle engine
    assert decoder._shared_prefix(second) == 3
    assert torch.allclose(decoder.prefill(second), reference(second), atol=1e-4)
    off = SlotDecoder(fp32, pinned_prefix=[])
    off.prefill(first)
    assert off._shared_prefix(second) == 0  # off: nothing reused, not even the previous prompt
    unpinned = SlotDecoder(fp32)
    unpinned.prefill(first)
    assert unpinned._shared_prefix(second) == 6  # one tenant: the previous prompt's overlap

    system = ChatMessage(role="system", content="You are a careful assistant.")
    with GenerationEngine.from_registry(ModelRegistry(tiny_registry), shared_prefix=[system]) as engine:
        held_ids = engine._batcher.decoder.pinned_prefix
        ids, _ = engine.encode_prompt([system, *ask("How do I sleep better?")], 16)
        assert 0 < len(held_ids) < len(ids) and engine._batcher.decoder._shared_prefix(ids) == len(held_ids)
        own, _ = engine.encode_prompt([ChatMessage(role="system", content="Answer briefly."), *ask("Hi?")], 16)
        assert engine._batcher.decoder._shared_prefix(own) == 0  # a request's own system prompt: computed


def test_requests_with_different_settings_share_steps_and_leave_when_done(tiny_registry):
    steps: list[int] = []
    joined: list = []

    def on_step(rows: int, seconds: float) -> None:
        steps.append(rows)
        if len(steps) == 1:  # the long request is decoding: the short one arrives between two steps
            joined.append(engine.submit(GenerationRequest(ask("Hi"), SamplingParams(
                max_new_tokens=3, temperature=1.3, top_k=5, top_p=0.5), n=1)))

    engine = GenerationEngine.from_registry(ModelRegistry(tiny_registry), on_step=on_step)
    assert engine.batching == "continuous"
    with engine:
        long = engine.submit(GenerationRequest(ask("Tell me about sleep."), SamplingParams(max_new_tokens=120), n=2))
        wait_for(lambda: joined, 30, "the short request joining")
        short = joined[0].future.result(timeout=60)
        long_result = long.future.result(timeout=120)
    assert len(short.candidates) == 1 and short.candidates[0].completion_tokens <= 3
    assert len(long_result.candidates) == 2
    assert engine._batcher.decoder.capacity == (0, 0)  # closing gave the cache's memory back
    assert steps[0] == 2 and max(steps) == 3  # the short row decoded in the same steps as the long ones
    assert 1 <= steps.count(3) <= 2  # and left after its last token (the first came from its prefill)
    tokens = sum(c.completion_tokens for c in short.candidates + long_result.candidates)
    assert sum(steps) == tokens - 3  # every step made one token per active row, and only those


def test_a_cancelled_request_leaves_at_the_next_step(tiny_registry):
    steps: list[int] = []
    cancel_after_first_step: list = []

    def on_step(rows: int, seconds: float) -> None:
        steps.append(rows)
        for job in cancel_after_first_step:
            job.cancel()  # the client goes away while its rows are decoding

    with GenerationEngine.from_registry(ModelRegistry(tiny_registry), on_step=on_step) as e:
        job = e.submit(GenerationRequest(ask("Tell me everything about headaches."),
                                         SamplingParams(max_new_tokens=400), n=3))
        cancel_after_first_step.append(job)
        assert job.future.result(timeout=30).error == "cancelled"
        cancelled_at = len(steps)
        other = e.submit(GenerationRequest(ask("Hi"), SamplingParams(max_new_tokens=5), n=1))
        assert other.future.result(timeout=30).candidates
    assert steps[cancelled_at:] and set(steps[cancelled_at:]) == {1}  # the cancelled rows are gone


def test_seeded_requests_repeat_and_streams_add_up_to_the_result(tiny_registry):
    with GenerationEngine.from_registry(ModelRegistry(tiny_registry)) as engine:
        seeded = GenerationRequest(ask("How do I sleep better?"), SamplingParams(seed=7, max_new_tokens=40), n=2)
        first, second = engine.generate([seeded])[0], engine.generate([seeded])[0]
        assert [c.text for c in first.candidates] == [c.text for c in second.candidates]
        pieces: dict[int, str] = {0: "", 1: ""}
        lock = threading.Lock()

        def on_token(i, j, delta):
            with lock:
                pieces[j] += delta

        streamed = engine.generate([seeded], on_token=on_token)[0]
        assert [pieces[0].strip(), pieces[1].strip()] == [c.text for c in streamed.candidates]


def test_other_architectures_use_static_batching():
    _, tok = random_tiny_model()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    assert not supports(model)
    with GenerationEngine(model, tok, "v0001") as engine:
        assert engine.batching == "static"
        out = engine.generate([GenerationRequest(ask("hello"), SamplingParams(max_new_tokens=5), n=2),
                               GenerationRequest(ask("see a doctor"), SamplingParams(max_new_tokens=3, seed=1))])
        assert [len(r.candidates) for r in out] == [2, 1]
        assert all(c.completion_tokens <= 5 for r in out for c in r.candidates)


def test_every_engine_in_a_process_computes_on_the_one_torch_thread(tiny_registry, monkeypatch):
    """Two live engines (a hot swap, the gate's new and parent models) must not each run torch on
    a thread of their own: a second OpenMP team slows the first (shared/torch_thread.py)."""
    computing: set[str] = set()
    forward = SlotDecoder.decode

    def recording(self, tokens):
        computing.add(threading.current_thread().name)
        return forward(self, tokens)

    monkeypatch.setattr(SlotDecoder, "decode", recording)
    registry = ModelRegistry(tiny_registry)
    first, second = (GenerationEngine.from_registry(registry, "v0001") for _ in range(2))
    try:
        for engine in (first, second):
            engine.generate([GenerationRequest(ask("hello there"), SamplingParams(max_new_tokens=6), 2)])
    finally:
        first.close()
        second.close()
    assert computing == {"torch"}
