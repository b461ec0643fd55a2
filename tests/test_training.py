"""The shared LoRA trainer on the tiny model: labels, loss going down, exact base adapters, no side effects."""

from __future__ import annotations

import pytest
import torch

from server.adapters import save_adapter, stack
from server.adapters.targets import ModelTargets
from server.bank.random_bank import random_lora
from server.prompts import chat_prompt, user_content
from server.training import (
    IGNORE_INDEX,
    Example,
    TrainConfig,
    _answer_loss,
    _attached,
    _collate,
    encode_example,
    end_of_turn_id,
    load_base_model,
    load_tokenizer,
    lr_factor,
    mean_loss,
    train_lora,
)

EXAMPLES = [
    Example(user_content(f"Which tag fits this movie? {d}", "Description: a classic film Tag: classic"), "comedy")
    for d in (
        "Two clumsy friends become famous chefs.",
        "A talking dog runs for mayor.",
        "A family road trip turns into disasters.",
        "A robot learns to tell jokes.",
        "A wedding goes hilariously wrong.",
        "A detective who is afraid of the dark.",
    )
]
FAST = TrainConfig(rank=4, alpha=8, learning_rate=1e-2, epochs=3, batch_size=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny model gains nothing from threads, and on a busy machine they cost 10x."""


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_base_model(tiny_model_dir)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def snapshot(model) -> tuple[dict, dict, list]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    types = [type(m).__name__ for m in model.modules()]
    return state, grads, types


def assert_unchanged(model, before) -> None:
    state, grads, types = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert grads == before[1]
    assert types == before[2]
    assert not any("lora" in name for name, _ in model.named_modules())


def test_labels_are_answer_plus_end_of_turn(tok):
    eot = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>" == tok.pad_token  # pad == end-of-turn, as in SmolLM2
    ex = EXAMPLES[0]
    ids, labels = encode_example(tok, ex, 512)
    prompt = chat_prompt(tok, [{"role": "user", "content": ex.prompt}])
    answer = tok(ex.answer, add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer + [eot]  # prompt and answer tokenized separately, ids joined
    assert labels == [IGNORE_INDEX] * len(prompt) + answer + [eot]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "comedy<|im_end|>"


def test_padding_is_masked_by_attention_not_by_id(tok):
    eot = end_of_turn_id(tok)
    short = encode_example(tok, Example("hi", "comedy"), 512)
    long = encode_example(tok, EXAMPLES[1], 512)
    batch = _collate([short, long], tok.pad_token_id)
    n = len(short[0])
    assert batch["input_ids"].shape[1] == len(long[0]) > n
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long[0]) - n)
    assert (batch["input_ids"][0, n:] == eot).all()  # padded with the end-of-turn id ...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # ... which is never labelled as padding
    assert batch["labels"][0, n - 1].item() == eot  # while the real end-of-turn stays a label
    assert batch["labels"][1].tolist() == long[1]


def test_long_examples_lose_the_middle_of_the_prompt(tok):
    ex = Example(user_content("Which tag fits? " * 5, "Description: " + "a very long story " * 200), "comedy")
    ids, labels = encode_example(tok, ex, 128)
    full, _ = encode_example(tok, ex, 10_000)
    assert len(ids) == 128 and len(full) > 128
    assert ids[-5:] == full[-5:] and ids[:10] == full[:10]  # assistant header + answer, template head kept
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "comedy<|im_end|>"


def test_answer_only_loss_equals_the_models_own_loss_and_gradients(model, tok, tiny_model_config):
    """The trainer's loss skips the output layer where no label is: same value, same gradients."""
    eot = end_of_turn_id(tok)
    batch = _collate([encode_example(tok, ex, 512) for ex in EXAMPLES[:3]], eot)  # padded rows
    assert (batch["attention_mask"] == 0).any()
    with _attached(model, new=FAST, base_adapter=random_lora(ModelTargets.from_config(tiny_model_config), rank=2, b_std=0.5, b_seed=3)) as peft_model:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        ours, n = _answer_loss(peft_model, batch)
        assert n == int((batch["labels"] != IGNORE_INDEX).sum())
        (ours / n).backward()
        ours_grads = [p.grad.clone() for p in params]
        peft_model.zero_grad(set_to_none=True)
        reference = peft_model(**batch).loss  # transformers' causal-LM loss over full logits
        reference.backward()
        assert float(ours.detach() / n) == pytest.approx(float(reference.detach()), rel=1e-6)
        for mine, theirs in zip(ours_grads, (p.grad for p in params), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
        peft_model.zero_grad(set_to_none=True)


def test_skipping_the_loss_report_trains_the_same_lora(model, tok):
    reported = train_lora(model, tok, EXAMPLES[:4], FAST)
    skipped = train_lora(model, tok, EXAMPLES[:4], FAST, report_loss=False)
    assert skipped.initial_loss is None and skipped.final_loss is None
    assert skipped.losses == reported.losses
    for m in reported.lora.modules:
        assert torch.equal(skipped.lora.a[m], reported.lora.a[m]) and torch.equal(skipped.lora.b[m], reported.lora.b[m])


def test_stop_after_replays_a_prefix_of_the_full_run(model, tok):
    """What a bank refit relies on: `stop_after=k` is the full schedule's first k epochs, step for step."""
    full = train_lora(model, tok, EXAMPLES[:4], FAST, report_loss=False)
    steps_per_epoch = len(full.losses) // FAST.epochs
    one = train_lora(model, tok, EXAMPLES[:4], FAST, report_loss=False, stop_after=1)
    assert one.losses == full.losses[:steps_per_epoch]
    again = train_lora(model, tok, EXAMPLES[:4], FAST, report_loss=False, stop_after=FAST.epochs)
    for m in full.lora.modules:
        assert torch.equal(again.lora.b[m], full.lora.b[m])
        assert not torch.equal(one.lora.b[m], full.lora.b[m])
    none = train_lora(model, tok, EXAMPLES[:4], FAST, report_loss=False, stop_after=0)
    assert none.losses == [] and all(not none.lora.b[m].any() for m in none.lora.modules)  # the init: B = 0
    with pytest.raises(ValueError, match="stop_after"):
        train_lora(model, tok, EXAMPLES[:4], FAST, stop_after=FAST.epochs + 1)
    with pytest.raises(ValueError, match="no validation"):
        train_lora(model, tok, EXAMPLES[:4], FAST, stop_after=1, validation=EXAMPLES[4:6])


def test_init_adapter_continues_given_weights(model, tok):
    """A bank's `--init continue`: the new LoRA starts as the given one (its rank and scaling), then trains on."""
    start = train_lora(model, tok, EXAMPLES[:4], FAST, report_loss=False).lora
    config = TrainConfig(rank=2, alpha=4, learning_rate=FAST.learning_rate, epochs=2, max_length=FAST.max_length)
    kept = train_lora(model, tok, EXAMPLES[4:], config, init_adapter=start, report_loss=False, stop_after=0).lora
    assert kept.rank == start.rank and kept.scaling == start.scaling
    assert all(torch.equal(kept.a[m], start.a[m]) and torch.equal(kept.b[m], start.b[m]) for m in start.modules)
    held = EXAMPLES[:2]
    result = train_lora(model, tok, EXAMPLES[4:], config, init_adapter=start, validation=held)
    assert result.initial_loss == pytest.approx(mean_loss(model, tok, EXAMPLES[4:], adapter=start, bf16_autocast=True))
    assert result.validation_losses[0] == pytest.approx(mean_loss(model, tok, held, adapter=start, bf16_autocast=True))
    assert result.losses and result.lora.rank == start.rank
    with pytest.raises(ValueError, match="not both"):
        train_lora(model, tok, EXAMPLES[4:], config, init_adapter=start, base_adapter=start)


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(i, 10, 2) for i in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[2:] == sorted(factors[2:], reverse=True) and factors[-1] > 0


def test_training_lowers_the_loss_and_leaves_the_model_unchanged(model, tok):
    before = snapshot(model)
    steps = []
    result = train_lora(model, tok, EXAMPLES, FAST, progress=lambda s, t, loss: steps.append((s, t)))
    assert_unchanged(model, before)
    assert steps == [(i, 9) for i in range(1, 10)] and result.steps == 9 == len(result.losses)
    assert result.initial_loss > 5.0  # random tiny model: "comedy<|im_end|>" is unlikely
    assert result.final_loss < result.initial_loss - 3.0, (result.initial_loss, result.final_loss)
    assert result.lora.rank == 4 and result.lora.scaling == 2.0
    # the default targets: every linear layer of the (Llama) model, found in the model
    assert result.lora.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(result.lora.modules) == 2 * 7  # 2 layers x all linear modules
    # the loss numbers are what mean_loss says about the base and the trained adapter (in bf16 autocast, as trained)
    assert mean_loss(model, tok, EXAMPLES, bf16_autocast=True) == pytest.approx(result.initial_loss, rel=1e-6)
    trained = mean_loss(model, tok, EXAMPLES, adapter=result.lora, bf16_autocast=True)
    assert trained == pytest.approx(result.final_loss, rel=1e-6)
    assert mean_loss(model, tok, EXAMPLES, adapter=result.lora) == pytest.approx(result.final_loss, rel=0.05)  # fp32
    assert_unchanged(model, before)
    # deterministic: the same config trains the same LoRA
    again = train_lora(model, tok, EXAMPLES, FAST)
    assert again.losses == result.losses
    assert all(torch.equal(again.lora.b[m], result.lora.b[m]) for m in result.lora.modules)


def test_the_seed_fixes_the_shared_a_init(model, tok):
    """LoRAs trained with one seed start from one A (the bank's shared init); A barely moves at lr ~ 0."""
    frozen = TrainConfig(rank=4, alpha=8, learning_rate=1e-12, epochs=1, seed=7)
    one = train_lora(model, tok, EXAMPLES[:2], frozen).lora
    two = train_lora(model, tok, EXAMPLES[3:], frozen).lora
    other = train_lora(
        model, tok, EXAMPLES[:2], TrainConfig(rank=4, alpha=8, learning_rate=1e-12, epochs=1, seed=8)
    ).lora
    for m in one.modules:
        assert torch.allclose(one.a[m], two.a[m], atol=1e-9)
        assert not torch.allclose(one.a[m], other.a[m])


def peft_loss(model_dir, adapter_dir, tok, examples) -> float:
    """Mean answer-token loss of a plain transformers + PEFT model with the adapter from disk."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = encode_example(tok, ex, 512)
            logits = peft_model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum", ignore_index=-100))
            count += int((target != -100).sum())
    return total / count


def test_base_adapter_is_exact_and_the_stack_serves_what_was_trained(
    model, tok, tiny_model_dir, tiny_model_config, tmp_path
):
    before = snapshot(model)
    base = random_lora(ModelTargets.from_config(tiny_model_config), rank=4, b_std=0.5, b_seed=3)
    save_adapter(base, tmp_path / "base", base_model_name_or_path="tiny")
    plain = mean_loss(model, tok, EXAMPLES)
    with_base = mean_loss(model, tok, EXAMPLES, base_adapter=base)
    assert abs(with_base - plain) > 0.1  # the base adapter changes the model
    assert with_base == pytest.approx(peft_loss(tiny_model_dir, tmp_path / "base", tok, EXAMPLES), abs=1e-5)
    assert mean_loss(model, tok, EXAMPLES, adapter=base) == pytest.approx(with_base, abs=1e-6)

    config = TrainConfig(rank=2, alpha=4, learning_rate=1e-2, epochs=3, bf16_autocast=False)
    result = train_lora(model, tok, EXAMPLES, config, base_adapter=base)
    assert_unchanged(model, before)
    assert result.initial_loss == pytest.approx(with_base, rel=1e-6)  # the new LoRA starts at B = 0
    assert result.final_loss < result.initial_loss - 1.0
    assert result.lora.rank == 2  # only the new LoRA is returned
    # serving concatenates fused + stacked into one adapter: it computes what training saw
    save_adapter(stack(base, result.lora), tmp_path / "stacked", base_model_name_or_path="tiny")
    served = peft_loss(tiny_model_dir, tmp_path / "stacked", tok, EXAMPLES)
    assert served == pytest.approx(result.final_loss, abs=1e-4)
    assert mean_loss(model, tok, EXAMPLES, adapter=result.lora, base_adapter=base) == pytest.approx(
        result.final_loss, rel=1e-6
    )


def test_bad_inputs_are_refused(model, tok):
    with pytest.raises(ValueError, match="no training examples"):
        train_lora(model, tok, [], FAST)
    with pytest.raises(ValueError, match="empty answer"):
        train_lora(model, tok, [Example("q", " ")], FAST)
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
