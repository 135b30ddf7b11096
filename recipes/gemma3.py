"""Gemma-3 instruct models: Gemma's turns, with a system message folded into the first user turn (its text, a
blank line, then the user's text); contents may be strings or lists of text parts. Five sliding-window layers
(window 1024) alternate with one global layer."""

from __future__ import annotations

from . import Cuts, ModelSize, Recipe

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content | trim -}}"
    "{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}"
    "{%- set prefix = system + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + text(message['content']) "
    "+ '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_SOURCE = "Gemma 3 technical report (arXiv:2503.19786) and the google/gemma-3-4b-it model card"

RECIPE = Recipe(
    name="gemma3",
    chat_template=CHAT_TEMPLATE,
    end_of_turn="<end_of_turn>",
    system_role="folded",
    special_tokens={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
                    "extra": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]},
    tiny=dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
              max_position_embeddings=512),
    generation={"do_sample": True, "top_k": 64, "top_p": 0.95},
    sizes={
        "4b": ModelSize(
            name="4b", hub_id="google/gemma-3-4b-pt", instruct_id="google/gemma-3-4b-it", model_type="gemma3_text",
            architecture=dict(
                num_hidden_layers=34, hidden_size=2560, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                intermediate_size=10240, vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256,
                max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)],
                tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0),
            cuts={"balanced": Cuts((11, 23), "34 layers in near-thirds (11/12/11); the five global layers (5, 11, 17, "
                                             "23, 29) fall 1/2/2 across bottom, trunk and top"),
                  "server_heavy": Cuts((6, 28), "the server takes 22 of 34 layers (three global ones); the client "
                                               "keeps 6 + 6 layers, one global layer in each, and the 262k-row "
                                               "tied embedding")},
            source=_SOURCE),
    },
)
