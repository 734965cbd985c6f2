"""`mmtui verify`: the paper's named units, decoded by the LM, beside the tokens the paper prints."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from commands._app import JsonOption, app, core_errors, emit_json, err, out
from mmtui.defaults import Convention


@app.command()
def verify(
    lm: Annotated[str, typer.Option("--lm", help="The LM (hub id, folder or .gguf).")] = "EleutherAI/gpt-j-6b",
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision.")] = "float16",
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer (LiMBeR used gpt2).")] = "gpt2",
    decode: Annotated[Convention, typer.Option("--decode", help="raw (paper) or ln_f.")] = Convention.RAW,
    json_out: JsonOption = False,
) -> None:
    """Decode the units the paper names (L14.u2019 horses, L12.u9058 swimming, ...) and compare with its tokens."""
    from mmtui.experiments.verify import load_lm_only, verify_units

    with core_errors():
        with err.status(f"Loading {lm}..."):
            model = load_lm_only(lm, revision or None, tokenizer or None)
        rows = verify_units(model, convention=decode.value)
    if json_out:
        emit_json({"type": "paper_unit", **row} for row in rows)
        return
    table = Table(title=f"Paper units decoded by {lm} ({decode.value})")
    for name in ("neuron", "paper's tokens", "decoded here (top 10)", "paper's in our top 10"):
        table.add_column(name, overflow="fold")
    for r in rows:
        found = r["note"] or f"{r['matched']} of {len(dict.fromkeys(r['paper']))}"
        table.add_row(
            f"L{r['layer']}.u{r['unit']}", ", ".join(r["paper"]), ", ".join(t.strip() for t in r["tokens"]), found
        )
    out.print(table)
