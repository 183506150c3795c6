"""A local text tokenizer: a small BPE trained with `tokenizers` on the prompt template and the dataset's
instructions, so that nothing is fetched from a hub. It mirrors the Llama layout that OpenVLA relies on:
<unk>=0, <s>=1, </s>=2, a sentencepiece-style "▁" word marker (the "empty piece"), BOS added on encode,
`n_action_bins` action tokens occupying the last ids of the base vocabulary, and <pad> right after it.
"""

from __future__ import annotations

import string

from vla_train.models.prompting import prompt_text

EMPTY_PIECE = "▁"


def build_local_tokenizer(instructions: list[str], text_vocab_size: int, n_action_bins: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=EMPTY_PIECE, prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement=EMPTY_PIECE, prepend_scheme="first")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\n") + [EMPTY_PIECE]
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    corpus = [prompt_text(i) for i in sorted(set(instructions))] or [prompt_text("do something")]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    if len(fast) > text_vocab_size:
        raise ValueError(f"the BPE learned {len(fast)} tokens, more than text_vocab_size {text_vocab_size}")
    # Fill up to exactly text_vocab_size so that the vocabulary has the configured shape (e.g. Llama-2's
    # 32000 for a 7B-shaped model); the fillers never occur in tokenized text.
    fast.add_tokens([f"<unused_{i}>" for i in range(text_vocab_size - len(fast))])
    # Action tokens take the last n_action_bins ids of the base vocabulary; <pad> comes after it (as
    # OpenVLA's 32000 after Llama's 32000-token vocabulary).
    fast.add_tokens([f"<act_{i}>" for i in range(n_action_bins)])
    fast.add_special_tokens({"pad_token": "<pad>"})
    assert fast.pad_token_id == len(fast) - 1
    return fast


def empty_piece_id(tokenizer) -> int | None:
    """Id of the sentencepiece word marker, when the tokenizer has one (Llama: 29871)."""
    vocab = tokenizer.get_vocab()
    return vocab.get(EMPTY_PIECE)
