"""Load what the trainer writes: a checkpoint directory holding ``config.json`` (the
``ModelConfig`` as ``dataclasses.asdict``), ``model.pt`` (the ``Transformer``
state_dict) and ``tokenizer.json`` (a Hugging Face ``tokenizers`` file).

The evaluation suite only needs text in and token ids out, so the tokenizer is wrapped
in ``TextCodec`` (encode, decode, eos id): the metrics never see the ``tokenizers`` API
and tests can hand them any object with the same three members.

The model is built **dropless** (``moe.capacity_factor=None``) whatever the checkpoint
was trained with: with a capacity, the padding of a batch and the other sequences in it
compete for expert slots, so a score would depend on ``--batch-size``. Dropless, each
sequence's logits are its own. The checkpoint's own config (``read_checkpoint``) still
holds the trained factor, which ``dsv3 eval`` records in its results. (A model passed
to the suite directly is run dropless too, for the duration: ``scoring.evaluating``.)
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from dsv3 import torch_files
from dsv3.eval.jsonl import read_text
from dsv3.model import ModelConfig, Transformer
from dsv3.moe import MoEConfig

CHECKPOINT_FILES = ("config.json", "model.pt", "tokenizer.json")
# Tried in order for the end-of-text id: GPT-2 style first, then common alternatives.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


class TextCodec:
    """Text <-> token ids over a ``tokenizers.Tokenizer``; ``eos_id`` is None when the
    vocabulary has no end-of-text token (generation then stops at max tokens only).
    Special-token strings in text encode as the text they are, as the training data
    was encoded (a quoted "<|endoftext|>" is not an end): the codec sets that on the
    tokenizer it is given, once, rather than flipping it around every call."""

    def __init__(self, tokenizer, eos_id: int | None = None):
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        if eos_id is None:
            eos_id = next((i for t in EOS_TOKENS if (i := tokenizer.token_to_id(t)) is not None),
                          None)
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"TextCodec.encode: text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# MoEConfig fields added after the trainer had written checkpoints without them: such a
# checkpoint was trained with their defaults (no clamp, DeepSeek-V3's group score). Every
# other field has been in config.json since the trainer first wrote one, so a config
# without it is damaged, and a default (max_seq_len 512 for a model trained at 64, say)
# would be a silent wrong guess.
OPTIONAL_MOE_FIELDS = ("swiglu_limit", "group_score")


def _check_fields(raw: dict, config_class, optional: tuple[str, ...], where: str) -> None:
    """``raw`` holds every field of ``config_class`` but the ``optional`` ones, and no other."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{where} has keys {config_class.__name__} does not know: {unknown}")
    missing = sorted(fields - set(raw) - set(optional))
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing}")


def load_config(path: str) -> ModelConfig:
    try:
        raw = json.loads(read_text(path, "checkpoint"))
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint: {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"checkpoint: {path} must hold a JSON object, got {type(raw).__name__}")
    _check_fields(raw, ModelConfig, (), f"checkpoint: {path}")
    if isinstance(raw["moe"], dict):  # else None (dense) or a wrong type, ModelConfig's to name
        _check_fields(raw["moe"], MoEConfig, OPTIONAL_MOE_FIELDS, f"checkpoint: {path}: moe")
    try:  # ModelConfig validates values and turns a moe dict into MoEConfig
        return ModelConfig(**raw)
    except (TypeError, ValueError) as e:  # its message names the field, not the file
        raise ValueError(f"checkpoint: {path}: {e}") from None


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` in ``path``; a damaged file (cut short, empty, not
    UTF-8, not a tokenizer) is a ValueError naming it, not the library's bare
    Exception naming neither file nor fault."""
    from tokenizers import Tokenizer

    text = read_text(path, "checkpoint")  # a byte that is not UTF-8 named by its line
    if not text.strip():
        raise ValueError(f"checkpoint: {path} is empty")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception, whatever the fault
        raise ValueError(f"checkpoint: {path} is not a readable tokenizers file (cut short "
                         f"or overwritten? {e})") from None


def dropless(config: ModelConfig) -> ModelConfig:
    """``config`` with its MoE's token dropping off (see the module docstring)."""
    if config.moe is None or config.moe.capacity_factor is None:
        return config
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=None))


def read_checkpoint(directory: str, arg: str = "load_checkpoint"
                    ) -> tuple[ModelConfig, TextCodec]:
    """(config as saved, TextCodec) of a checkpoint directory, without reading the
    weights: enough to check an evaluation's inputs against ``max_seq_len`` before
    model.pt is loaded. Errors name ``arg`` (the CLI's ``--checkpoint``)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{arg}: directory must be a path, got "
                        f"{type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{arg}: directory {directory!r} does not exist")
    missing = [n for n in CHECKPOINT_FILES if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise FileNotFoundError(f"{arg}: {directory!r} lacks {', '.join(missing)} "
                                f"(a checkpoint holds {', '.join(CHECKPOINT_FILES)})")
    config = load_config(os.path.join(directory, "config.json"))
    codec = TextCodec(load_tokenizer(os.path.join(directory, "tokenizer.json")))
    if codec.vocab_size > config.vocab_size:
        raise ValueError(f"{arg}: tokenizer.json has {codec.vocab_size} tokens but "
                         f"config.json's vocab_size is {config.vocab_size}")
    return config, codec


def load_checkpoint(directory: str, device: str | torch.device = "cpu",
                    arg: str = "load_checkpoint") -> tuple[Transformer, TextCodec]:
    """(model in eval mode on ``device``, dropless, its TextCodec) from a checkpoint
    directory."""
    config, codec = read_checkpoint(directory, arg)
    directory = os.fspath(directory)
    model = Transformer(dropless(config))
    state = torch_files.load(os.path.join(directory, "model.pt"), "model weights",
                             map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{arg}: model.pt must hold a state_dict, got "
                         f"{type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{arg}: model.pt does not fit config.json: {e}") from None
    return model.to(device).eval(), codec
