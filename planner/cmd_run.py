"""`plan run`, `plan bench`, `plan export-onnx` (registered by planner.cli).

The executors (torch, transformers) are imported inside the commands, so other commands start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from planner.options import finite
from plans.errors import UserError


def parse_tokens(text: str) -> list[int]:
    """``"1,2, 3"`` or ``"1 2 3"`` -> ``[1, 2, 3]``; UserError naming the bad item (an empty one
    between commas too: ``"1,,2"`` is a typo, not ``[1, 2]``)."""
    if "," in text and any(not part.strip() for part in text.split(",")):
        raise UserError(f"--tokens: '{text}' has an empty item between commas")
    out = []
    for item in text.replace(",", " ").split():
        try:
            out.append(int(item))
        except ValueError:
            raise UserError(f"--tokens: '{item}' is not an integer token id") from None
    if not out:
        raise UserError("--tokens: no token ids given")
    return out


def check_context(plan_path: Path, n_in: int, n_out: int, in_opt: str, out_opt: str) -> None:
    """Refuse requests beyond the model's context, with the arithmetic (before any worker starts)."""
    from executors.config import model_args
    from executors.config import plan_config
    from plans.schema import load_plan

    plan = load_plan(plan_path)
    ctx = model_args(plan_config(plan, plan_path.parent)).max_positions
    if ctx and n_in + n_out > ctx:
        what = f"{in_opt} {n_in}" + (f" + {out_opt} {n_out} = {n_in + n_out}" if out_opt else "")
        raise UserError(f"{what} tokens per request is beyond the model's context of {ctx} tokens "
                        f"({plan.model.name})")


def check_names(backend: Optional[str], device: str) -> None:
    """--backend and --device, checked before a model is built (the workers would refuse them only then)."""
    from executors.backends import check_backend

    if backend is not None:
        try:
            check_backend(backend)
        except UserError as e:
            raise UserError(f"--backend: {e}") from None
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device '{device}': use cpu or cuda")


def check_run(plan_path: Path, ids: list[int] | None, n_new: int, images: list[Path], tokenizer: Optional[Path],
              backend: Optional[str], device: str, max_context: Optional[int]) -> None:
    """What `plan run` can tell is wrong before it starts workers and builds the model (minutes for a
    large plan on CPU): the backend and device names, the image and tokenizer paths, images for a model
    without a vision tower, token ids outside the vocabulary, a request beyond the context."""
    from executors.config import limit_context, model_args, plan_config
    from plans.schema import load_plan

    check_names(backend, device)
    for im in images:
        if not im.is_file():
            raise UserError(f"--image {im}: " + ("is a folder; give an image file" if im.is_dir() else "not found"))
    if tokenizer is not None:
        if not tokenizer.is_dir():
            raise UserError(f"--tokenizer {tokenizer}: " + ("not a folder; give the directory that holds "
                                                            "tokenizer.json" if tokenizer.exists() else "not found"))
        if not (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "tokenizer_config.json").is_file():
            raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json or tokenizer_config.json in it")
    plan = load_plan(plan_path)
    if images and not plan.model.vision_blocks:
        raise UserError(f"--image: {plan.model.name} ({plan.model.architecture}) has no vision tower")
    full = model_args(plan_config(plan, plan_path.parent))
    a = limit_context(full, max_context)
    if ids is not None:
        bad = [t for t in ids if not 0 <= t < a.vocab]
        if bad:
            raise UserError(f"--tokens: token id {bad[0]} is outside the vocabulary of {plan.model.name} "
                            f"(0..{a.vocab - 1})")
        # with images the prompt grows by their tokens: the engine checks that request once it has them
        if not images and a.max_positions and len(ids) + n_new > a.max_positions:
            whose = "--max-context" if a.max_positions < full.max_positions else f"{plan.model.name}'s context"
            raise UserError(f"--tokens: a prompt of {len(ids)} tokens + --max-new-tokens {n_new} = {len(ids) + n_new} "
                            f"tokens is beyond {whose} of {a.max_positions} tokens")


