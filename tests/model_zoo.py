"""Model code nobody here wrote, from tiny configs with random weights, against FakeSparsity.

Shared by tests/test_model_zoo.py (a representative subset) and tools/zoo_check.py (all of
it). Each entry builds a model with dropout 0 (so train mode is deterministic) and its
keyword inputs; every linear-like weight gets a random mask. ``compare`` transforms the model
and checks outputs and the gradients of every parameter against the FakeSparsity model, which
is registered on every name of a tied parameter as torch.ao.pruning would need it.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

import fxsparse

from hf_zoo import VOCABULARY, random_masks
from reference import fake_sparsity_on_every_name

sys.path.insert(0, str(Path(__file__).parent / "vendored"))

BATCH, SEQUENCE = 2, 8


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]  # random weights, dropout 0
    inputs: Callable[[], dict[str, torch.Tensor]]
    known: dict[str, str] | None = None  # mode ("eval"/"train"/"switch") -> why fxsparse differs today
    switch: bool = False  # also captured in eval mode, then run in train mode
    # A custom autograd.Function torch.export inlines (no capture can keep it): fxsparse must warn,
    # naming it; gradients through it are then those of its forward's operations, not its backward's.
    inlined: str | None = None


@dataclass(frozen=True)
class Result:
    outputs: float  # max |difference| of the outputs (0.0: bitwise equal)
    gradients: float  # max |difference| of the parameters' gradients (inf: one is None on one side)
    outputs_equal: bool
    gradients_equal: bool
    warned: tuple[str, ...] = ()  # the custom autograd.Functions fxsparse warned it could not keep


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCABULARY, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(seed))


def _padding() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQUENCE, dtype=torch.long)
    mask[1, -3:] = 0  # the second sequence is three tokens shorter
    return mask


def _decoder() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids()}


def _padded() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(), "attention_mask": _padding()}


def _seq2seq() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(), "decoder_input_ids": _ids(1)}


def _gpt_with_targets() -> dict[str, torch.Tensor]:
    return {"idx": _ids(), "targets": _ids(1)}


def _hf(config_name: str, model_name: str, **settings: Any) -> Callable[[], nn.Module]:
    """A transformers model from a config with every dropout probability set to 0."""

    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**settings)
        for key, value in vars(config).items():
            if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
                setattr(config, key, 0.0)
        return getattr(transformers, model_name)(config)  # type: ignore[no-any-return]

    return build


_DECODER = {
    "vocab_size": VOCABULARY, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "use_cache": False,
}  # fmt: skip


def _nanogpt() -> nn.Module:
    import nanogpt_model

    config = nanogpt_model.GPTConfig(block_size=32, vocab_size=VOCABULARY, n_layer=2, n_head=2, n_embd=32)
    return nanogpt_model.GPT(config)


def _mingpt() -> nn.Module:
    import mingpt_model

    config = mingpt_model.GPT.get_default_config()
    config.merge_from_dict(
        {"model_type": None, "n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": VOCABULARY, "block_size": 32}
    )
    config.merge_from_dict({"embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0})
    return mingpt_model.GPT(config)


class RecurrentLM(nn.Module):
    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, 32)
        self.rnn = cell(32, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, VOCABULARY)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(input_ids))
        return self.head(hidden)  # type: ignore[no-any-return]


class PaddedTransformerEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)  # type: ignore[no-any-return]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """timm's drop_path: a Python branch on ``training``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    return x * random_tensor.div_(keep_prob)


class DropPathMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + drop_path(self.fc2(F.gelu(self.fc1(x))), 0.5, self.training)


