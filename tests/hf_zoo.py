"""Hugging Face transformers models from tiny configs with random weights (nothing is downloaded).

Each family is built small enough that capturing it with torch.export takes about a
second. ``linear_like`` names every weight that a projection reads: ``nn.Linear``
weights, GPT-2's ``Conv1D`` weights (``[in, out]``, used through ``addmm``) and the
output head, whichever parameter it is tied to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fxsparse._demo

VOCABULARY = 96


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], dict[str, torch.Tensor]]  # (batch, sequence) -> keyword inputs
    tied: tuple[str, str] | None = None  # two names of one parameter
    output: str = "logits"


def _ids(batch: int, sequence: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1000 * batch + sequence)
    return torch.randint(0, VOCABULARY, (batch, sequence), generator=generator)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCABULARY, n_embd=32, n_layer=2, n_head=2, n_positions=64,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCABULARY, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, use_cache=False,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _encoder_inputs(batch: int, sequence: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(batch, sequence), "attention_mask": torch.ones(batch, sequence, dtype=torch.long)}


def _seq2seq_inputs(batch: int, sequence: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(batch, sequence), "decoder_input_ids": _ids(batch, sequence, seed=1)}


def _decoder_inputs(batch: int, sequence: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(batch, sequence)}


FAMILIES = {
    family.name: family
    for family in [
        Family("bert", _bert, _encoder_inputs, output="last_hidden_state"),
        Family("gpt2", _gpt2, _decoder_inputs, tied=("lm_head.weight", "transformer.wte.weight")),
        Family("t5", _t5, _seq2seq_inputs, tied=("lm_head.weight", "shared.weight")),
        Family("llama", _llama, _decoder_inputs),
    ]
}


def build(family: Family, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return family.build().eval()


def linear_like(model: nn.Module) -> list[str]:
    """The weight of every nn.Linear and transformers Conv1D, by its first name."""
    return [f"{name}.weight" for name in fxsparse._demo.linear_like(model)]


def random_masks(model: nn.Module, density: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(model.get_parameter(name).shape, generator=generator) < density for name in linear_like(model)
    }


def dynamic_shapes(inputs: dict[str, Any]) -> dict[str, dict[int, Any]]:
    """Batch and sequence dynamic in every input (one sequence length shared by all)."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
    return {name: {0: batch, 1: sequence} for name in inputs}
