"""The CPU LoRA ops (server/lora_ops) against vLLM's own ops, our punica wrapper against vLLM's, the
platform plugin that selects it, and the server with it on and off."""

from __future__ import annotations

import dataclasses

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as stock

from server.lora_ops import kernel, plugin, prepare_lora_path, punica, unavailable
from server.lora_ops import ops as ours

from .conftest import server_env
from .prerequisites import missing
from .server_process import ServerProcess
from .test_api_e2e import PROFILES, PROMPT, generate, put_profile

RANK = 8
IN = 48
OUT = 40


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def with_empty_slot(weights: torch.Tensor) -> torch.Tensor:
    """vLLM's torch ops read index -1 as the last slot: give them an empty one there."""
    return torch.cat([weights, torch.zeros_like(weights[:1])])


# Per-token slot patterns (-1 = no adapter) and the number of adapter slots.
PATTERNS: dict[str, tuple[list[int], int]] = {
    "one adapter": ([2] * 37, 4),
    "no adapter": ([-1] * 11, 4),
    "mixed segments": ([0] * 9 + [-1] * 5 + [3] * 12 + [1] * 7 + [-1] * 2, 4),
    "single token": ([1], 4),
    "single token no adapter": ([-1], 4),
    "two runs": ([3] * 5 + [0] * 6, 4),
    "many adapters, one token each": (list(range(39, -1, -1)), 40),
    "many adapters, repeated": ([(7 * i) % 12 for i in range(48)], 12),
    "interleaved with no adapter": ([(5 * i) % 7 - 1 for i in range(40)], 6),
    "equal groups in slot order": ([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, 4),
    "few slots far apart": ([0, 37, 0, 37, 37, 0, 37, 0] * 3, 40),
    "far apart with no adapter": ([0, 37, -1, 37, 0, -1] * 3, 40),
    "long run and stragglers": ([2] * 100 + [0, 1, 3, -1, 1], 4),
    "decode tokens then prefills": ([0, 1, -1, 2] + [3] * 40 + [4] * 35 + [5] * 30, 6),
    "decode tokens then prefills, all adapted": (
        [5, 0, 2] + [3] * 40 + [1] * 35 + [4] * 30,
        6,
    ),
    "long prefill chunks among short runs": (
        [0, 1, -1, 2] + [3] * 100 + [4] * 120 + [1] * 30 + [-1] * 99 + [5] * 97,
        6,
    ),
    "long prefill chunks only": ([1] * 97 + [0] * 130 + [2] * 110, 3),
}


def segments(indices: list[int], merge: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_len, lora_indices) as vLLM's compute_meta makes them (or one segment per token)."""
    idx = torch.tensor(indices)
    if merge:
        lora, lengths = torch.unique_consecutive(idx, return_counts=True)
        return lengths, lora
    return torch.ones_like(idx), idx


def sgmv_args(indices: list[int], merge: bool) -> tuple:
    lengths, lora = segments(indices, merge)
    starts = torch.cumsum(lengths, 0) - lengths
    return starts, lengths, lora, len(lora), int(lengths.max()), int(lengths.sum())


@pytest.fixture(params=list(PATTERNS), ids=list(PATTERNS))
def pattern(request) -> tuple[list[int], int]:
    return PATTERNS[request.param]


@pytest.mark.parametrize("four_d", [True, False], ids=["4d", "3d"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "per-token-segments"])
def test_shrink_equals_vllm(pattern, four_d, merge):
    indices, slots = pattern
    g = torch.Generator().manual_seed(len(indices) * 31 + slots)
    x = torch.randn(len(indices), IN, generator=g)
    a = torch.randn(slots, 1, RANK, IN, generator=g)  # [slots, 1, r, in]
    a = a if four_d else a.squeeze(1)
    out = torch.randn(len(indices), RANK + 3, generator=g)  # wider than r: extra columns untouched
    idx = torch.tensor(indices)

    expected, actual = out.clone(), out.clone()
    stock.bgmv_shrink(x, with_empty_slot(a), expected, idx, 0.5)
    ours.bgmv_shrink(x, a, actual, idx, 0.5)
    assert rel_err(actual, expected) <= 1e-5

    expected, actual = out.clone(), out.clone()
    stock.sgmv_shrink(x, with_empty_slot(a), expected, *sgmv_args(indices, merge), 2.0)
    ours.sgmv_shrink(x, a, actual, *sgmv_args(indices, merge), 2.0)
    assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("add_inputs", [True, False], ids=["add", "overwrite"])
@pytest.mark.parametrize("out_cols", [OUT, OUT - 6, OUT + 5], ids=["same-width", "narrower", "wider"])
def test_expand_equals_vllm(pattern, add_inputs, out_cols):
    indices, slots = pattern
    g = torch.Generator().manual_seed(len(indices) * 17 + slots + out_cols)
    x = torch.randn(len(indices), RANK, generator=g)
    b = torch.randn(slots, 1, OUT, RANK, generator=g)  # [slots, 1, out, r]
    out = torch.randn(len(indices), out_cols, generator=g)  # padding on either side: common columns only
    idx = torch.tensor(indices)

    expected, actual = out.clone(), out.clone()
    stock.bgmv_expand(x, with_empty_slot(b), expected, idx, add_inputs)
    ours.bgmv_expand(x, b, actual, idx, add_inputs)
    assert rel_err(actual, expected) <= 1e-5

    expected, actual = out.clone(), out.clone()
    stock.sgmv_expand(x, with_empty_slot(b), expected, *sgmv_args(indices, True), add_inputs)
    ours.sgmv_expand(x, b, actual, *sgmv_args(indices, True), add_inputs)
    assert rel_err(actual, expected) <= 1e-5


@pytest.mark.parametrize("add_inputs", [True, False], ids=["add", "overwrite"])
@pytest.mark.parametrize("offset", [0, 13], ids=["first-slice", "inner-slice"])
def test_expand_slice_equals_vllm(pattern, add_inputs, offset):
    indices, slots = pattern
    g = torch.Generator().manual_seed(len(indices) * 7 + slots + offset)
    size = 24
    x = torch.randn(len(indices), RANK, generator=g)
    b = torch.randn(slots, 1, size, RANK, generator=g)
    out = torch.randn(len(indices), offset + size + 11, generator=g)
    idx = torch.tensor(indices)

    expected, actual = out.clone(), out.clone()
    stock.bgmv_expand_slice(x, with_empty_slot(b), expected, idx, offset, size, add_inputs)
    ours.bgmv_expand_slice(x, b, actual, idx, offset, size, add_inputs)
    assert rel_err(actual, expected) <= 1e-5

    expected, actual = out.clone(), out.clone()
    stock.sgmv_expand_slice(
        x,
        with_empty_slot(b),
        expected,
        *sgmv_args(indices, False),
        offset,
        size,
        add_inputs,
    )
    ours.sgmv_expand_slice(x, b, actual, *sgmv_args(indices, False), offset, size, add_inputs)
    assert rel_err(actual, expected) <= 1e-5


def test_no_adapter_even_when_the_last_slot_is_in_use():
    """-1 is "no adapter" (as vLLM's GPU kernels read it), not the last slot's adapter."""
    a, x = torch.randn(3, 1, RANK, IN), torch.randn(4, IN)
    out = torch.full((4, RANK), 7.0)
    ours.bgmv_shrink(x, a, out, torch.tensor([-1, 2, -1, 2]), 1.0)
    assert torch.equal(out[[0, 2]], torch.zeros(2, RANK))
    y = torch.ones(4, OUT)
    ours.bgmv_expand(
        torch.randn(4, RANK),
        torch.randn(3, 1, OUT, RANK),
        y,
        torch.tensor([-1, -1, 0, -1]),
        True,
    )
    assert torch.equal(y[[0, 1, 3]], torch.ones(3, OUT)) and not torch.equal(y[2], torch.ones(OUT))


def test_expand_row_count_rules_equal_vllm():
    """One token and several output rows: broadcast; more tokens than rows: extra ones dropped."""
    b = torch.randn(3, 1, OUT, RANK)
    for tokens, rows in ((1, 5), (6, 4)):
        x, out, idx = (
            torch.randn(tokens, RANK),
            torch.randn(rows, OUT),
            torch.tensor([1] * tokens),
        )
        for add in (True, False):
            expected, actual = out.clone(), out.clone()
            stock.bgmv_expand(x, b, expected, idx, add)
            ours.bgmv_expand(x, b, actual, idx, add)
            assert rel_err(actual, expected) <= 1e-5


def test_ops_leave_their_inputs_unchanged(pattern):
    """Only the output is written: the inputs and weights (padding rows are zeroed in a copy) stay as they were."""
    indices, slots = pattern
    g = torch.Generator().manual_seed(len(indices) * 13 + slots)
    x, a = (
        torch.randn(len(indices), IN, generator=g),
        torch.randn(slots, 1, RANK, IN, generator=g),
    )
    h, b = (
        torch.randn(len(indices), RANK, generator=g),
        torch.randn(slots, 1, OUT, RANK, generator=g),
    )
    saved = [t.clone() for t in (x, a, h, b)]
    idx = torch.tensor(indices)
    ours.bgmv_shrink(x, a, torch.zeros(len(indices), RANK), idx, 1.0)
    ours.sgmv_shrink(x, a, torch.zeros(len(indices), RANK), *sgmv_args(indices, True), 1.0)
    ours.bgmv_expand(h, b, torch.zeros(len(indices), OUT), idx, True)
    ours.sgmv_expand_slice(
        h,
        b,
        torch.zeros(len(indices), OUT + 4),
        *sgmv_args(indices, False),
        2,
        OUT,
        False,
    )
    for before, after in zip(saved, (x, a, h, b)):
        assert torch.equal(before, after)


def test_plan_cache_keeps_patterns_apart():
    """Two index patterns alternating (as layers of two engine steps never do, but may) stay exact."""
    a = torch.randn(4, 1, RANK, IN)
    for indices in ([0, 1, 2, 3] * 3, [3, 2, 1, 0] * 3, [0, 1, 2, 3] * 3):
        x, expected, actual = (
            torch.randn(12, IN),
            torch.zeros(12, RANK),
            torch.zeros(12, RANK),
        )
        stock.bgmv_shrink(x, a, expected, torch.tensor(indices), 1.0)
        ours.bgmv_shrink(x, a, actual, torch.tensor(indices), 1.0)
        assert rel_err(actual, expected) <= 1e-5


# Decode steps where every adapter has one token (the kernel's case).
ONE_TOKEN_PER_ADAPTER: dict[str, tuple[list[int], int]] = {
    "slots in reverse": PATTERNS["many adapters, one token each"],
    "shuffled, with base tokens": ([3, -1, 0, 7, 5, -1, 1, 30, 12], 32),
}


@pytest.mark.parametrize("name", list(ONE_TOKEN_PER_ADAPTER))
@pytest.mark.parametrize("shape", [(64, 24), (16, 40)], ids=["shrink-like", "rank-16-expand"])
def test_decode_kernel_equals_vllm_in_float32(name, shape, monkeypatch):
    """The C++ kernel (bf16 in, float32 sums) for one-token-per-adapter tiers against vLLM's float32 product."""
    if kernel.build() is None:
        missing("kernel", "the C++ kernel cannot be built here (no AVX512-BF16 or no compiler)")
    monkeypatch.setattr(ours, "_tier_bmm", None)  # the kernel must do every tier
    indices, slots = ONE_TOKEN_PER_ADAPTER[name]
    fin, fout = shape
    g = torch.Generator().manual_seed(len(indices) + fin)
    x = torch.randn(len(indices), fin, generator=g).bfloat16()
    w = torch.randn(slots, 1, fout, fin, generator=g).bfloat16()
    idx = torch.tensor(indices)
    expected = torch.randn(len(indices), fout + 2, generator=g)
    actual = expected.clone()
    stock.bgmv_shrink(x.float(), with_empty_slot(w).float(), expected, idx, 0.5)
    ours.bgmv_shrink(x, w, actual, idx, 0.5)
    assert rel_err(actual, expected) <= 1e-5
    expected = torch.randn(len(indices), fout, generator=g).bfloat16()
    actual = expected.clone()
    stock.bgmv_expand(x, with_empty_slot(w), expected, idx, True)
    ours.bgmv_expand(x, w, actual, idx, True)
    assert rel_err(actual.float(), expected.float()) <= 2**-7


# --- our punica wrapper against vLLM's PunicaWrapperCPU ---------------------------------------


@pytest.fixture()
def installed(monkeypatch, tmp_path):
    """Counts written to a fresh stats directory by the wrappers built in the test."""
    monkeypatch.setenv(plugin.STATS_DIR_ENV, str(tmp_path / "stats"))
    plugin.reset_stats()
    yield tmp_path / "stats"
    plugin.reset_stats()


LORA_IDS = [
    11,
    12,
    13,
    14,
]  # slot i holds LoRA id LORA_IDS[i]; LoRA id 0 is "no adapter"


_stock = False  # inside `vllm_stock()`: wrappers are vLLM's own


def punica_wrapper(token_lora_ids: list[int], prefill: bool = True):
    """Our CPU punica wrapper (vLLM's inside `vllm_stock()`) with the step's metadata, as vLLM's
    model runner sets it."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = (PunicaWrapperCPU if _stock else punica.MtaPunicaWrapperCPU)(256, 32, "cpu")
    mapping = LoRAMapping(token_lora_ids, token_lora_ids, is_prefill=prefill)
    wrapper.update_metadata(mapping, LORA_IDS, len(LORA_IDS), 100)
    return wrapper


@contextmanager
def vllm_stock(*wrappers):
    """vLLM's own PunicaWrapperCPU for the duration: for the wrappers built meanwhile, and for
    `wrappers` (ours, which run vLLM's methods on the same metadata until the block ends)."""
    global _stock
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    _stock = True
    for w in wrappers:
        w.__class__ = PunicaWrapperCPU
    try:
        yield
    finally:
        _stock = False
        for w in wrappers:
            w.__class__ = punica.MtaPunicaWrapperCPU


def lora_linear(
    dtype: torch.dtype,
    token_lora_ids: list[int],
    seed: int = 0,
    prefill: bool = True,
    outs: tuple[int, ...] = (40, 16, 16),
) -> torch.Tensor:
    """One qkv-like LoRA linear (3 slices by default) through PunicaWrapperCPU, as vLLM's LoRA layers call it.

    With base tokens (LoRA id 0) the last slot is left empty, as vLLM's ops need.
    """
    g = torch.Generator().manual_seed(seed)
    slots = len(LORA_IDS)
    a = tuple(torch.randn(slots, 1, RANK, IN, generator=g).to(dtype) for _ in outs)
    b = tuple(torch.randn(slots, 1, o, RANK, generator=g).to(dtype) for o in outs)
    if 0 in token_lora_ids:
        for t in a + b:
            t[-1] = 0
    x = torch.randn(len(token_lora_ids), IN, generator=g).to(dtype)
    y = torch.randn(len(token_lora_ids), sum(outs), generator=g).to(dtype)
    punica_wrapper(token_lora_ids, prefill).add_lora_linear(y, x, a, b, 1.0, outs)
    return y


TOKEN_LORA_IDS = [11] * 6 + [13] * 3 + [12] * 9 + [14] * 2  # every slot in use, no base tokens


def test_the_platform_plugin_selects_our_wrapper_through_vllms_seams_and_counts(installed, monkeypatch):
    """vLLM resolves the platform and its punica wrapper by name, as its model runner does; vLLM's
    own modules are left as they are."""
    from importlib.metadata import entry_points

    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.platforms import cpu_platform_plugin
    from vllm.utils.import_utils import resolve_obj_by_qualname

    (entry,) = [e for e in entry_points(group="vllm.platform_plugins") if e.name == "mta_cpu"]  # pyproject's
    monkeypatch.setenv(plugin.ENABLE_ENV, "1")
    platform = resolve_obj_by_qualname(entry.load()())
    assert issubclass(platform, resolve_obj_by_qualname(cpu_platform_plugin()))  # the CPU platform vLLM picks
    wrapper = resolve_obj_by_qualname(platform.get_punica_wrapper())
    assert wrapper is punica.MtaPunicaWrapperCPU and issubclass(wrapper, punica_cpu.PunicaWrapperCPU)
    assert punica_cpu.sgmv_shrink is stock.sgmv_shrink and punica_cpu.PunicaWrapperCPU.add_lora_linear is not wrapper.add_lora_linear
    lora_linear(torch.float32, TOKEN_LORA_IDS)  # the whole-layer call
    lora_linear(torch.float32, TOKEN_LORA_IDS)
    punica_wrapper(TOKEN_LORA_IDS).add_shrink(  # a per-slice path: vLLM's method, our op
        torch.zeros(1, len(TOKEN_LORA_IDS), RANK), torch.randn(len(TOKEN_LORA_IDS), IN), (torch.randn(4, 1, RANK, IN),), 1.0
    )
    counts = plugin.call_counts()
    assert counts["add_lora_linear"] == 2 and counts["sgmv_shrink"] == 1, counts
    stats = json.loads(next(installed.glob("*.json")).read_text())
    assert stats["counts"]["add_lora_linear"] >= 1
    monkeypatch.setenv(plugin.ENABLE_ENV, "0")
    assert entry.load()() is None  # MTA_FAST_CPU_LORA_OPS=0: vLLM's own platform and ops
    monkeypatch.setenv(plugin.ENABLE_ENV, "1")
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")  # vLLM would skip the plugin: the engine says so
    assert entry.load()() is None and "VLLM_TARGET_DEVICE=cpu" in unavailable()
    assert prepare_lora_path("cpu", "bfloat16", True) == "stock"


LINEAR_CASES = (
    TOKEN_LORA_IDS,
    [12] * 20,
    [11, 12, 13, 14] * 5,
    [0, 0, 13, 13, 0, 11],
    [0] * 5,
    [14] * 120 + [12, 0, 11],
)


@pytest.mark.parametrize("outs", [(40, 16, 16), (24, 24), (40,)], ids=["qkv", "gate-up", "one-slice"])
@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
def test_lora_linear_float32_equals_vllm(installed, prefill, outs):
    """The plugin's add_lora_linear (one shrink for all slices) against vLLM's PunicaWrapperCPU path."""
    for token_lora_ids in LINEAR_CASES:
        ours_y = lora_linear(torch.float32, token_lora_ids, prefill=prefill, outs=outs)
        with vllm_stock():
            stock_y = lora_linear(torch.float32, token_lora_ids, prefill=prefill, outs=outs)
        assert rel_err(ours_y, stock_y) <= 1e-5, token_lora_ids


def test_fused_lora_a_follows_weight_updates(installed):
    """The concatenated A of a layer is rebuilt when vLLM writes a slot (set_lora/reset_lora write in place)."""
    g = torch.Generator().manual_seed(5)
    outs = (40, 16, 16)
    a = tuple(torch.randn(4, 1, RANK, IN, generator=g) for _ in outs)
    b = tuple(torch.randn(4, 1, o, RANK, generator=g) for o in outs)
    x = torch.randn(len(TOKEN_LORA_IDS), IN, generator=g)
    wrapper = punica_wrapper(TOKEN_LORA_IDS)
    for update in (
        None,
        lambda: a[1][2, 0, :, :5].copy_(torch.randn(RANK, 5, generator=g)),
        lambda: a[0].__setitem__(1, 0),
    ):
        if update is not None:
            update()
        y = torch.zeros(len(TOKEN_LORA_IDS), sum(outs))
        wrapper.add_lora_linear(y, x, a, b, 1.0, outs)
        expected = torch.zeros_like(y)
        with vllm_stock(wrapper):
            wrapper.add_lora_linear(expected, x, a, b, 1.0, outs)
        assert rel_err(y, expected) <= 1e-5


@pytest.mark.parametrize(
    "with_lm_head",
    [(0, 1, 2, 3), (1, 3), ()],
    ids=["every-adapter", "some-adapters", "no-adapter"],
)
def test_lora_logits_equals_vllm_and_skips_slots_without_lm_head_weights(installed, monkeypatch, with_lm_head):
    """Slots without LM-head weights (all zero, as vLLM leaves them) get no LM-head work; the rest as vLLM."""
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.zeros(5, 1, RANK, IN),
        torch.zeros(5, 1, 64, RANK),
    )  # slot 4: empty, for vLLM's index -1
    for slot in with_lm_head:
        a[slot], b[slot] = (
            torch.randn(1, RANK, IN, generator=g),
            torch.randn(1, 64, RANK, generator=g),
        )
    if not with_lm_head:
        monkeypatch.setattr(punica, "bgmv_shrink", None)  # must not be called
    for token_lora_ids, prefill in (
        (TOKEN_LORA_IDS, True),
        ([11, 12, 13, 14, 0, 13], False),
    ):
        wrapper = punica_wrapper(token_lora_ids, prefill)
        x = torch.randn(wrapper.sampler_indices.shape[0], IN, generator=g)
        y = torch.randn(x.shape[0], 64, generator=g)
        ours_y, stock_y = y.clone(), y.clone()
        wrapper.add_lora_logits(ours_y, x, a, b, 1.0)
        with vllm_stock(wrapper):
            wrapper.add_lora_logits(stock_y, x, a, b, 1.0)
        assert rel_err(ours_y, stock_y) <= 1e-5
        assert torch.equal(ours_y, y) == (not with_lm_head)


@pytest.mark.parametrize("ids", [TOKEN_LORA_IDS, [14, 0, 12, 11, 13]], ids=["runs", "one-token-per-adapter"])
@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
def test_lora_linear_bfloat16_matches_vllm_to_bfloat16_precision(installed, prefill, ids):
    """bf16 shrinks are computed in bf16 or by the kernel (see ops.py): the layer output agrees to bf16 rounding."""
    ours_y = lora_linear(torch.bfloat16, ids, prefill=prefill).float()
    with vllm_stock():
        stock_y = lora_linear(torch.bfloat16, ids, prefill=prefill).float()
    assert rel_err(ours_y, stock_y) <= 2**-7


# --- the kernel's whole-layer call (`lora_linear`: decode steps, short prompts) -------------

KERNEL_IN = 64  # the kernel needs an input width that is a multiple of 32 and rank 16 or a multiple of 32

# Token LoRA ids (0: no adapter) for steps that take the whole-layer call.
FUSED_CASES: dict[str, list[int]] = {
    "one token per adapter": [14, 12, 11, 13],
    "base tokens mixed in": [14, 0, 12, 0, 11, 13, 0],
    "one shared adapter": [12] * 9,
    "repeated adapters": [11, 12, 13, 14, 12, 11] * 4,
    "short prompts of many adapters": [11] * 30 + [12] * 25 + [0] * 7 + [13] * 40 + [14] * 20,
}
FUSED_OUTS = {
    "qkv": (160, 48, 48),  # full 64-output tiles, 16-output blocks
    "gate-up": (70, 70),  # a 6-output tail
    "one-slice": (40,),
}


def kernel_weights(outs: tuple[int, ...], rank: int, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """bf16 LoRA weights as vLLM stacks them; the last slot is left empty for vLLM's index -1."""
    g = torch.Generator().manual_seed(seed)
    slots = len(LORA_IDS)
    a = tuple((torch.randn(slots, 1, rank, KERNEL_IN, generator=g) * 0.2).bfloat16() for _ in outs)
    b = tuple((torch.randn(slots, 1, o, rank, generator=g) * 0.2).bfloat16() for o in outs)
    for t in a + b:
        t[-1] = 0
    return a, b


def update_wrapper(wrapper, token_lora_ids: list[int], prefill: bool = True) -> None:
    """A new step's metadata on an existing wrapper, as vLLM's model runner sets it before each step."""
    from vllm.lora.layers.utils import LoRAMapping

    wrapper.update_metadata(LoRAMapping(token_lora_ids, token_lora_ids, is_prefill=prefill), LORA_IDS, len(LORA_IDS), 100)


def layer_output(wrapper, x, a, b, outs, y0) -> torch.Tensor:
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, outs)
    return y


@pytest.fixture()
def fused_calls(installed, monkeypatch) -> list[int]:
    """Counts the kernel's whole-layer calls (skips where the kernel cannot be built)."""
    if kernel.build() is None:
        missing("kernel", "the C++ kernel cannot be built here (no AVX512-BF16 or no compiler)")
    calls: list[int] = []
    for name in ("lora_linear", "lora_linear_packed"):
        real = getattr(kernel, name)

        def counted(*args, real=real, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(kernel, name, counted)
    return calls


@pytest.mark.parametrize("rank", [16, 32])
@pytest.mark.parametrize("outs", list(FUSED_OUTS.values()), ids=list(FUSED_OUTS))
@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("prefill", [True, False], ids=["prefill-metadata", "decode-metadata"])
def test_fused_lora_linear_matches_vllm_to_bfloat16_precision(fused_calls, case, outs, rank, prefill):
    """The whole-layer call against vLLM's stock PunicaWrapperCPU.add_lora_linear, bf16 in and out."""
    ids = FUSED_CASES[case]
    a, b = kernel_weights(outs, rank, seed=len(ids) + rank)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(ids), KERNEL_IN, generator=g).bfloat16()
    y0 = torch.randn(len(ids), sum(outs) + 5, generator=g).bfloat16()  # wider than the slices: the rest untouched
    wrapper = punica_wrapper(ids, prefill)
    ours_y = layer_output(wrapper, x, a, b, outs, y0)
    assert fused_calls
    with vllm_stock(wrapper):
        stock_y = layer_output(wrapper, x, a, b, outs, y0)
    assert rel_err(ours_y.float(), stock_y.float()) <= 2**-7
    base_rows = [i for i, lora_id in enumerate(ids) if lora_id == 0]
    assert torch.equal(ours_y[base_rows], y0[base_rows]) and torch.equal(ours_y[:, sum(outs) :], y0[:, sum(outs) :])


def test_fused_lora_linear_is_exact_to_its_two_roundings(fused_calls):
    """h = bf16(scale * x @ A.T) and y = bf16(y + h @ B.T), each from a float32 sum: against a float64 reference."""
    module = kernel.get()
    outs = (160, 48, 48)
    a, b = kernel_weights(outs, 16, seed=3)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, KERNEL_IN, generator=g).bfloat16()
    y = torch.randn(6, sum(outs), generator=g).bfloat16()
    rows, slots = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 0, 1, 2])
    expected = y.double()
    for t, s in zip(rows.tolist(), slots.tolist()):
        offset = 0
        for ai, bi, size in zip(a, b, outs):
            h = (x[t].double() @ ai[s, 0].double().T * 0.5).bfloat16().double()
            expected[t, offset : offset + size] += h @ bi[s, 0].double().T
            offset += size
    for packed in (False, True):
        actual = y.clone()
        if packed:
            kernel.lora_linear_packed(module, x, actual, kernel.packed.get(module, a, b), outs, Plan(rows, slots), 0.5)
        else:
            kernel.lora_linear(module, x, actual, a, b, outs, Plan(rows, slots), 0.5)
        assert rel_err(actual.double(), expected.bfloat16().double()) <= 2**-8
        assert torch.equal(actual[[1, 4]], y[[1, 4]])


