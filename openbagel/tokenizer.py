"""The Qwen2-style tokenizer of a checkpoint, with BAGEL's special tokens resolved by name.

BAGEL uses no chat template: every text block is `<|im_start|> text <|im_end|>`, every image block
`<|vision_start|> ... <|vision_end|>`. Ids are looked up in the checkpoint's own vocabulary, never
hard-coded, so the 7B Qwen2 tokenizer and the embedded model's small one work the same way.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


class TokenizerError(ValueError):
    pass


class BagelTokenizer:
    """Thin wrapper over a `transformers` fast tokenizer."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        vocab = hf_tokenizer.get_vocab()
        missing = [tok for tok in SPECIAL_TOKENS.values() if tok not in vocab]
        if missing:
            raise TokenizerError(f"tokenizer lacks BAGEL's special tokens {missing}")
        self.bos_id = vocab[SPECIAL_TOKENS["bos"]]
        self.eos_id = vocab[SPECIAL_TOKENS["eos"]]
        self.start_of_image_id = vocab[SPECIAL_TOKENS["start_of_image"]]
        self.end_of_image_id = vocab[SPECIAL_TOKENS["end_of_image"]]

    @classmethod
    def from_dir(cls, directory: str | Path) -> "BagelTokenizer":
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            try:
                hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
            except Exception as exc:  # the tokenizers library raises its own exception types
                raise TokenizerError(f"cannot read {directory / 'tokenizer.json'}: {exc}") from None
            return cls(hf)
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            from transformers import Qwen2TokenizerFast

            return cls(Qwen2TokenizerFast(vocab_file=str(directory / "vocab.json"),
                                          merges_file=str(directory / "merges.txt")))
        raise TokenizerError(f"{directory} has no tokenizer.json (or vocab.json + merges.txt)")

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    def __len__(self) -> int:
        return len(self.hf.get_vocab())

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, without any special token added."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def text_block(self, text: str) -> list[int]:
        """`<|im_start|> text <|im_end|>`: the unit of text in every BAGEL context."""
        return [self.bos_id, *self.encode(text), self.eos_id]


def train_tokenizer(texts, vocab_size: int, extra_special_tokens: tuple[str, ...] = ()) -> BagelTokenizer:
    """Train a small byte-level BPE tokenizer (the `tokenizers` library) carrying BAGEL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(extra_special_tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BagelTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials[4:]))
