"""`plan run`, `plan bench`, `plan export-onnx` (registered by planner.cli).

The executors (torch, transformers) are imported inside the commands, so other commands start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from plans.errors import UserError


def parse_tokens(text: str) -> list[int]:
    """``"1,2, 3"`` or ``"1 2 3"`` -> ``[1, 2, 3]``; UserError naming the bad item."""
    out = []
    for item in text.replace(",", " ").split():
        try:
            out.append(int(item))
        except ValueError:
            raise UserError(f"--tokens: '{item}' is not an integer token id") from None
    if not out:
        raise UserError("--tokens: no token ids given")
    return out


def run_cmd(
    plan: Path = typer.Argument(..., help="compiled plan file"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="prompt text (needs a tokenizer)"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="prompt token ids, e.g. '1,2,3'"),
    image: list[Path] = typer.Option([], "--image", help="image file (repeat for several); the prompt marks each "
                                                         "with one image-pad token, or one is prepended"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="local HF safetensors checkpoint directory "
                                                                  "(default: seeded random weights)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="local tokenizer directory (default: --weights)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (NCCL)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="eager | compile | tensorrt (default: the plan's)"),
) -> None:
    """Run one request through a plan on local workers and print the generated tokens (and text)."""
    if (prompt is None) == (tokens is None):
        raise UserError("give exactly one of --prompt TEXT or --tokens IDS")
    import executors
    from executors import Request, Sampling

    tok_dir = tokenizer or weights
    with executors.load(plan, weights=weights, device=device, backend=backend, seed=seed, tokenizer=tok_dir) as eng:
        if prompt is not None and eng.tokenizer is None:
            where = f"{tok_dir} has no tokenizer.json" if tok_dir else "no --tokenizer or --weights directory given"
            raise UserError(f"--prompt needs a tokenizer ({where}); give --tokenizer DIR or use --tokens IDS")
        ids = parse_tokens(tokens) if tokens is not None else None
        if image and ids is not None and eng.args.image_token_id is not None and eng.args.image_token_id not in ids:
            ids = [eng.args.image_token_id] * len(image) + ids
        req = Request(tokens=ids, prompt=prompt, images=list(image))
        res = eng.generate([req], max_new_tokens=max_new_tokens,
                           sampling=Sampling(temperature=temperature, seed=seed))[0]
    if res.error:
        raise UserError(res.error)
    typer.echo("tokens: " + " ".join(str(t) for t in res.tokens))
    if res.text is not None:
        typer.echo("text: " + res.text)


def bench_cmd(
    plan: Path = typer.Argument(..., help="compiled plan file"),
    requests: int = typer.Option(8, "--requests", min=1),
    input_tokens: int = typer.Option(64, "--input-tokens", min=1),
    output_tokens: int = typer.Option(32, "--output-tokens", min=1),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    device: str = typer.Option("cpu", "--device"),
    backend: Optional[str] = typer.Option(None, "--backend"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON here"),
) -> None:
    """Measure TTFT, TPOT and token throughput of a plan on synthetic requests (all sent at once)."""
    import json

    from executors.bench import bench

    out = bench(plan, requests, input_tokens, output_tokens, weights=weights, device=device, backend=backend)
    for k, v in out.items():
        typer.echo(f"{k}: {v}")
    if json_out:
        json_out.write_text(json.dumps(out, indent=2) + "\n")


def export_onnx_cmd(
    plan: Path = typer.Argument(..., help="compiled plan file"),
    stage: int = typer.Option(0, "--stage", min=0, help="pipeline stage to export"),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write"),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    tokens: int = typer.Option(8, "--tokens", min=1, help="example prompt length used for tracing (dynamic)"),
) -> None:
    """Export one pipeline stage (its layers at TP degree 1, one prefill) as ONNX."""
    from executors.onnx_export import export_stage

    path = export_stage(plan, stage, output, weights=weights, tokens=tokens)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `plan` app."""
    app.command("run")(run_cmd)
    app.command("bench")(bench_cmd)
    app.command("export-onnx")(export_onnx_cmd)
