"""The committed launch scripts (``plans/exports/*.sh``) parsed by the engines' own CLI parsers.

``plan export`` writes each flag from a table read off the engines' sources
(``planner/export/flags.py``). Here every launch command of every script is read back from the
file (bash line continuations joined, comments skipped, ``NAME=value`` prefixes taken as its
environment; ``${HEAD_ADDR}``-style addresses replaced by 192.0.2.1, an address that is parsed as a
string and never contacted) and handed to its engine's argument parser, built the way the engine's
entry point builds it. Nothing is started and no model is loaded:

* vLLM / Arctic Inference (``vllm serve MODEL ...``): the ``serve`` subparser of the ``vllm`` CLI
  (``vllm.entrypoints.cli.serve``, added to a ``FlexibleArgumentParser`` as ``vllm``'s main adds it),
  ``parse_args``, the subcommand's ``validate``, then ``AsyncEngineArgs.from_cli_args`` (the engine
  arguments with their ``__post_init__``; not ``create_engine_config``, which reads the model's
  config from the hub). On vLLM's CPU platform: its CUDA platform needs libcuda. With the
  command's ``ARCTIC_INFERENCE_ENABLED=1`` vLLM itself loads the Arctic plugin (its
  ``vllm.general_plugins`` entry point, run by ``AsyncEngineArgs.add_cli_args``), which patches
  ``EngineArgs.add_cli_args`` with its flags (arctic_inference/vllm/args.py);
  ``ARCTIC_INFERENCE_SKIP_PLATFORM_CHECK=1`` lets it load on the CPU platform.
* SGLang (``python -m sglang.launch_server ...``): ``ServerArgs.add_cli_args`` on an
  ``argparse.ArgumentParser`` and ``parse_args``, as ``prepare_server_args`` does; its
  ``ServerArgs.from_cli_args`` is tried and its error kept (its ``__post_init__`` looks for an
  accelerator).

Then every flag of the table for each engine in one made-up command, and each further value the
table allows a flag of fixed choices in a command of its own (``table_commands``). Each script's
command is parsed in a child process of its own, the table's commands in one per engine (a plugin
patches vLLM for the whole process). Run from the repository root with the python of an environment
where the engines are installed (README, "Deploy on vLLM, Arctic Inference or SGLang", says how):

    python bench/export_flags.py --out bench/results

Writes DIR/export_flags.{json,md}; exits 1 when a flag failed to parse. ``launch_commands`` uses the
standard library only: tests/test_export.py reads every committed script with it and checks that
each of its flags was parsed here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = ROOT / "plans" / "exports"
ADDRESS = "192.0.2.1"  # TEST-NET-1 (RFC 5737): stands in for ${HEAD_ADDR}, ${NODE_ADDR_1}, ...
PROGRAMS = {("vllm", "serve"): "vllm", ("python", "-m", "sglang.launch_server"): "sglang"}
MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # a name only: nothing is loaded
# Values for the table's flags (planner/export/flags.py) that take neither a number nor one of its choices.
SAMPLES = {f: [] for f in ("--headless", "--enable-shift-parallel", "--mm-encoder-only", "--mm-enable-dp-encoder",
                           "--encoder-only", "--language-only")}
SAMPLES.update({"--data-parallel-address": [ADDRESS], "--master-addr": [ADDRESS], "--node-rank": ["1"],
                "--dist-init-addr": [f"{ADDRESS}:50000"], "--port": ["8100"],
                "--encoder-urls": [f"http://{ADDRESS}:30100", f"http://{ADDRESS}:30101"],
                "--ec-transfer-config": ['{"ec_connector":"ECExampleConnector","ec_role":"ec_producer",'
                                         '"ec_connector_extra_config":{"shared_storage_path":"ec_cache"}}']})
PACKAGES = ("vllm", "arctic-inference", "sglang", "torch", "transformers")


def launch_commands(text: str) -> list[dict[str, Any]]:
    """The commands of a launch script, in order: ``{"env": {NAME: value}, "program": [...],
    "args": [...]}`` (``args``: what follows the program, ``${VAR}`` left as written)."""
    cmds = []
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        env = {}
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        prog = next((list(p) for p in PROGRAMS if tuple(words[:len(p)]) == p), None)
        if prog is None:
            raise ValueError(f"not a launch command: {line.strip()[:80]}")
        cmds.append({"env": env, "program": prog, "args": words[len(prog):]})
    return cmds


def flags_of(args: list[str]) -> list[str]:
    return [w for w in args if w.startswith("--")]


def value_of(args: list[str], flag: str) -> str:
    """The words after ``flag`` up to the next flag, space-joined ("" for a switch)."""
    return " ".join(itertools.takewhile(lambda w: not w.startswith("--"), args[args.index(flag) + 1:]))


# ------------------------------------------------------------------ one command, in a child process


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """``parser.parse_args(argv)``, or None and the parser's error message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv), None
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
        return None, (lines[-1].split("error:", 1)[1].strip() if lines else err.getvalue().strip()[-300:])


