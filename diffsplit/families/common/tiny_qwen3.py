"""What a tiny Qwen3 text encoder's repository needs, for the families whose pipelines use one (Z-Image,
FLUX.2-klein): its chat template, its tokenizer's special tokens, and the config key older transformers read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffsplit.families.common.tiny_tokenizer import train_qwen2_tokenizer

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'].split('</think>')[-1].lstrip('\\n') %}"
    "{%- else %}"
    "{%- set content = message['content'] %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
"""The part of Qwen3's chat template that text-only system/user/assistant conversations reach.

For these messages it renders exactly what the real template does: ``apply_chat_template([{"role": "user",
"content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True)`` -> ``"<|im_start|>user\\n"
+ p + "<|im_end|>\\n<|im_start|>assistant\\n"`` (ZImagePipeline), and ``enable_thinking=False`` appends
``"<think>\\n\\n</think>\\n\\n"`` (Flux2KleinPipeline). Earlier assistant turns lose their ``<think>`` part as
in the real template; tools and ``reasoning_content`` are not reproduced.
"""


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def add_legacy_rope_theta(config_path: Path) -> None:
    """transformers 5 writes ``rope_parameters``; 4.x (and the real config) read a top-level ``rope_theta``."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    params = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", params.get("rope_theta", 1000000.0))
    write_json(config_path, config)


def train_qwen3_tokenizer(directory: Path, template_words: str) -> Any:
    """Qwen3's tokenizer, tiny: Qwen2 BPE (``template_words`` each made one token, as in the real
    vocabulary), ``<think>``/``</think>``, the chat template, eos ``<|im_end|>``, padding ``<|endoftext|>``."""
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from transformers import AutoTokenizer

    train_qwen2_tokenizer(
        directory, template_words, extra_tokens=("<think>", "</think>"), chat_template=QWEN3_CHAT_TEMPLATE
    )
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["eos_token"] = "<|im_end|>"
    config["pad_token"] = "<|endoftext|>"
    write_json(config_path, config)
    return AutoTokenizer.from_pretrained(str(directory))


def qwen3_config(tokenizer: Any, shape: dict[str, int]) -> Any:
    """A ``Qwen3ForCausalLM`` config of ``shape`` (hidden size, layers, heads, ...) around ``tokenizer``: the
    real checkpoints' other settings (tied embeddings, rotary base, special token ids)."""
    # transformers deferred: its model and pipeline modules take seconds to import (see diffsplit.families)
    from transformers import Qwen3Config

    return Qwen3Config(
        **shape,
        # Room for every token id, rounded up as real checkpoints pad their embedding tables.
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        max_position_embeddings=40960,
        rms_norm_eps=1e-06,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        max_window_layers=shape["num_hidden_layers"],
        architectures=["Qwen3ForCausalLM"],
    )