@dataclasses.dataclass
class Plan:  # the two fields of `ops._Plan` the kernel reads
    token_rows: torch.Tensor
    token_slots: torch.Tensor


def test_the_packed_kernel_reads_only_each_slots_used_rank_and_gives_the_same_bits(fused_calls):
    """vLLM pads an adapter of lower rank with zeros up to the slot's rank: the packed copy finds
    each slot's used rank and keeps only that (rounded up to even), and its result is bit for bit
    the one of the same weights packed at the full rank."""
    module = kernel.get()
    outs = (160, 48, 48)
    a, b = kernel_weights(outs, 16, seed=21)
    for s, used in enumerate((5, 16, 8)):  # slot 3 stays empty (kernel_weights)
        for t in a:
            t[s, :, used:] = 0
        for t in b:
            t[s, ..., used:] = 0
    layer = kernel.packed.get(module, a, b)
    assert layer.ranks.tolist() == [5, 16, 8, 0]
    assert torch.equal(layer.block[2, : 8 * (3 * KERNEL_IN + sum(outs))], kernel.pack_slots(a, b, 8)[2])
    full = kernel.PackedLayer(kernel.pack_slots(a, b, 16), torch.full((4,), 16), outs)
    g = torch.Generator().manual_seed(23)
    x = torch.randn(8, KERNEL_IN, generator=g).bfloat16()
    y = torch.randn(8, sum(outs), generator=g).bfloat16()
    plan = Plan(torch.arange(8), torch.tensor([0, 1, 2, 3, 2, 0, 1, 3]))
    ranked, reference = y.clone(), y.clone()
    kernel.lora_linear_packed(module, x, ranked, layer, outs, plan, 0.5)
    kernel.lora_linear_packed(module, x, reference, full, outs, plan, 0.5)
    assert torch.equal(ranked, reference) and not torch.equal(ranked, y)
    assert torch.equal(ranked[[3, 7]], y[[3, 7]])  # the empty slot adds nothing
    for t in (*a, *b):  # vLLM's reset_lora, then an adapter of rank 2 in slot 1
        t[1] = 0
    a[0][1, 0, 1, :3] = 1.0
    assert kernel.packed.get(module, a, b).ranks.tolist() == [5, 2, 8, 0]


