"""Chat templates by name: fallbacks for tokenizers without a template of their own.

Jinja templates, rendered by transformers' ``apply_chat_template`` (trim_blocks and lstrip_blocks on). The families'
official instruct formats are the recipes' (``chat_template: qwen2 | gemma | gemma3``, see :mod:`recipes`).
"""

from __future__ import annotations

CHAT_TEMPLATES: dict[str, str] = {
    # ChatML as Qwen2 writes it, without Qwen2's injected default system prompt.
    "chatml": (
        "{% for message in messages %}"
        r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
