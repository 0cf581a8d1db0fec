"""Merge a multi-GPU calibration (``bench/calibrate_comm_fp8.py``'s JSON) into a profile.

    python -m costmodels.merge COMM_FP8.json costmodels/profiles/h200.json [-o OUT.json]

Pure Python (no torch): run it on any machine. From the calibration it takes the collective
points (fitted into measured tables per mode, op and group size, with an alpha-beta fit of the
largest group: ``costmodels.fit.profile_collectives``) and the FP8 GEMM points (fitted as
e = 2MNK / ((ms - overhead) * fp8 peak) with the profile's own launch overhead, as its bf16
table is: ``costmodels.fit.fit_gemm_fp8``). FP8 GEMM points merge by ``(m, n, k)``: a new point
replaces the profile's point of the same shape, the profile's other points stay, and the table is
fitted on the union (so a run over the small-M rows only, ``bench/calibrate_comm_fp8.py --fp8-only
--max-m 256``, updates those rows and keeps the large-M ones). Such a run records its row limit
(``gemm_fp8_max_m``) and each point the kernel that ran; up to that limit a profile's point stays
only where it names the kernel the run used at its M (a point without a kernel name predates
them): so a run the time budget cut to some (N, K) pairs leaves no older kernel's points in its
rows, and the fit fills those rows' other cells from the new points (the bf16 table's shape over
N and K, scaled as the nearest measured cells of the row). Every other table stays as it is.
The raw points go into the profile's ``raw``; its id becomes the profile's id plus
``+<calibration date>`` (``+fp8-<date>`` for FP8 points alone, ``+fp8t-<date>`` for per-tensor FP8
points alone, ``+comm-<date>`` for collectives
alone; ``dec-`` before the date when the engine's decode-kernel points came in, ``--decode-engine``;
plans record the id, so recompiled plans say which tables they used) and ``meta.merged``
says what came in: the device, GPU count, driver, torch, CUDA and NCCL versions, the date and the
calibration command (an earlier ``merged`` moves to the list ``meta.merge_history``).
``--max-m M`` merges the FP8 points of at most ``M`` rows only, for a run whose larger rows timed a
kernel the engine no longer routes them to (their profile points stay). ``--meta KEY=VALUE`` supplies what an older calibration file did not record (e.g.
``--meta nccl=2.28.9``); a value the file holds is kept unless it is missing or "unknown".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from costmodels.calibrate import find_gpu_name  # no torch at import
from costmodels.fit import fit_decode_engine, fit_gemm_fp8, fit_prefill_engine, profile_collectives
from costmodels.profile import Profile, read_profile, write_profile
from plans.errors import UserError


META_KEYS = ("device_name", "gpus", "driver", "torch", "cuda", "nccl", "date", "command")


def merge(profile: Profile, calib: dict[str, Any], *, force: bool = False,
          extra_meta: dict[str, str] | None = None, max_m: int | None = None) -> Profile:
    """``profile`` with the collective tables, the ``gemm_fp8`` table and the engine's attention tables
    (``attn_decode_engine``, ``attn_prefill_engine``: each replaced by the new points) of ``calib``; with ``max_m``
    only its FP8 points of at most that many rows (the engine's route changed above: the profile's
    points there stay).

    Raises UserError when the calibration ran on another GPU model (unless ``force``) or holds
    neither collective nor FP8 GEMM points. Per-tensor FP8 points (``gemm_fp8_tensor``, from
    ``--fp8-kernel tensor``) go to their own table the same way."""
    meta = dict(calib.get("meta", {}))
    for k, v in (extra_meta or {}).items():
        if meta.get(k) in (None, "", "unknown"):
            meta[k] = v
    dev = str(meta.get("device_name", ""))
    if not force and find_gpu_name(dev) != profile.gpu:
        raise UserError(f"the calibration ran on '{dev}', the profile is for {profile.gpu}; pass --force to merge anyway")
    coll, fp8 = calib.get("collectives") or [], calib.get("gemm_fp8") or []
    fp8_tensor = calib.get("gemm_fp8_tensor") or []
    dec = calib.get("attn_decode_engine") or []
    pre = calib.get("attn_prefill_engine") or []
    run_max_m = calib.get("gemm_fp8_max_m")
    if max_m is not None:
        fp8 = [p for p in fp8 if int(p["m"]) <= max_m]
        run_max_m = max_m if run_max_m is None else min(int(run_max_m), max_m)
    if not coll and not fp8 and not fp8_tensor and not dec and not pre:
        raise UserError(f"nothing to merge: no collective, FP8 GEMM or engine attention points (skipped: {calib.get('skipped')}; "
                        f"errors: {calib.get('collectives_errors')})")
    raw = dict(profile.raw)
    out = profile
    if coll:
        cmeta = {**{k: meta.get(k) for k in META_KEYS if k in meta},
                 **calib.get("collectives_meta", {})}
        raw.update(collectives=coll, collectives_meta=cmeta, collectives_errors=calib.get("collectives_errors", []))
        out = replace(out, collectives=profile_collectives(coll, cmeta))
    kept = dropped = 0
    if fp8:
        pts, kept, dropped = merge_points(raw.get("gemm_fp8") or [], fp8,
                                          max_m=None if run_max_m is None else int(run_max_m))
        raw["gemm_fp8"] = pts
        out = replace(out, gemm_fp8=fit_gemm_fp8(pts, profile.gpu, profile.overhead_us, profile.gemm))
    if fp8_tensor:  # per-tensor-scaled FP8 GEMMs: a table of their own, fitted like gemm_fp8
        pts, _, _ = merge_points(raw.get("gemm_fp8_tensor") or [], fp8_tensor)
        raw["gemm_fp8_tensor"] = pts
        out = replace(out, gemm_fp8_tensor=fit_gemm_fp8(pts, profile.gpu, profile.overhead_us, profile.gemm))
    if dec:  # the engine's decode kernel, measured anew: its table is these points alone
        raw["attn_decode_engine"] = dec
        out = replace(out, attn_decode_engine=fit_decode_engine(dec, profile.overhead_us, profile.gpu))
    if pre:  # the engine's prefill kernel, likewise
        raw["attn_prefill_engine"] = pre
        out = replace(out, attn_prefill_engine=fit_prefill_engine(pre, profile.overhead_us, profile.gpu))
    merged = {**{k: meta.get(k) for k in META_KEYS}, "device_name": dev,
              "collective_points": len(coll), "gemm_fp8_points": len(fp8), "gemm_fp8_points_kept": kept,
              "gemm_fp8_points_dropped": dropped, **({"gemm_fp8_max_m": max_m} if max_m is not None else {}),
              **({"gemm_fp8_tensor_points": len(fp8_tensor)} if fp8_tensor else {}),
              **({"attn_decode_engine_points": len(dec)} if dec else {}),
              **({"attn_prefill_engine_points": len(pre)} if pre else {}),
              "skipped": calib.get("skipped", []), "collective_errors": calib.get("collectives_errors", [])}
    tag = {(True, True): "", (False, True): "fp8t-" if fp8_tensor and not fp8 else "fp8-",
           (True, False): "comm-", (False, False): ""}[bool(coll), bool(fp8 or fp8_tensor)] + ("dec-" if dec else "") \
        + ("pre-" if pre else "")
    pmeta = dict(profile.meta)
    if "merged" in pmeta:
        pmeta["merge_history"] = [*pmeta.get("merge_history", []), pmeta["merged"]]
    return replace(out, raw=raw, id=f"{profile.id}+{tag}{meta.get('date', 'merged')}", meta={**pmeta, "merged": merged})


def merge_points(old: list[dict], new: list[dict], max_m: int | None = None) -> tuple[list[dict], int, int]:
    """GEMM points ``{m, n, k, ...}``: ``new`` plus the points of ``old`` whose ``(m, n, k)`` ``new``
    does not measure (sorted by shape), how many of ``old`` were kept and how many dropped. With
    ``max_m`` (the row limit of the run that measured ``new``) a point of ``old`` at ``m <= max_m``
    is dropped unless its ``kernel`` is the one ``new`` names at that ``m`` (at an ``m`` it did not
    measure: at the nearest measured ``m`` on either side)."""
    def shape(p: dict) -> tuple[int, int, int]:
        return int(p["m"]), int(p["n"]), int(p["k"])

    fresh = {shape(p): p for p in new}
    kernels: dict[int, set] = {}
    for p in new:
        kernels.setdefault(int(p["m"]), set()).add(p.get("kernel"))

    def current(p: dict) -> bool:
        m = int(p["m"])
        if max_m is None or m > max_m:
            return True
        near = {max((x for x in kernels if x <= m), default=None), min((x for x in kernels if x >= m), default=None)}
        near.discard(None)
        return bool(near) and all(kernels[x] == {p.get("kernel")} for x in near)

    rest = [p for p in old if shape(p) not in fresh]
    kept = [p for p in rest if current(p)]
    return sorted(kept + list(fresh.values()), key=shape), len(kept), len(rest) - len(kept)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("calibration", type=Path, help="JSON written by bench/calibrate_comm_fp8.py")
    ap.add_argument("profile", type=Path, help="profile to merge into (e.g. costmodels/profiles/h200.json)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="where to write (default: over the profile)")
    ap.add_argument("--force", action="store_true", help="merge even if the GPU models differ")
    ap.add_argument("--max-m", type=int, default=None,
                    help="merge FP8 points of at most this many rows (the engine's route changed above)")
    ap.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                    help=f"a fact the calibration file lacks ({', '.join(META_KEYS)}); repeatable")
    a = ap.parse_args(argv)
    extra = {}
    for kv in a.meta:
        k, sep, v = kv.partition("=")
        if not sep or k not in META_KEYS:
            print(f"error: --meta {kv!r}: expected KEY=VALUE with KEY one of {', '.join(META_KEYS)}", file=sys.stderr)
            return 2
        extra[k] = v
    try:
        calib = json.loads(a.calibration.read_text())
        prof = merge(read_profile(a.profile), calib, force=a.force, extra_meta=extra, max_m=a.max_m)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {a.calibration}: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # points without the fields a table needs
        print(f"error: {a.calibration}: not a calibration this merge can read ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    out = a.out or a.profile
    write_profile(prof, out)
    m = prof.meta["merged"]
    sizes = prof.collectives.get("meta", {}).get("group_sizes", [])
    print(f"wrote {out} (profile {prof.id}): {m['collective_points']} collective points (group sizes {sizes}), "
          f"{m['gemm_fp8_points']} FP8 GEMM points ({m['gemm_fp8_points_kept']} of the profile's kept, "
          f"{m['gemm_fp8_points_dropped']} of another kernel dropped), "
          f"{m.get('gemm_fp8_tensor_points', 0)} per-tensor FP8 GEMM points, "
          f"{m.get('attn_decode_engine_points', 0)} engine decode points, "
          f"{m.get('attn_prefill_engine_points', 0)} engine prefill points, "
          f"{len(m['collective_errors'])} collective errors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