def test_fused_lora_linear_follows_weight_and_metadata_updates(fused_calls):
    """The packed weights are rewritten when vLLM writes a slot, and the plan when the step's metadata changes."""
    outs = (160, 48, 48)
    a, b = kernel_weights(outs, 16, seed=5)
    g = torch.Generator().manual_seed(13)
    wrapper = punica_wrapper([11, 12, 13, 14], prefill=True)
    steps = (
        ([11, 12, 13, 14], None),
        ([14, 0, 12, 11, 13], lambda: a[1][2, 0, :, :5].copy_(torch.randn(16, 5, generator=g).bfloat16())),
        ([12, 12, 0, 13], lambda: b[2][1].copy_(torch.randn(1, 48, 16, generator=g).bfloat16())),
        ([13, 11], lambda: a[0].__setitem__(2, 0)),  # vLLM's reset_lora
    )
    for ids, update in steps:
        if update is not None:
            update()
        update_wrapper(wrapper, ids)
        assert_layer_follows_vllm(wrapper, a, b, outs, len(ids), g)
    assert len(fused_calls) == len(steps)


def assert_layer_follows_vllm(wrapper, a, b, outs: tuple[int, ...], n_tokens: int, g: torch.Generator) -> None:
    """Our layer output for the wrapper's current step is vLLM's, for random inputs."""
    x = torch.randn(n_tokens, KERNEL_IN, generator=g).bfloat16()
    y0 = torch.randn(n_tokens, sum(outs), generator=g).bfloat16()
    ours_y = layer_output(wrapper, x, a, b, outs, y0)
    with vllm_stock(wrapper):
        stock_y = layer_output(wrapper, x, a, b, outs, y0)
    assert rel_err(ours_y.float(), stock_y.float()) <= 2**-7


