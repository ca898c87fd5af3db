#!/usr/bin/env python3
"""Write a tiny llama-architecture GGUF with random weights, for tests and the exactness table.

The vocabulary is SentencePiece-style: <unk>, <s>, </s>, the 256 byte tokens (so any text
tokenizes instead of aborting llama.cpp) and a handful of words. Byte, <unk> and <s> tokens are
pushed to probability ~e^-200 through a constant residual dimension, so the model effectively
generates only the words and </s>: its whole sequence space can be enumerated.

    python scripts/make_tiny_gguf.py tiny.gguf [--seed N] [--chat-template] [--chat-markers]
        [--extra-words N] [--logit-scale S] [--no-byte-tokens]

``--extra-words N`` adds N more generated words ("▁w0", "▁w1", ...): with a small
``--logit-scale`` the model is flat over hundreds of tokens, so a proposal's draws often fall
outside a stored table. ``--no-byte-tokens`` leaves the byte fall-back out (llama.cpp then
aborts on text it cannot tokenize: ps-local must refuse such a prompt first).
``--chat-markers`` adds Gemma's turn markers as control tokens (after every other token) and a
Gemma-style chat template that uses them, for the tests of role injection.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

WORDS = ["▁yes", "▁no", "▁maybe", "!"]
EMBED = 32
LAYERS = 2
HEADS = 4
FFN = 64
CONTEXT = 4096
SUPPRESSED_LOGIT_SCALE = 100.0  # logit of a suppressed token: about -this * (normed constant dim)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MARKERS = ["<start_of_turn>", "<end_of_turn>"]
# Gemma 3's template, reduced to text: BOS, a system message prefixed to the first user turn,
# trimmed content between the markers.
MARKER_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def words(extra_words: int = 0) -> list[str]:
    return WORDS + [f"▁w{i}" for i in range(extra_words)]


def vocabulary(
    extra_words: int = 0, byte_tokens: bool = True, chat_markers: bool = False
) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    byte_pieces = [f"<0x{b:02X}>" for b in range(256)] if byte_tokens else []
    tokens = ["<unk>", "<s>", "</s>"] + byte_pieces + words(extra_words)
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * len(byte_pieces)
    types += [TokenType.NORMAL] * len(words(extra_words))
    # SentencePiece merges pairs of pieces that are in the vocabulary, so the words need
    # their prefixes ("▁y", "▁ye") as stepping stones. The model never generates those.
    stepping_stones = sorted({word[:end] for word in WORDS for end in range(2, len(word))} - set(tokens))
    tokens += stepping_stones
    types += [TokenType.NORMAL] * len(stepping_stones)
    if chat_markers:
        tokens += MARKERS
        types += [TokenType.CONTROL] * len(MARKERS)
    return tokens, [int(t) for t in types]


def generated_token_ids(extra_words: int = 0, byte_tokens: bool = True) -> list[int]:
    """The tokens the model can realistically generate: </s> and the words."""
    first = 3 + (256 if byte_tokens else 0)
    return [2] + list(range(first, first + len(words(extra_words))))


def write_tiny_gguf(
    path: Path,
    seed: int = 26,
    logit_scale: float = 1.0,
    chat_template: bool = False,
    extra_words: int = 0,
    byte_tokens: bool = True,
    nan_logits: bool = False,
    chat_markers: bool = False,
) -> Path:
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary(extra_words, byte_tokens, chat_markers)
    n_vocab = len(tokens)
    generated = set(generated_token_ids(extra_words, byte_tokens))

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("ps-local tiny test model")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBED)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(EMBED // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    n_bytes = 256 if byte_tokens else 0
    writer.add_token_scores([0.0] * 3 + [-1000.0] * n_bytes + [-1.0] * (len(tokens) - 3 - n_bytes))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_markers:
        writer.add_chat_template(MARKER_CHAT_TEMPLATE)
    elif chat_template:
        writer.add_chat_template(CHAT_TEMPLATE)

    # Dimension 0 of the residual stream is a constant: the embedding sets it and no layer
    # writes to it, so after the final RMS norm it is positive for every input.
    embedding = normal(n_vocab, EMBED)
    embedding[:, 0] = 4.0
    writer.add_tensor("token_embd.weight", embedding)
    for layer in range(LAYERS):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(EMBED, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(f"{prefix}.{name}.weight", normal(EMBED, EMBED, scale=EMBED**-0.5))
        attn_out = normal(EMBED, EMBED, scale=EMBED**-0.5)
        attn_out[0, :] = 0.0
        writer.add_tensor(f"{prefix}.attn_output.weight", attn_out)
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(EMBED, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", normal(FFN, EMBED, scale=EMBED**-0.5))
        writer.add_tensor(f"{prefix}.ffn_up.weight", normal(FFN, EMBED, scale=EMBED**-0.5))
        ffn_down = normal(EMBED, FFN, scale=FFN**-0.5)
        ffn_down[0, :] = 0.0
        writer.add_tensor(f"{prefix}.ffn_down.weight", ffn_down)
    writer.add_tensor("output_norm.weight", np.ones(EMBED, dtype=np.float32))
    output = normal(n_vocab, EMBED, scale=logit_scale)
    output[:, 0] = 0.0
    for token in range(n_vocab):
        if token not in generated:
            output[token, :] = 0.0
            output[token, 0] = -SUPPRESSED_LOGIT_SCALE
    if nan_logits:
        output[generated_token_ids(extra_words, byte_tokens)[1], :] = np.nan  # a broken model
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--logit-scale", type=float, default=1.0)
    parser.add_argument("--chat-template", action="store_true", help="embed a small chat template")
    parser.add_argument("--extra-words", type=int, default=0, help="more generated words (a wide vocabulary)")
    parser.add_argument("--no-byte-tokens", action="store_true", help="no byte fall-back tokens")
    parser.add_argument("--nan-logits", action="store_true", help="a broken model whose logits are NaN")
    parser.add_argument("--chat-markers", action="store_true",
                        help="turn-marker control tokens and a Gemma-style chat template using them")
    args = parser.parse_args()
    write_tiny_gguf(args.path, args.seed, args.logit_scale, args.chat_template, args.extra_words,
                    not args.no_byte_tokens, args.nan_logits, args.chat_markers)
    print(args.path)


if __name__ == "__main__":
    main()
