"""Build a tiny random causal LM + tokenizer on disk for fast, offline tests.

Why: tests need a model that both transformers/PEFT and vLLM (CPU, with LoRA) can load,
that builds in about a second without network access, and whose greedy decoding is
stable enough to compare vLLM and transformers token for token. Default random init
(std 0.02) gives near-uniform logits, so tiny numerical differences flip greedy choices;
here weights use a larger ``initializer_range`` so that logits are peaked, while
attention still mixes context so different prompts (and different LoRA deltas) give
different continuations.

This is a plain helper module (not a conftest): ``from tests.tiny_model import
build_tiny_model`` or ``from tiny_model import build_tiny_model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ARCHS = ("llama", "qwen2", "mistral", "phi3")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

# Plain ChatML (no default system prompt, to keep prompts short for 512 positions).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the BPE: chat roles, the LaMP-2M movie tags and movie descriptions,
# so that prompts used in tests tokenize into a reasonable number of tokens.
CORPUS: tuple[str, ...] = (
    "system user assistant",
    "You are a helpful assistant that tags movies.",
    "Which tag does this movie relate to among the following tags?",
    "Just answer with the tag name without further explanation.",
    "tags: sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, "
    "classic, psychology, fantasy, romance, thought-provoking, social commentary, "
    "violence, true story",
    "The user has tagged these movies before: comedy, romance, action, classic.",
    "A young wizard discovers his magical heritage and attends a school of witchcraft.",
    "A retired detective is pulled back for one last case in a rainy city.",
    "Two strangers fall in love on a train across Europe during one long night.",
    "In a dystopian future, a rebel fights the government that controls every memory.",
    "A crew of astronauts travels through a wormhole to find a new home for humanity.",
    "A dark comedy about a family that inherits a failing funeral home.",
    "Based on a true story, a lawyer fights a chemical company for a small town.",
    "A thought-provoking drama about memory, identity and the meaning of home.",
    "An action movie where a former soldier rescues hostages from a skyscraper.",
    "A classic black and white film about a journalist chasing a secret.",
    "The twist ending reveals that the narrator was a ghost all along.",
    "A psychological thriller about a pianist who cannot trust her own mind.",
    "Social commentary on wealth and class told through a dinner party gone wrong.",
    "A fantasy epic with dragons, kings, swords and a long journey to the mountain.",
    "Violence erupts in a quiet village when a stranger arrives on horseback.",
    "Based on a book by a famous author, the film follows a boy and his dog.",
    "A romantic comedy where a chef and a critic fall in love in Paris.",
    "Robots and artificial intelligence question what it means to be human.",
    "A heist movie with clever thieves, a casino and a surprising betrayal.",
    "An animated adventure about a fish searching the ocean for his son.",
    "A war drama about soldiers and friendship on the beaches of France.",
    "A horror movie set in an old house where strange things happen at night.",
    "The documentary tells the true story of a climber on a frozen mountain.",
    "A musical about dreamers in Los Angeles who sing and dance under the stars.",
    "What is the capital of France? The capital of France is Paris.",
    "Name three primary colors: red, blue and yellow.",
    "The quick brown fox jumps over the lazy dog.",
    "Recommend a movie for a rainy weekend with friends and family.",
    "I liked the story, the actors and the music, but the ending was too long.",
    "Answer: comedy. Answer: action. Answer: romance. Answer: sci-fi.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 1999",
    "Hello, how are you today? I am fine, thank you!",
)


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE (like GPT-2/SmolLM2): every string is encodable, no unknowns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    return tok


def build_tiny_model(
    out_dir: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int = 640,
    initializer_range: float = 0.3,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random-init causal LM of one of ``ARCHS`` (Llama by default) to ``out_dir``.

    2 layers, hidden 128, 2 heads of dim 64 (1 KV head, i.e. GQA like SmolLM2),
    intermediate 256, 4096 positions, float32 safetensors, a byte-level BPE tokenizer with
    ChatML specials (``<|im_end|>`` is eos and pad) and a ChatML chat template.
    Deterministic for a given ``seed``. Returns ``out_dir``.

    ``initializer_range`` 0.3 (instead of 0.02) makes greedy decoding robust: the median
    top-1/top-2 logit gap is ~0.7 instead of ~0.03. With untied embeddings (the default)
    the output rows of tokens never seen in the corpus (stray bytes, ``<|endoftext|>``,
    ``<|im_start|>``) are zeroed, so generated text is made of corpus-like pieces
    instead of control bytes; ``<|im_end|>`` stays a normal, occasionally chosen token.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- tokenizer -------------------------------------------------------------------
    backend = _train_tokenizer(vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    _normalize_tokenizer_config(out_dir / "tokenizer_config.json")
    ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    n_vocab = backend.get_vocab_size()

    # --- model -----------------------------------------------------------------------
    common = dict(
        vocab_size=n_vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|im_end|>"],
    )
    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(head_dim=64, **common)
    elif arch == "qwen2":
        from transformers import Qwen2Config

        config = Qwen2Config(use_sliding_window=False, **common)  # head_dim = 128 / 2
    elif arch == "mistral":
        from transformers import MistralConfig

        config = MistralConfig(head_dim=64, sliding_window=None, **common)
    elif arch == "phi3":
        from transformers import Phi3Config

        config = Phi3Config(sliding_window=None, **common)  # fused qkv_proj and gate_up_proj
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":
        # Qwen2's q/k/v biases start at zero; give them values so the bias path is tested.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, initializer_range)
    if not tie_word_embeddings:
        used = _used_token_ids(backend) - {ids["<|endoftext|>"], ids["<|im_start|>"]}
        unused = torch.tensor(sorted(set(range(n_vocab)) - used), dtype=torch.long)
        with torch.no_grad():
            model.lm_head.weight[unused] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _used_token_ids(backend: Tokenizer) -> set[int]:
    """Token ids that occur when encoding the corpus and ChatML markup."""
    texts = list(CORPUS) + ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    return {i for enc in backend.encode_batch(texts) for i in enc.ids}


def _normalize_tokenizer_config(path: Path) -> None:
    """Name the generic fast-tokenizer class so transformers 4.x and 5.x load it verbatim."""
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "backend"):
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHATML_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