def test_the_kernel_splits_tokens_over_torchs_threads_with_the_same_bits(fused_calls):
    """Tokens are independent: torch's intra-op threads share them, and the output does not
    depend on how many there are."""
    module = kernel.get()
    outs = (160, 48, 48)
    a, b = kernel_weights(outs, 16, seed=37)
    layer = kernel.packed.get(module, a, b)
    g = torch.Generator().manual_seed(41)
    x = torch.randn(40, KERNEL_IN, generator=g).bfloat16()
    y = torch.randn(40, sum(outs), generator=g).bfloat16()
    plan = Plan(torch.arange(40), torch.randint(0, 4, (40,), generator=g))
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outputs.append(y.clone())
            kernel.lora_linear_packed(module, x, outputs[-1], layer, outs, plan, 0.5)
            outputs.append(y.clone())
            kernel.lora_linear(module, x, outputs[-1], a, b, outs, plan, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outputs[i % 2]) for i, o in enumerate(outputs)) and not torch.equal(outputs[0], y)


def test_loading_one_adapter_repacks_only_its_slot(fused_calls):
    """vLLM loads an adapter into one slot and says so in the step's `lora_index_to_id`: only that
    slot of the packed copy is rewritten (one slot's copy per layer, not all of them); a write the
    slot ids do not explain repacks every slot. Outputs follow vLLM's ops throughout."""
    from vllm.lora.layers.utils import LoRAMapping

    outs = (160, 48, 48)
    a, b = kernel_weights(outs, 16, seed=29)
    g = torch.Generator().manual_seed(31)
    wrapper = punica_wrapper([11])

    def step(slot_ids: list[int], token_ids: list[int]) -> int:
        before = kernel.packed.slots_packed
        wrapper.update_metadata(LoRAMapping(token_ids, token_ids, is_prefill=True), slot_ids, len(slot_ids), 100)
        assert_layer_follows_vllm(wrapper, a, b, outs, len(token_ids), g)
        return kernel.packed.slots_packed - before

    assert step([11, 12, 13, 14], [11, 12, 13, 14, 11]) == 4  # first use: every slot
    for t in (*a, *b):  # adapter 15 (rank 4) replaces 13 in slot 2, as vLLM's reset_lora + set_lora
        t[2] = 0
        t[2, ..., :4, :] = (torch.randn_like(t[2, ..., :4, :].float(), generator=g) * 0.2).bfloat16()
    assert step([11, 12, 15, 14], [15, 11, 15, 14]) == 1
    assert step([11, 12, 15, 14], [15, 12]) == 0  # nothing written
    a[0][1, 0, :2] = 0.5  # a write the slot ids do not explain
    assert step([11, 12, 15, 14], [12, 15]) == 4


