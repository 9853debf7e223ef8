"""A run's tokenizer as Hugging Face tokenizer files, so that AutoTokenizer.from_pretrained(DIR)
gives the same ids.

BPE runs already store a `tokenizers` tokenizer.json; it is written unchanged (but for the
post-processor of a tokenizer taken from a Hugging Face checkpoint, a Llama one's BOS, which
samoe does not apply and the export therefore drops). Byte runs
(ids 0..255 = UTF-8 bytes, 256 = end of text) get an equivalent one: a byte-level BPE with the
256 byte symbols as its vocabulary (id = byte value), no merges, and <|endoftext|> added as
special token 256. Both come with a tokenizer_config.json naming PreTrainedTokenizerFast and
the end-of-text token (<|endoftext|>, or the eos of a Hugging Face checkpoint a run was
upcycled from) as bos, eos and pad token.

One difference remains: samoe encodes the literal text "<|endoftext|>" inside a document as
ordinary text, a Hugging Face tokenizer as the special token.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from samoe.data.tokenizer import EOT, BPETokenizer, ByteTokenizer


def byte_tokenizer_json() -> str:
    """tokenizer.json of samoe's byte tokenizer."""
    alphabet = _bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOT])
    assert tk.token_to_id(EOT) == ByteTokenizer.eot_id
    return tk.to_str(pretty=True)


def tokenizer_files(tok: BPETokenizer | ByteTokenizer, block_size: int) -> dict[str, str]:
    """File name -> text of the Hugging Face tokenizer files of a samoe tokenizer."""
    text = _without_post_processor(tok.tk) if isinstance(tok, BPETokenizer) else byte_tokenizer_json()
    eot = tok.eot if isinstance(tok, BPETokenizer) else EOT  # a Hugging Face checkpoint's tokenizer keeps its eos
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot, "pad_token": eot,
              "model_max_length": block_size, "clean_up_tokenization_spaces": False, "add_bos_token": False,
              "add_eos_token": False}
    special = {"bos_token": eot, "eos_token": eot, "pad_token": eot}
    return {"tokenizer.json": text, "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}


def _without_post_processor(tk: Tokenizer) -> str:
    """tk's tokenizer.json without a post-processor (a Llama tokenizer's BOS): samoe encodes
    documents without one, so AutoTokenizer must too. samoe-trained tokenizers have none and
    are written unchanged."""
    if tk.post_processor is None:
        return tk.to_str(pretty=True)
    tk = Tokenizer.from_str(tk.to_str())
    tk.post_processor = None
    return tk.to_str(pretty=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the symbols of byte-level BPE: printable
    Latin-1 bytes map to themselves, the other 68 to U+0100, U+0101, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
