"""A stack of the paper's shapes with random weights, for timing where the real weights cannot be fetched:
GPT-J-6B (28 layers, d_model 4096, 16,384 MLP units, vocab 50,400) + BEiT-large (24 layers, 1024 wide,
14 x 14 patches) + a 1024 -> 4096 projection. Built directly on the device, then cast to bf16 (fp16 with
`dtype=torch.float16`, like GPT-J's float16 revision)."""

from __future__ import annotations

import torch

from mmtui.stacks.base import Stack
from mmtui.stacks.projection import Projection
from mmtui.stacks.tiny import tiny_tokenizer
from mmtui.stacks.vision import BeitEncoder


def gptj_random_stack(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Stack:
    from transformers import BeitConfig, BeitImageProcessor, BeitModel, GPTJConfig, GPTJForCausalLM

    dev = torch.device(device)
    torch.manual_seed(0)
    with dev:
        lm = GPTJForCausalLM(
            GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64)
        )
        beit = BeitModel(
            BeitConfig(
                image_size=224,
                patch_size=16,
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
                use_mean_pooling=True,
            ),
            add_pooling_layer=False,
        )
        proj = Projection(1024, 4096)
    processor = BeitImageProcessor(
        size={"height": 224, "width": 224}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Stack(
        name="gptj-random",
        encoder=BeitEncoder(beit.to(dtype), processor, "beit-large-random"),
        projection=proj.to(dtype),
        lm=lm.to(dtype),
        tokenizer=tiny_tokenizer(),
        real_vocab=50257,
        identity={"preset": "gptj-random"},
        device=dev,
        dtype=dtype,
    )