class HalvedGradient(torch.autograd.Function):
    """Identity forward, a backward that halves: only running the Function's backward gives it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad / 2


class CustomFunctionMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(HalvedGradient.apply(self.fc1(x)))  # type: ignore[no-untyped-call]


def _features() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(BATCH, SEQUENCE, 32, generator=torch.Generator().manual_seed(0))}


ZOO: dict[str, ZooModel] = {
    model.name: model
    for model in [
        ZooModel("nanogpt", _nanogpt, _gpt_with_targets),
        ZooModel("mingpt", _mingpt, _gpt_with_targets),
        ZooModel("lstm_lm", lambda: RecurrentLM(nn.LSTM), _decoder),
        ZooModel("gru_lm", lambda: RecurrentLM(nn.GRU), _decoder),
        ZooModel("transformer_encoder_padding", PaddedTransformerEncoder, _padded),
        ZooModel("drop_path", DropPathMLP, _features, switch=True),
        ZooModel("custom_function", CustomFunctionMLP, _features),
        ZooModel("llama", _hf("LlamaConfig", "LlamaForCausalLM", **_DECODER), _decoder),
        ZooModel(
            "gpt2",
            _hf(
                "GPT2Config",
                "GPT2LMHeadModel",
                vocab_size=VOCABULARY,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
                use_cache=False,
            ),
            _decoder,
        ),
        ZooModel(
            "bert_padding",
            _hf(
                "BertConfig",
                "BertModel",
                vocab_size=VOCABULARY,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            ),
            _padded,
        ),
        ZooModel(
            "distilbert_padding",
            _hf(
                "DistilBertConfig",
                "DistilBertModel",
                vocab_size=VOCABULARY,
                dim=32,
                hidden_dim=64,
                n_layers=2,
                n_heads=2,
                max_position_embeddings=64,
            ),
            _padded,
        ),
        ZooModel(
            "t5",
            _hf(
                "T5Config",
                "T5ForConditionalGeneration",
                vocab_size=VOCABULARY,
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=2,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
                use_cache=False,
            ),
            _seq2seq,
        ),
        ZooModel(
            "mixtral",
            _hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, **_DECODER),
            _decoder,
        ),
        ZooModel(
            "qwen2_moe",
            _hf(
                "Qwen2MoeConfig",
                "Qwen2MoeForCausalLM",
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
                **_DECODER,
            ),
            _decoder,
        ),
        ZooModel("gemma2", _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, **_DECODER), _decoder),
        ZooModel("gemma3_text", _hf("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, **_DECODER), _decoder),
        ZooModel(
            "whisper",
            _hf(
                "WhisperConfig",
                "WhisperForConditionalGeneration",
                vocab_size=VOCABULARY,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                num_mel_bins=8,
                max_source_positions=16,
                max_target_positions=16,
                decoder_start_token_id=0,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=1,
                use_cache=False,
            ),
            lambda: {
                "input_features": torch.randn(BATCH, 8, 32, generator=torch.Generator().manual_seed(0)),
                "decoder_input_ids": _ids(1)[:, :5],
            },
        ),
        ZooModel(
            "modernbert_padding",
            _hf(
                "ModernBertConfig",
                "ModernBertModel",
                vocab_size=VOCABULARY,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=1,
                cls_token_id=0,
                sep_token_id=1,
            ),
            _padded,
        ),
        ZooModel(
            "bloom",
            _hf(
                "BloomConfig",
                "BloomForCausalLM",
                vocab_size=VOCABULARY,
                hidden_size=32,
                n_layer=2,
                n_head=2,
                use_cache=False,
            ),
            _decoder,
            inlined="GeLUFunction",
        ),
        ZooModel(
            "falcon",
            _hf(
                "FalconConfig",
                "FalconForCausalLM",
                vocab_size=VOCABULARY,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                use_cache=False,
            ),
            _decoder,
        ),
        ZooModel(
            "mamba",
            _hf(
                "MambaConfig",
                "MambaForCausalLM",
                vocab_size=VOCABULARY,
                hidden_size=32,
                state_size=8,
                num_hidden_layers=2,
                use_cache=False,
            ),
            _decoder,
        ),
        ZooModel(
            "rwkv",
            _hf(
                "RwkvConfig",
                "RwkvForCausalLM",
                vocab_size=VOCABULARY,
                hidden_size=32,
                num_hidden_layers=2,
                attention_hidden_size=32,
                intermediate_size=64,
                context_length=64,
                use_cache=False,
            ),
            _decoder,
        ),
    ]
}


def needs_transformers(entry: ZooModel) -> bool:
    return entry.build.__qualname__.startswith(_hf.__name__)


def _tensors(result: Any) -> list[torch.Tensor]:
    """The floating-point tensors of an output, in order (tuples, lists, dicts, ModelOutput)."""
    if isinstance(result, torch.Tensor):
        return [result] if result.is_floating_point() else []
    if isinstance(result, dict):
        return [t for value in result.values() for t in _tensors(value)]
    if isinstance(result, (tuple, list)):
        return [t for value in result for t in _tensors(value)]
    return []


def _reference_parameter(reference: nn.Module, name: str) -> torch.Tensor:
    owner, _, attribute = name.rpartition(".")
    module = reference.get_submodule(owner)
    if parametrize.is_parametrized(module, attribute):
        return module.parametrizations[attribute].original  # type: ignore[no-any-return,union-attr,index]
    return reference.get_parameter(name)


def _max_difference(ours: list[torch.Tensor | None], theirs: list[torch.Tensor | None]) -> tuple[float, bool]:
    worst, equal = 0.0, len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=False):
        if a is None or b is None or a.shape != b.shape:
            if (a is None) != (b is None) or (a is not None and b is not None):
                worst, equal = math.inf, False
            continue
        if not torch.equal(a, b):
            equal = False
            worst = max(worst, float((a.double() - b.double()).abs().nan_to_num(math.inf).max()))
    return worst, equal


def compare(entry: ZooModel, mode: str, seed: int = 0) -> Result:
    """Transform ``entry``'s model in ``mode`` ("eval", "train", or "switch": captured in eval,
    run in train) with random masks on every linear-like weight; outputs and gradients of every
    parameter against FakeSparsity."""
    models = []
    for _ in range(2):  # the same random weights twice: one to transform, one to parametrize
        torch.manual_seed(seed)
        models.append(entry.build().train(mode == "train"))
    model = models[0]
    masks = random_masks(model, seed=seed)
    inputs = entry.inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fxsparse.transform(model, masks, capture="auto", example_kwargs=inputs)
    warned = []
    for warning in caught:
        found = re.search(r"custom autograd\.Function (\S+) is not kept", str(warning.message))
        if found:
            warned.append(found[1])
        else:  # not this comparison's business: as if uncaught
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    reference = fake_sparsity_on_every_name(models[1], masks, in_place=True)  # models[1] is ours to change
    if mode == "switch":
        out.train()
        reference.train()
    results = []
    for module in (out, reference):
        torch.manual_seed(seed + 1)  # the same random draws (dropout, drop path) on both sides
        results.append(module(**inputs))
    ours, theirs = _tensors(results[0]), _tensors(results[1])
    outputs, outputs_equal = _max_difference(list(ours), list(theirs))
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    grads: list[list[torch.Tensor | None]] = []
    for module, tensors in ((out, ours), (reference, theirs)):
        loss = sum((t.float().square().mean() for t in tensors if t.requires_grad), torch.zeros(()))
        parameters = [
            _reference_parameter(module, name) if module is reference else module.get_parameter(name) for name in names
        ]
        if loss.requires_grad:
            grads.append(list(torch.autograd.grad(loss, parameters, allow_unused=True)))
        else:
            grads.append([None] * len(parameters))
    gradients, gradients_equal = _max_difference(grads[0], grads[1])
    return Result(outputs, gradients, outputs_equal, gradients_equal, tuple(warned))