def run_cmd(
    plan: Path = typer.Argument(..., help="compiled plan file"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="prompt text (needs a tokenizer)"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="prompt token ids, e.g. '1,2,3'"),
    image: list[Path] = typer.Option([], "--image", help="image file (repeat for several); the prompt marks each "
                                                         "with one image-pad token, or one is prepended"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="local HF safetensors checkpoint directory "
                                                                  "(default: seeded random weights)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="local tokenizer directory (default: --weights)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1, max=1_000_000,
                                       help="tokens to generate (stops early at end-of-sequence)"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=100.0, callback=finite,
                                      help="sampling temperature; 0 is greedy"),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="seed of the random weights and of sampling"),
    device: str = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (NCCL)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="eager | compile | tensorrt (default: the plan's)"),
    max_context: Optional[int] = typer.Option(None, "--max-context", min=1, max=10_000_000,
                                              help="most tokens a sequence may hold, prompt + output (default: the "
                                                   "model's context); warm-up captures step graphs only up to it"),
) -> None:
    """Run one request through a plan on local workers and print the generated tokens (and text)."""
    if (prompt is None) == (tokens is None):
        raise UserError("give exactly one of --prompt TEXT or --tokens IDS")
    if prompt is not None and tokenizer is None and weights is None:
        raise UserError("--prompt needs a tokenizer (no --tokenizer or --weights directory given); give "
                        "--tokenizer DIR or use --tokens IDS")
    ids = parse_tokens(tokens) if tokens is not None else None
    check_run(plan, ids, max_new_tokens, list(image), tokenizer, backend, device, max_context)
    import executors
    from executors import Request, Sampling

    tok_dir = tokenizer or weights
    with executors.load(plan, weights=weights, device=device, backend=backend, seed=seed, tokenizer=tok_dir,
                        max_context=max_context) as eng:
        if prompt is not None and eng.tokenizer is None:
            where = f"{tok_dir} has no tokenizer.json" if tok_dir else "no --tokenizer or --weights directory given"
            raise UserError(f"--prompt needs a tokenizer ({where}); give --tokenizer DIR or use --tokens IDS")
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
    requests: int = typer.Option(8, "--requests", min=1, max=100_000, help="requests, all sent at once"),
    input_tokens: int = typer.Option(64, "--input-tokens", min=1, help="prompt tokens per request (random ids)"),
    output_tokens: int = typer.Option(32, "--output-tokens", min=1, help="tokens generated per request"),
    workload: Optional[Path] = typer.Option(None, "--workload", "-w", help="replay a spec's (.yaml) or trace's "
                                                                           "traffic in real time instead"),
    rate: Optional[float] = typer.Option(None, "--rate", min=1e-6, max=1e6, callback=finite,
                                         help="with --workload: arrival rate, requests/s (default: the workload's)"),
    duration: Optional[float] = typer.Option(None, "--duration", min=1e-3, max=86_400.0, callback=finite,
                                             help="with --workload: seconds of arrivals to replay"),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="seed of the workload draw and of the weights"),
    compare_sim: bool = typer.Option(False, "--compare-sim", help="with --workload: the simulator's prediction for "
                                                                   "the same requests beside the measurement"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="local HF safetensors checkpoint directory "
                                                                  "(default: seeded random weights)"),
    device: str = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (NCCL)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="eager | compile | tensorrt (default: the plan's)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON here"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="also write the step trace here (JSON: where each "
                                                               "step's time went, driver and rank; executors/trace.py)"),
    max_context: Optional[int] = typer.Option(None, "--max-context", min=1, max=10_000_000,
                                              help="with --workload: most tokens a sequence may hold (default: the "
                                                   "replay's longest request; without --workload, input + output "
                                                   "tokens)"),
) -> None:
    """Measure TTFT, TPOT and token throughput of a plan on synthetic requests (all sent at once), or, with
    --workload, on a workload replayed in real time (the same figures and JSON keys as `plan simulate`)."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from executors.bench import bench
    from planner.paths import writable, write_text

    check_names(backend, device)
    if json_out is not None:
        writable(json_out, "--json")
    if trace is not None:
        writable(trace, "--trace")
    if workload is not None:
        out = _bench_workload(plan, workload, rate, duration, seed, compare_sim, weights, device, backend,
                              trace is not None, max_context)
        _write_trace(trace, out.pop("step_trace", None))
        if json_out:
            write_text(json_out, json.dumps(out, indent=2) + "\n", "--json")
        return
    if rate is not None or duration is not None or compare_sim or max_context is not None:
        raise UserError("--rate, --duration, --compare-sim and --max-context replay a workload: give --workload SPEC|TRACE")
    check_context(plan, input_tokens, output_tokens, "--input-tokens", "--output-tokens")
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("generated tokens", total=requests * output_tokens)
        out = bench(plan, requests, input_tokens, output_tokens, weights=weights, device=device, backend=backend,
                    progress=lambda n: bar.update(task, completed=n), trace=trace is not None)
    _write_trace(trace, out.pop("step_trace", None))
    for k, v in out.items():
        typer.echo(f"{k}: {v}")
    if json_out:
        write_text(json_out, json.dumps(out, indent=2) + "\n", "--json")


def _write_trace(path: Optional[Path], steps: Optional[list]) -> None:
    """``--trace``: the run's steps and their sums by kind of step (``executors.trace.summary``)."""
    import json

    from executors.trace import summary
    from planner.paths import write_text

    if path is None:
        return
    if steps is None:  # the engine recorded none (a torchrun launch)
        typer.echo(f"step trace: this run recorded none; {path} not written", err=True)
        return
    write_text(path, json.dumps({"summary": summary(steps), "steps": steps}, indent=1) + "\n", "--trace")
    typer.echo(f"step trace: {len(steps)} steps -> {path}", err=True)