def test_fused_lora_linear_without_version_counters_reads_vllms_weights(fused_calls):
    """Inference tensors cannot tell when they change: no packed copy, the kernel reads vLLM's layout."""
    outs = (160, 48, 48)
    with torch.inference_mode():
        a, b = kernel_weights(outs, 16, seed=9)
    assert kernel.packed.get(kernel.get(), a, b) is None
    ids = FUSED_CASES["base tokens mixed in"]
    g = torch.Generator().manual_seed(17)
    x = torch.randn(len(ids), KERNEL_IN, generator=g).bfloat16()
    y0 = torch.randn(len(ids), sum(outs), generator=g).bfloat16()
    wrapper = punica_wrapper(ids)
    ours_y = layer_output(wrapper, x, a, b, outs, y0)
    assert fused_calls
    with vllm_stock(wrapper):
        stock_y = layer_output(wrapper, x, a, b, outs, y0)
    assert rel_err(ours_y.float(), stock_y.float()) <= 2**-7


def test_without_the_kernel_layers_take_the_per_slice_ops(installed, monkeypatch):
    """MTA_LORA_CPU_KERNEL=0 or no build: the same steps go through the torch ops, still as vLLM."""
    monkeypatch.setattr(kernel, "get", lambda: None)
    monkeypatch.setattr(kernel, "lora_linear", None)  # must not be called
    outs = (160, 48, 48)
    a, b = kernel_weights(outs, 16, seed=21)
    for ids in FUSED_CASES.values():
        g = torch.Generator().manual_seed(len(ids))
        x = torch.randn(len(ids), KERNEL_IN, generator=g).bfloat16()
        y0 = torch.randn(len(ids), sum(outs), generator=g).bfloat16()
        wrapper = punica_wrapper(ids)
        ours_y = layer_output(wrapper, x, a, b, outs, y0)
        with vllm_stock(wrapper):
            stock_y = layer_output(wrapper, x, a, b, outs, y0)
        assert rel_err(ours_y.float(), stock_y.float()) <= 2**-7


