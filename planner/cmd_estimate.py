"""`plan estimate` (what-if numbers for one fixed mesh and a static batch) and `plan calibrate`
(micro-benchmarks on the GPU this machine has, written as a cost profile).

Heavy imports (torch, transformers) happen inside the commands; `plan estimate` with a
cached op graph imports neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from planner.options import finite
from plans.errors import UserError


def _fmt_estimate(e) -> str:
    """Human-readable lines of a ``costmodels.estimate.Estimate``."""
    mesh = " x ".join(f"{k}{v}" for k, v in e.mesh.items() if v > 1) or "single GPU"
    m = e.memory_gb
    lines = [
        f"mesh {mesh}, static batch {e.batch} x ({e.isl} in + {e.osl} out) tokens, profile {e.profile}",
        f"  TTFT            {e.ttft_ms:10.2f} ms   (prefill in {e.modes.get('prefill')} mode)",
        f"  TPOT            {e.tpot_ms:10.2f} ms   (decode in {e.modes.get('decode')} mode)",
        f"  output          {e.output_tok_s:10.1f} tok/s",
        f"  combined        {e.combined_tok_s:10.1f} tok/s (input + output)",
        f"  memory per GPU  weights {m['weights']:.1f} GB"
        + (f" + shift copy {m['shift_copy']:.1f} GB" if m.get("shift_copy") else "")
        + f", activations {m['activations']:.1f} GB, KV {m['kv']:.1f} GB of {m['capacity']:.0f} GB",
        f"  max batch       {e.max_batch}",
    ]
    if e.shift_crossover_tokens is not None or e.mesh.get("sp", 1) > 1:
        cross = e.shift_crossover_tokens
        lines.append(f"  shift crossover {cross if cross is not None else 'none (shifted TP always faster)'}"
                     + (" tokens per step (SP x TP above, TP below)" if cross is not None else ""))
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add `estimate` and `calibrate` to the `plan` app."""

    @app.command("estimate")
    def estimate_cmd(
        spec: Path = typer.Argument(..., help="model.yaml spec (its model, dtypes and hardware are used)"),
        tp: int = typer.Option(1, "--tp", min=1, max=65536, help="tensor-parallel degree"),
        pp: int = typer.Option(1, "--pp", min=1, max=65536, help="pipeline stages"),
        sp: int = typer.Option(1, "--sp", min=1, max=65536, help="Ulysses sequence-parallel degree (shift parallelism when > 1)"),
        dp: int = typer.Option(1, "--dp", min=1, max=65536, help="data-parallel replicas"),
        batch: int = typer.Option(1, "--batch", help="static batch: requests in flight (over all replicas)"),
        isl: int = typer.Option(1024, "--isl", help="input (prompt) tokens per request"),
        osl: int = typer.Option(256, "--osl", help="output tokens per request"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
        roofline: bool = typer.Option(False, "--roofline", help="ignore the calibration profile"),
        images: int = typer.Option(0, "--images", help="images per request (multimodal models)"),
        image_tokens: int = typer.Option(0, "--image-tokens", help="LLM tokens per image (part of --isl)"),
    ) -> None:
        """TTFT, TPOT, throughput, memory per GPU and the largest batch of one fixed mesh."""
        from costmodels.estimate import estimate
        from planner.inputs import cost_model_of
        from planner.spec import load_spec

        s = load_spec(spec)
        cm, _ = cost_model_of(s, use_profile=not roofline)
        e = estimate(cm, tp=tp, pp=pp, sp=sp, dp=dp, batch=batch, isl=isl, osl=osl,
                     max_batch_tokens=s.search.max_batch_tokens, world=s.hardware.world_size,
                     gpus_per_node=s.hardware.gpus_per_node, images=images, image_tokens=image_tokens)
        typer.echo(json.dumps(e.to_json(), indent=1) if as_json else _fmt_estimate(e))

    @app.command("calibrate")
    def calibrate_cmd(
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="profile JSON to write (default: <gpu>.json)"),
        quick: bool = typer.Option(False, "--quick", help="a sparse grid (about a minute)"),
        gpu: Optional[str] = typer.Option(None, "--gpu", help="catalog name of this GPU (default: from the device name)"),
        budget_s: float = typer.Option(600.0, "--budget-s", min=1.0, max=7 * 86400.0, callback=finite,
                                       help="stop timing new points after this many seconds"),
    ) -> None:
        """Run micro-benchmarks on this machine's GPU and write a calibration profile.

        Commit the result as costmodels/profiles/<gpu>.json to make it the default for that GPU."""
        from costmodels.calibrate import calibrate, device_meta, find_gpu_name

        try:
            import torch
        except ImportError:
            raise UserError("plan calibrate needs torch with CUDA") from None
        if not torch.cuda.is_available():
            raise UserError("plan calibrate needs a CUDA GPU and torch.cuda sees none "
                            "(torch.cuda.is_available() is False); run it on the GPU machine")
        name = gpu or find_gpu_name(device_meta()["device_name"])
        if name is None:
            raise UserError(f"no catalog entry for device '{torch.cuda.get_device_name(0)}'; pass --gpu NAME")
        from planner.paths import writable

        path = writable(out or Path(f"{name}.json"), "-o")
        from rich.console import Console
        from rich.markup import escape

        con = Console(stderr=True)
        with con.status(f"calibrating {escape(name)}: GEMMs first") as status:
            def log(msg: str) -> None:  # each finished phase stays on screen; the spinner names the next
                con.print(escape(msg), highlight=False)
                status.update(f"calibrating {escape(name)}: after {escape(msg.split(':')[0])}")

            prof = calibrate(path, quick=quick, gpu=name, budget_s=budget_s, log=log)
        typer.echo(f"wrote {path} (profile {prof.id}); copy it to costmodels/profiles/{name}.json to use it")
