"""A GGUF LM converted once into a transformers folder (safetensors + config + tokenizer), reused on every load.

transformers de-quantizes a GGUF file and rebuilds its tokenizer on every `from_pretrained` (about 50 s for
SmolLM2-135M on a laptop CPU); loading the converted folder takes a few seconds. The folder is keyed by the GGUF
file's sha256, so a changed file gets a new copy. The weights are stored in float32 (what the de-quantizer
yields) and cast to the asked dtype on load, so the model is the same one the GGUF path gives.

The file's hash is memoized by (resolved path, size, mtime_ns) in `gguf-hashes.json` under the cache folder:
a GGUF file is hashed once, not on every load.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmtui.stacks.projection import file_sha256

CONVERTED_FORMAT = "mmtui-gguf-converted/1"
HASH_MEMO = "gguf-hashes.json"


def user_cache_dir() -> Path:
    """$MMTUI_CACHE, else $XDG_CACHE_HOME/mmtui, else ~/.cache/mmtui."""
    if os.environ.get("MMTUI_CACHE"):
        return Path(os.environ["MMTUI_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mmtui"


def gguf_sha256(path: Path) -> str:
    """The file's sha256, from the memo when its (path, size, mtime_ns) is unchanged; else hashed and memoized."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = user_cache_dir() / HASH_MEMO
    try:
        memo: dict[str, str] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = file_sha256(path)
    memo[key] = digest
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        tmp.replace(memo_path)
    except OSError:
        pass  # a read-only cache only costs hashing again next time
    return digest


def converted_dir(sha256: str) -> Path:
    return user_cache_dir() / "converted" / sha256[:32]


def load_gguf(path: Path, dtype: Any, progress: Callable[[str], None] | None = None) -> tuple[Any, Any, str]:
    """(CausalLM in `dtype`, tokenizer, the GGUF file's sha256), from the converted copy, made first if missing.

    A cache that cannot be written (read-only home, full disk) falls back to loading the GGUF file itself.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = progress or (lambda _message: None)
    digest = gguf_sha256(path)
    folder = converted_dir(digest)
    if not (folder / "converted.json").is_file():
        report(f"converting {path.name} once into {folder} (later loads take seconds)")
        import torch

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        try:
            _save(folder, model, tok, path, digest)
        except OSError as error:
            report(f"could not keep the converted copy ({error}); loading from the GGUF file each time")
            return model.to(dtype), tok, digest
        del model
    report(f"loading {path.name} (converted copy)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(folder))
    return model, tok, digest


def _save(folder: Path, model: Any, tok: Any, source: Path, digest: str) -> None:
    """Write into a temporary folder and rename it, so an interrupted conversion leaves no half copy behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # the de-quantized model is plain float32; transformers still marks it GGUF-quantized and refuses to save it
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "converted.json").write_text(
        json.dumps({"format": CONVERTED_FORMAT, "source": source.name, "sha256": digest}, indent=1)
    )
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "converted.json").is_file():  # not another process having won the race
            raise
