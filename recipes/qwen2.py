"""Qwen2 instruct models: ChatML with Qwen2's default system prompt.

A conversation without a system message gets ``You are a helpful assistant.`` as its system turn, as the official
instruct template does; every turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.
"""

from __future__ import annotations

from . import Cuts, ModelSize, Recipe

DEFAULT_SYSTEM = "You are a helpful assistant."

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SOURCE = "Qwen2 technical report (arXiv:2407.10671) and the Qwen/Qwen2-*-Instruct model cards"
_COMMON = dict(rope_theta=1_000_000.0, max_position_embeddings=32768, use_sliding_window=False,
               hidden_act="silu", rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645)

RECIPE = Recipe(
    name="qwen2",
    chat_template=CHAT_TEMPLATE,
    end_of_turn="<|im_end|>",
    system_role="native",
    special_tokens={"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
                    "extra": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]},
    tiny=dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    generation={"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    sizes={
        "1.5b": ModelSize(
            name="1.5b", hub_id="Qwen/Qwen2-1.5B", instruct_id="Qwen/Qwen2-1.5B-Instruct", model_type="qwen2",
            architecture=dict(num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2,
                              head_dim=128, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                              **_COMMON),
            cuts={"balanced": Cuts((9, 19), "the 28 layers in near-thirds (9/10/9): each part holds about a third "
                                           "of the layer compute, the client also the tied embedding/head"),
                  "server_heavy": Cuts((6, 22), "the server takes 16 of 28 layers; the client keeps 6 + 6 layers "
                                               "(the inversion audit measures what 6 bottom layers still leak)")},
            source=_SOURCE),
        "7b": ModelSize(
            name="7b", hub_id="Qwen/Qwen2-7B", instruct_id="Qwen/Qwen2-7B-Instruct", model_type="qwen2",
            architecture=dict(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                              head_dim=128, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                              **_COMMON),
            cuts={"balanced": Cuts((9, 19), "the 28 layers in near-thirds (9/10/9), as for Gemma-7B's 28"),
                  "server_heavy": Cuts((6, 22), "the server takes 16 of 28 layers (~3.7B parameters); the client's "
                                               "12 layers and untied embedding + head are ~3.9 GB in bfloat16")},
            source=_SOURCE),
    },
)