def _bench_workload(plan_path: Path, source: Path, rate: Optional[float], duration: Optional[float], seed: int,
                    compare_sim: bool, weights: Optional[Path], device: str, backend: Optional[str],
                    trace: bool = False, max_context: Optional[int] = None) -> dict:
    """Replay, print (JSON keys of `plan simulate --json`; with --compare-sim a table of measured vs
    predicted and the error of each figure), and return what was printed (with ``trace``, and the
    step trace under ``step_trace``)."""
    import json

    from costmodels.simulator import cost_model_for_plan
    from planner.bench_workload import bench_workload, compare
    from planner.cmd_simulate import _clean, _row, load_workload
    from plans.schema import load_plan

    p = load_plan(plan_path)
    info = cost_model_for_plan(p, base_dir=plan_path.parent).info
    try:
        p.check_model(info)
    except UserError as e:
        raise UserError(f"{plan_path}: {e}") from None
    wl, slo = load_workload(source, info, seed, p)
    res = bench_workload(plan_path, wl, rate=rate, duration=duration, seed=seed, slo=slo, weights=weights,
                         device=device, backend=backend, compare_sim=compare_sim, trace=trace, max_context=max_context)
    out = {"measured": _clean(_row(p.name, res["rate_rps"], res["measured"]))}
    if res["predicted"] is not None:
        out["predicted"] = _clean(_row(p.name, res["rate_rps"], res["predicted"]))
        rows = compare(res["measured"], res["predicted"])
        out["comparison"] = _clean(rows)
        typer.echo(f"{p.name}: {res['requests']} requests at {res['rate_rps']:.3g} req/s, measured vs predicted")
        for r in rows:
            err = "-" if r["error"] != r["error"] else f"{100 * r['error']:+.1f}%"
            typer.echo(f"  {r['figure']:<20} {r['measured']:>12.4g} {r['predicted']:>12.4g}  {err:>8}")
    typer.echo(json.dumps(out if res["predicted"] is not None else out["measured"], indent=1))
    return {**out, **({"step_trace": res["step_trace"]} if "step_trace" in res else {})}


def export_onnx_cmd(
    plan: Path = typer.Argument(..., help="compiled plan file"),
    stage: int = typer.Option(0, "--stage", min=0, help="pipeline stage to export"),
    output: Path = typer.Option(..., "-o", "--output", help="ONNX file to write"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="local HF safetensors checkpoint directory "
                                                                  "(default: seeded random weights)"),
    tokens: int = typer.Option(8, "--tokens", min=1, help="example prompt length used for tracing (dynamic)"),
) -> None:
    """Export one pipeline stage (its layers at TP degree 1, one prefill) as ONNX."""
    from planner.paths import writable
    from plans.schema import load_plan

    p = load_plan(plan)
    if stage >= p.mesh.pp:
        raise UserError(f"--stage {stage}: the plan has {p.mesh.pp} stage(s), 0 to {p.mesh.pp - 1}")
    writable(output, "-o")
    check_context(plan, tokens, 0, "--tokens", "")
    from executors.onnx_export import export_stage

    path = export_stage(plan, stage, output, weights=weights, tokens=tokens)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `plan` app."""
    app.command("run")(run_cmd)
    app.command("bench")(bench_cmd)
    app.command("export-onnx")(export_onnx_cmd)
