"""Write the viewer pages the documentation links to (docs/viewer/*.html).

The demo's GPT-2 and a tiny Llama (transformers, tiny configs, random weights, nothing
downloaded), every projection masked at 50 % by magnitude, each a diff against the same
capture with no masks. Usage::

    python tools/make_viewer_pages.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import fxsparse
from fxsparse._demo import Demo, tiny_gpt2

DOCS = Path(__file__).parent.parent / "docs" / "viewer"


def tiny_llama(seed: int) -> Demo:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        use_cache=False,
    )  # fmt: skip
    model: nn.Module = LlamaForCausalLM(config)
    model.eval()
    ids = torch.randint(0, 256, (2, 8))
    return Demo("Llama (transformers, tiny config, random weights)", model, {"input_ids": ids}, {}, {}, lambda o: o)


def write(name: str, demo: Demo) -> Path:
    masks = fxsparse.masks.magnitude(demo.model, 0.5)
    before = fxsparse.transform(demo.model, {}, example_kwargs=demo.inputs)
    out = fxsparse.transform(demo.model, masks, example_kwargs=demo.inputs)
    return fxsparse.viz.view(out, before, DOCS / f"{name}.html", title=demo.description)


if __name__ == "__main__":
    for name, make in (("gpt2-tiny", tiny_gpt2), ("llama-tiny", tiny_llama)):
        print(write(name, make(0)))
