"""The `tiny` stack for tests: the paper's classes (GPT-J + BEiT + Linear) at toy size, random, seeded.

Everything is built in code, offline: a byte-level BPE tokenizer trained on a few caption sentences,
a 2-layer GPT-J, a 2-layer BEiT on 64 px images (a 4 x 4 patch grid), and a linear projection. The other
LM families (FAMILY_CONFIGS) come at the same size, for their tests and bench.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "A picture of a dog with a cat.",
    "A picture of a man riding a horse on the beach.",
    "A picture of two people standing on a bridge at night.",
    "A picture of a bird sitting on a branch in the tree.",
    "A picture of a plate of food on a wooden table.",
    "A picture of a train at the station near the city.",
    "A picture of a boy playing with a ball in the park.",
    "A picture of a woman holding an umbrella in the rain.",
    "A picture of an airplane flying over the water.",
    "A picture of a car parked on the street next to a building.",
    "A picture of a group of children swimming in a pool.",
    "A picture of a giraffe and a zebra in a field of grass.",
    "A picture of a bowl of fruit, apples and bananas, on the counter.",
    "A picture of a kitchen with a stove, a sink and a window.",
    "A picture of a skier going down a snowy mountain slope.",
    "A picture of a surfer on a wave in the ocean.",
]
# the tiny GPT-J's sizes; small enough that float64 checks against Captum take well under a second
LM_CONFIG: dict[str, Any] = dict(n_positions=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=64)
# the other LM families at the same toy size (tests/test_families.py, bench/families.py): transformers config
# arguments by model_type; the gated ones share _GATED. Gemma's sliding window is shorter than a prompt, so
# that the caches' window handling is exercised, and Gemma 2's logit cap is low enough to change P(c).
_GATED: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    max_position_embeddings=128,
)
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_positions=128, n_embd=32, n_layer=2, n_head=4, n_inner=64),
    "gpt_neox": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128
    ),
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma2": {**_GATED, "sliding_window": 8, "final_logit_softcapping": 1.0},
    "gemma3_text": {**_GATED, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {**_GATED, "tie_word_embeddings": False},
    "olmo2": _GATED,
}
BEIT_CONFIG: dict[str, Any] = dict(
    image_size=64,
    patch_size=16,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A GPT-2 style byte-level BPE tokenizer (leading-space tokens) trained on CORPUS; deterministic."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 4, vocab_size=1000, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def tiny_family_lm(model_type: str, vocab: int, special_id: int) -> Any:
    """A random CausalLM of one of FAMILY_CONFIGS' model types at toy size (seed it first), its norms' weights
    perturbed so that a gain convention (weight or 1 + weight) shows in what is computed from them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in FAMILY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; one of {', '.join(FAMILY_CONFIGS)}")
    specials = dict(bos_token_id=special_id, eos_token_id=special_id, pad_token_id=special_id)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **specials, **FAMILY_CONFIGS[model_type])
    lm = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(0.3 * torch.randn_like(param))
    return lm