def _vllm(cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    os.environ.update(cmds[0]["env"])
    if os.environ.get("ARCTIC_INFERENCE_ENABLED") == "1":
        os.environ["ARCTIC_INFERENCE_SKIP_PLATFORM_CHECK"] = "1"
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms.current_platform = CpuPlatform()
    import vllm.entrypoints.cli.serve as serve
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    sub = parser.add_subparsers(required=False, dest="subparser")
    cli = serve.cmd_init()[0]
    options = cli.subparser_init(sub)._option_string_actions
    out = []
    for cmd in cmds:
        args = cmd["args"]
        r: dict[str, Any] = {"parser": "vllm serve (vllm.entrypoints.cli.serve), platform CpuPlatform",
                             "arctic_plugin_loaded": "arctic_inference.vllm.args" in sys.modules}
        ns, err = _parse(parser, ["serve"] + args)
        r["parse"] = {"ok": ns is not None, "error": err}
        model = args[:1] if args and not args[0].startswith("--") else []
        r["flags"] = _flag_values(ns, options, args, err, lambda words: _parse(parser, ["serve"] + model + words))
        if ns is not None:
            try:
                cli.validate(ns)
                ns.model = ns.model_tag or ns.model
                ea = AsyncEngineArgs.from_cli_args(ns)
                r["engine_args"] = {"ok": True, "class": type(ea).__qualname__}
            except Exception as e:  # noqa: BLE001 - the engine's own complaint is the result
                r["engine_args"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.append(r)
    return out


def _sglang(cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    os.environ.update(cmds[0]["env"])
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    out = []
    for cmd in cmds:
        args = cmd["args"]
        r: dict[str, Any] = {"parser": "argparse + sglang.srt.server_args.ServerArgs.add_cli_args "
                                       "(prepare_server_args)"}
        ns, err = _parse(parser, args)
        r["parse"] = {"ok": ns is not None, "error": err}
        model = args[args.index("--model-path"):args.index("--model-path") + 2] if "--model-path" in args else []
        r["flags"] = _flag_values(ns, parser._option_string_actions, args, err,
                                  lambda words: _parse(parser, (model if words[0] != "--model-path" else []) + words))
        if ns is not None:
            try:
                ServerArgs.from_cli_args(ns)
                r["engine_args"] = {"ok": True, "class": "ServerArgs"}
            except Exception as e:  # noqa: BLE001
                r["engine_args"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.append(r)
    return out


def _flag_values(ns: argparse.Namespace | None, options: dict[str, argparse.Action], args: list[str],
                 err: str | None, parse_alone: Any) -> dict[str, dict[str, Any]]:
    """Per flag: known to the parser, parsed, and the value it parsed to. When the command fails,
    each flag is parsed again alone (with the model), so that the error lands on the flag it is about."""
    out = {}
    for i, f in enumerate(args):
        if not f.startswith("--"):
            continue
        act = options.get(f)
        words = [f] + list(itertools.takewhile(lambda w: not w.startswith("--"), args[i + 1:]))
        got, why = (ns, err) if ns is not None or act is None else parse_alone(words)
        d: dict[str, Any] = {"known": act is not None, "ok": got is not None and act is not None}
        if d["ok"]:
            d["dest"], d["value"] = act.dest, json.loads(json.dumps(getattr(got, act.dest), default=str))
        else:
            d["error"] = "unknown to the parser" if act is None else why
        out[f] = d
    return out


def child(cmds: list[dict[str, Any]], out: Path) -> None:
    """Parse ``cmds`` (one program, one environment: the first command's) with one parser."""
    cmds = [{**c, "args": [re.sub(r"\$\{\w+\}", ADDRESS, w) for w in c["args"]]} for c in cmds]
    try:
        rs = (_vllm if PROGRAMS[tuple(cmds[0]["program"])] == "vllm" else _sglang)(cmds)
    except Exception as e:  # noqa: BLE001 - the engine could not be imported or its parser not built
        rs = [_failed(c, f"parser not built: {type(e).__name__}: {e}") for c in cmds]
    out.write_text(json.dumps(rs))


def _failed(cmd: dict[str, Any], why: str) -> dict[str, Any]:
    return {"parse": {"ok": False, "error": why},
            "flags": {f: {"known": False, "ok": False, "error": why} for f in flags_of(cmd["args"])}}


def run_child(cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "r.json"
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cmds), "--child-out", str(res)],
                           cwd=d, capture_output=True, text=True, timeout=900)
        if res.exists():
            return json.loads(res.read_text())
        return [_failed(c, f"child exited {p.returncode}: {p.stderr.strip()[-500:]}") for c in cmds]


# ------------------------------------------------------------------ every script


def versions() -> dict[str, str | None]:
    v: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            v[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            v[p] = None
    return v


def check_script(path: Path) -> dict[str, Any]:
    header = [ln[2:] for ln in path.read_text().splitlines()[2:4]]  # the target version, where flags were read
    commands = []
    for cmd in launch_commands(path.read_text()):
        r = run_child([cmd])[0]
        commands.append({**cmd, **r})
        print(path.name, " ".join(cmd["program"]), "parsed" if r["parse"]["ok"] else r["parse"]["error"], flush=True)
    return {"engine": path.name.split(".")[-2], "header": header, "commands": commands,
            "ok": all(f["ok"] for c in commands for f in c["flags"].values())}


def flag_table() -> Any:
    """planner/export/flags.py, loaded from its file (it imports nothing; the planner's packages need not be
    installed here)."""
    spec = importlib.util.spec_from_file_location("export_flag_table", ROOT / "planner" / "export" / "flags.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def table_commands(engine: str) -> list[dict[str, Any]]:
    """Every flag of the table for ``engine`` in one command (values: ``SAMPLES``, else the first of the table's
    choices, else "2"), then one command per further value the table allows a flag of fixed choices."""
    t = flag_table()
    program, head = ((["vllm", "serve"], [MODEL]) if engine != "sglang"
                     else (["python", "-m", "sglang.launch_server"], ["--model-path", MODEL]))
    env = {"ARCTIC_INFERENCE_ENABLED": "1"} if engine == "arctic" else {}
    choices = t.CHOICES[engine]
    args = list(head)
    for f in t.FLAGS[engine]:
        if f not in head:
            args += [f] + SAMPLES.get(f, [choices[f][0]] if f in choices else ["2"])
    cmds = [{"env": env, "program": program, "args": args}]
    cmds += [{"env": env, "program": program, "args": head + [f, v]} for f, vs in choices.items() for v in vs[1:]]
    return cmds


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python bench/export_flags.py"] + ["DIR" if i and args[i - 1] == "--out" else x
                                                         for i, x in enumerate(args)])


def markdown(r: dict[str, Any]) -> str:
    v = r["versions"]
    lines = ["# Export flags parsed by the engines' own parsers", "",
             f"vLLM {v['vllm']}, Arctic Inference {v['arctic-inference']} (plugin on that vLLM), SGLang {v['sglang']}; "
             f"torch {v['torch']}, transformers {v['transformers']}, Python {v['python']}. Command: `{r['command']}`.",
             "", r["method"], "",
             f"**{r['flags_ok']} of {r['flags_checked']} flags parsed** over {len(r['scripts'])} scripts "
             f"({r['commands']} launch commands); failed: {', '.join(r['failed']) or 'none'}.", "",
             "## Every flag of the table", "", "Every flag `planner/export/flags.py` lists for an engine, in one "
             "command, and each further value it allows a flag of fixed choices, one command each (these commands "
             "are made up: the flags together need not make a launch that runs).", "",
             "| engine | flag | value | parsed |", "| --- | --- | --- | --- |"]
    for e, cs in r["table"].items():
        for c in cs:
            for f, d in c["flags"].items():
                ok = "OK" if d["ok"] else f"FAILED: {d['error']}"
                val = value_of(c["args"], f)
                lines.append(f"| {e} | `{f}` | {f'`{val}`' if val else '(switch)'} | {ok} |")
    lines.append("")
    for name, s in r["scripts"].items():
        lines += [f"## {name}", "", f"{s['header'][0]}; {s['header'][1]}", ""]
        for i, c in enumerate(s["commands"]):
            env = " ".join(f"{k}={x}" for k, x in c["env"].items())
            ea, built = c.get("engine_args"), ""
            if ea:
                built = (f"; {'AsyncEngineArgs' if s['engine'] != 'sglang' else 'ServerArgs'}.from_cli_args: "
                         + (f"OK ({ea['class']})" if ea["ok"] else f"not built ({ea['error'][:160]})"))
            lines.append(f"Command {i + 1}: `{' '.join(([env] if env else []) + c['program'])}` -- parse "
                         + ("OK" if c["parse"]["ok"] else f"FAILED: {c['parse']['error']}") + built)
            lines += ["", "| flag | parsed to | |", "| --- | --- | --- |"]
            for f, d in c["flags"].items():
                lines.append(f"| `{f}` | " + (f"{d['dest']} = `{json.dumps(d['value'])}`" if d["ok"] else "")
                             + f" | {'OK' if d['ok'] else 'FAILED: ' + str(d['error'])} |")
            lines.append("")
    return "\n".join(lines)


METHOD = ("Each command of each script was read back from the file and parsed with its engine's parser as its entry "
          "point builds it (vLLM / Arctic: the `vllm serve` subparser, `validate`, `AsyncEngineArgs.from_cli_args`, "
          "on vLLM's CPU platform, Arctic's plugin loaded by vLLM from the command's ARCTIC_INFERENCE_ENABLED=1; "
          "SGLang: `ServerArgs.add_cli_args` + `parse_args`, then `ServerArgs.from_cli_args` tried). `${...}` "
          f"addresses were replaced by {ADDRESS}. Nothing was launched (no GPU): the engines' checks that need the "
          "model's config or a GPU did not run.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(json.loads(a.child), a.child_out)
        return 0
    if a.out is None:
        ap.error("--out DIR is required")
    scripts = {p.name: check_script(p) for p in sorted(EXPORTS.glob("*.sh"))}
    table = {}
    for engine in ("vllm", "arctic", "sglang"):
        cmds = table_commands(engine)
        table[engine] = [{**c, **r} for c, r in zip(cmds, run_child(cmds))]
        print("table", engine, [f for c in table[engine] for f, d in c["flags"].items() if not d["ok"]] or "parsed")
    flags = [(n, f, d) for n, s in scripts.items() for c in s["commands"] for f, d in c["flags"].items()]
    report = {"command": command_line(argv), "versions": versions(), "method": METHOD,
              "flags_checked": len(flags), "flags_ok": sum(d["ok"] for _, _, d in flags),
              "commands": sum(len(s["commands"]) for s in scripts.values()),
              "failed": sorted({f"{n} {f}" for n, f, d in flags if not d["ok"]}
                               | {f"table {e} {f} {value_of(c['args'], f)}".strip() for e, cs in table.items()
                                  for c in cs for f, d in c["flags"].items() if not d["ok"]}),
              "scripts": scripts, "table": table}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "export_flags.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "export_flags.md").write_text(markdown(report))
    print(f"{report['flags_ok']} of {report['flags_checked']} flags parsed; failed: {report['failed'] or 'none'}")
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
