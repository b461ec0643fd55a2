"""The compared methods: what adapter each serves a user and whether its prompt carries context.

Every adapter is built with the code the server uses: the trainer (`server.training`), the
fusion (`server.fusion`), stacking (`server.stacking`) and the adapter math
(`server.adapters`). OPPU-style and MTA-stacked adapters are served the way the server
serves a stacked LoRA: concatenated onto the adapter under it, as one adapter.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    context: bool = True  # the prompt carries the BM25 top-1 few-shot item
    model: bool = True  # False: a reference row computed from the data alone
    bank: bool = False  # needs the meta-LoRA bank
    fusion_mode: str | None = None  # None: the bank's default
    top_k: int | None = None  # None: the bank's default
    residual_scale: float | None = None  # None: the bank's default (banks with a shared task LoRA)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("base", "base model, zero-shot prompt", context=False),
        Method("rag", "base model, BM25 top-1 few-shot item in the prompt"),
        Method("task_lora", "one non-personalized LoRA trained on all anchor-pool users"),
        Method("oppu", "per-user LoRA (rank 8) trained on the few-shot set on top of task_lora"),
        Method("mta_fuse", "fused meta-LoRAs (bank defaults: top-k, mode)", bank=True),
        Method("mta_fuse_cat", "fused meta-LoRAs, `cat` fusion", bank=True, fusion_mode="cat"),
        Method("mta_fuse_top1", "the nearest anchor's meta-LoRA alone", bank=True, top_k=1),
        Method("mta_fuse_full", "fused meta-LoRAs at residual scale 1 (no shrinkage towards the task LoRA)", bank=True, residual_scale=1.0),
        Method("mta_stack", "fused meta-LoRAs + stacked LoRA trained on the few-shot set", bank=True),
        Method("majority", "the user's most frequent few-shot label (no model)", model=False),
        Method("copy_retrieved", "the label of the BM25 top-1 few-shot item (no model)", model=False),
    )
}
CLASSIFICATION_ONLY = {"majority", "copy_retrieved"}
# The comparisons MTA is judged by (issue 13's goals), reported as paired differences when both
# methods ran: fused (nothing stored) vs one task LoRA, stacked vs a LoRA per user, and both vs
# the no-model baselines.
COMPARISONS = (
    ("mta_fuse", "task_lora"), ("mta_stack", "oppu"), ("mta_stack", "task_lora"),
    ("mta_fuse", "majority"), ("mta_fuse", "copy_retrieved"), ("mta_stack", "majority"), ("mta_stack", "copy_retrieved"),
)  # fmt: skip
DEFAULT_METHODS = (
    "base", "rag", "task_lora", "oppu", "mta_fuse", "mta_fuse_cat", "mta_fuse_full", "mta_stack", "majority",
    "copy_retrieved",
)  # fmt: skip


def parse_methods(text: str | None, *, classification: bool) -> list[Method]:
    """The methods named in `text`; None: DEFAULT_METHODS that apply to the task's kind."""
    if text is None:
        text = ",".join(n for n in DEFAULT_METHODS if classification or n not in CLASSIFICATION_ONLY)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or text!r}: choose from {', '.join(METHODS)}")
    if not classification and (ref := [n for n in names if n in CLASSIFICATION_ONLY]):
        raise ValueError(f"{', '.join(ref)} only apply to classification tasks")
    return [METHODS[n] for n in dict.fromkeys(names)]
