"""Gemma (v1) instruct models: ``<start_of_turn>user`` / ``<start_of_turn>model`` turns closed by
``<end_of_turn>``, a ``<bos>`` first, no system role (the official template refuses a system message) and user and
model turns strictly alternating; turn contents are trimmed."""

from __future__ import annotations

from . import Cuts, ModelSize, Recipe

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (message['content'] | trim) + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_SOURCE = "Gemma technical report (arXiv:2403.08295) and the google/gemma-2b, google/gemma-7b model cards"
_COMMON = dict(vocab_size=256000, head_dim=256, max_position_embeddings=8192, rope_theta=10000.0,
               hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
               bos_token_id=2, eos_token_id=1, pad_token_id=0)

RECIPE = Recipe(
    name="gemma",
    chat_template=CHAT_TEMPLATE,
    end_of_turn="<end_of_turn>",
    system_role="refused",
    special_tokens={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
                    "extra": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]},
    tiny=dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=512),
    generation={"do_sample": False},
    sizes={
        "2b": ModelSize(
            name="2b", hub_id="google/gemma-2b", instruct_id="google/gemma-2b-it", model_type="gemma",
            architecture=dict(num_hidden_layers=18, hidden_size=2048, num_attention_heads=8, num_key_value_heads=1,
                              intermediate_size=16384, **_COMMON),
            cuts={"balanced": Cuts((6, 12), "18 layers in thirds (6/6/6): the seed's balanced split"),
                  "server_heavy": Cuts((4, 14), "the server takes 10 of 18 layers; the client keeps 4 + 4 and the "
                                               "tied embedding/head (the seed's choice for small client memory)")},
            source=_SOURCE),
        "7b": ModelSize(
            name="7b", hub_id="google/gemma-7b", instruct_id="google/gemma-7b-it", model_type="gemma",
            # 16 heads x 256 = 4096 != hidden 3072: Gemma-7B's attention is wider than its residual stream
            architecture=dict(num_hidden_layers=28, hidden_size=3072, num_attention_heads=16, num_key_value_heads=16,
                              intermediate_size=24576, **_COMMON),
            cuts={"balanced": Cuts((9, 19), "28 layers in near-thirds (9/10/9): the seed's choice"),
                  "server_heavy": Cuts((6, 22), "the server takes 16 of 28 layers: the seed's choice")},
            source=_SOURCE),
    },
)