def test_which_steps_take_the_whole_layer_call():
    """Decode-sized steps and steps of prompts of ordinary length do; a step with a long run (a long prefill chunk) does not."""

    def fused(slots: list[int], lengths: list[int]) -> bool:
        return ours._make_plan(slots, lengths).token_rows is not None

    assert fused(list(range(32)), [1] * 32)
    assert fused([3], [ours.FUSED_MAX_TOKENS])
    assert fused([0, 1, -1, 2], [38, 38, 5, 38])
    assert fused([3], [ours.FUSED_MAX_RUN - 1])
    assert fused([0, 1], [228, 228])
    assert fused([0, -1, 1], [20, ours.FUSED_MAX_RUN, 20])  # a long run without an adapter costs the kernel nothing
    assert not fused([3], [ours.FUSED_MAX_RUN])
    assert not fused([0, 1, 2], [20, ours.FUSED_MAX_RUN, 20])
    plan = ours._make_plan([2, -1, 0, 0], [2, 1, 1, 2])
    assert plan.token_rows.tolist() == [0, 1, 3, 4, 5] and plan.token_slots.tolist() == [2, 2, 0, 0, 0]


# --- end to end: the server with the plugin on (session server) and off --------------------


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory, tiny_model_dir, tiny_bank):
    """(plugin on, plugin off): the session server and a second one started alongside it."""
    tmp = tmp_path_factory.mktemp("server-stock-lora-ops")
    off = ServerProcess(tmp, server_env(tmp, tiny_model_dir, tiny_bank, MTA_FAST_CPU_LORA_OPS="0"))
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(off.start)
        on = request.getfixturevalue("server")
        starting.result()
    yield on, off
    off.stop()