def tiny_parts(seed: int = 0, dtype: torch.dtype = torch.float32, family: str = "gptj"):
    """(LM, BEiT model, BEiT image processor, projection, tokenizer), random with `seed`; the LM a GPT-J, or
    a CausalLM of `family` (a model_type of FAMILY_CONFIGS)."""
    from transformers import BeitConfig, BeitImageProcessor, BeitModel, GPTJConfig, GPTJForCausalLM

    from mmtui.stacks.projection import Projection

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    if family == "gptj":
        lm = GPTJForCausalLM(
            GPTJConfig(
                vocab_size=len(tok),
                bos_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **LM_CONFIG,
            )
        )
    else:
        lm = tiny_family_lm(family, len(tok), tok.eos_token_id)
    beit = BeitModel(BeitConfig(use_mean_pooling=True, **BEIT_CONFIG), add_pooling_layer=False)
    processor = BeitImageProcessor(
        size={"height": 64, "width": 64}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    proj = Projection(BEIT_CONFIG["hidden_size"], int(lm.config.hidden_size))
    with torch.no_grad():  # image prompts of roughly the word embeddings' scale, so captions depend on the image
        proj.linear.weight.mul_(4.0)
    # transformers wraps PreTrainedModel.to in functools.wraps, which mypy reads as an unbound function
    lm, beit = lm.to(dtype), beit.to(dtype)  # type: ignore[arg-type]
    return lm, beit, processor, proj.to(dtype), tok


def save_tiny_limber(directory: Path | str, seed: int = 0, family: str = "gptj") -> dict[str, Path]:
    """Write a tiny stack in the paper stack's on-disk formats, for testing the `limber-beit-gptj` loader:
    an HF GPT-J folder, an HF BEiT folder with its processor, a GPT-2 style tokenizer folder (without
    `<|image|>`: the loader adds it, as LiMBeR did) and a LiMBeR `proj.ckpt` (state dict of nn.Linear).
    With another `family`, the LM folder holds that family's tiny LM (and its tokenizer): a custom stack's
    parts, for `--preset tiny --lm DIR --encoder beit:DIR --projection proj.ckpt`.
    """
    directory = Path(directory)
    lm, beit, processor, proj, tok = tiny_parts(seed, family=family)
    paths = {name: directory / name for name in ("lm", "encoder", "tokenizer")}
    lm.save_pretrained(paths["lm"])
    beit.save_pretrained(paths["encoder"])
    processor.save_pretrained(paths["encoder"])
    tok.save_pretrained(paths["tokenizer"])
    if family != "gptj":
        tok.save_pretrained(paths["lm"])
    paths["projection"] = directory / "proj.ckpt"
    torch.save(proj.linear.state_dict(), paths["projection"])
    return paths


# chat templates as the llava-hf processors ship them: LLaVA-1.5 ("USER: <image>\n... ASSISTANT:") and the
# Mistral-instruct form of llava-v1.6-mistral ("[INST] <image>\n... [/INST]")
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{ ' [/INST]' }}{% endif %}{% endfor %}"
)
# the tiny VLMs' vision tower: 32 px tiles of 8 px patches (a 4 x 4 grid per tile); NeXT's pinpoints at that scale
VLM_TILE, VLM_PATCH = 32, 8
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_vlm_text_config(tok: Any, max_positions: int) -> Any:
    """The tiny VLMs' language model: a 2-layer Llama over `tok`'s vocabulary (its eos also the bos)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )


def save_tiny_vlm(
    folder: Path, kind: str = "llava", strategy: str = "default", dtype: torch.dtype = torch.float32
) -> Path:
    """A random LLaVA (`kind` "llava") or LLaVA-NeXT ("llava_next") with its processor, saved with
    save_pretrained: a tiny CLIP tower (VLM_TILE px, VLM_PATCH px patches), a 2-layer Llama, an `<image>` token
    and the checkpoint family's chat template. NeXT tiles images onto NEXT_PINPOINTS (64 x 64: 2 x 2 tiles)."""
    import copy

    from transformers import CLIPImageProcessor, CLIPVisionConfig

    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=VLM_TILE,
        patch_size=VLM_PATCH,
    )
    text = tiny_vlm_text_config(tok, max_positions=256)
    common: dict[str, Any] = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    sizes: dict[str, Any] = dict(size={"shortest_edge": VLM_TILE}, crop_size={"height": VLM_TILE, "width": VLM_TILE})
    torch.manual_seed(0)
    if kind == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

        side = VLM_TILE // VLM_PATCH
        model: Any = LlavaForConditionalGeneration(LlavaConfig(**common, image_seq_length=side * side))
        image_processor: Any = CLIPImageProcessor(**sizes)
        processor_class: Any = LlavaProcessor
        template = LLAVA_TEMPLATE
    elif kind == "llava_next":
        from transformers import (
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaNextImageProcessor,
            LlavaNextProcessor,
        )

        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=NEXT_PINPOINTS))
        image_processor = LlavaNextImageProcessor(**sizes, image_grid_pinpoints=NEXT_PINPOINTS)
        processor_class = LlavaNextProcessor
        template = LLAVA_NEXT_TEMPLATE
    else:
        raise ValueError(f"no tiny VLM of kind {kind!r}; one of llava, llava_next")
    model = model.to(dtype)
    with torch.no_grad():  # image tokens of the word embeddings' scale, so the caption depends on the image
        model.model.multi_modal_projector.linear_2.weight.mul_(8.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=VLM_PATCH,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