def test_greedy_outputs_equal_with_and_without_the_plugin(servers):
    users = ["lora-ops-base"]
    for theme, items in PROFILES.items():
        for server in servers:
            with server.client() as c:
                put_profile(c, f"lora-ops-{theme}", items)
        users.append(f"lora-ops-{theme}")

    def run(args: tuple[ServerProcess, str]) -> list[int]:
        server, user = args
        with server.client() as c:
            return generate(c, user, PROMPT, max_tokens=16)["token_ids"]

    outputs = []
    for server in servers:  # one request at a time, then all together (mixed segments, base tokens)
        alone = [run((server, u)) for u in users]
        with ThreadPoolExecutor(len(users)) as pool:
            together = list(pool.map(run, [(server, u) for u in users * 2]))
        assert together == alone * 2
        outputs.append(alone)
    assert outputs[0] == outputs[1]
    assert len({tuple(ids) for ids in outputs[0]}) == len(users)


def test_plugin_is_active_only_in_the_server_that_enables_it(servers):
    on = servers[0]
    on_log, off_log = (Path(s.log_path).read_text(errors="replace") for s in servers)
    in_use = [line for line in on_log.splitlines() if plugin.FIRST_CALL_MESSAGE in line]
    assert in_use, "no LoRA op ran through the plugin in the server"
    assert all(f"pid {on.proc.pid})" not in line for line in in_use)  # ran in vLLM's worker process
    assert plugin.INSTALLED_MESSAGE not in off_log and plugin.FIRST_CALL_MESSAGE not in off_log
