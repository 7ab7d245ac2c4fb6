"""The ``plait`` command line.

Errors caused by input (config, data, plugins) print as one line and exit with code 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from plait.core import __version__, hookspecs, manager
from plait.core.config import load_config
from plait.core.errors import ConfigError, PlaitError
from plait.core.manager import BUILTIN_PREFIX, Plugins, list_plugins
from plait.core.runs import load, prepare

EXIT_USAGE = 2


def print_results(title: str, results: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("modalities")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("samples", justify="right")
    for name, metrics in results.items():
        table.add_row(name, f"{metrics['accuracy']:.4f}", f"{metrics['loss']:.4f}", str(metrics["samples"]))
    Console().print(table)


# ------------------------------------------------------------------ commands
def cmd_train(args: argparse.Namespace) -> int:
    from plait.launch import ray_runner
    from plait.launch.storage import run_location

    raw = load_config(args.config, args.overrides)
    config, _ = prepare(raw, str(args.config))  # validate before anything starts
    results = ray_runner.train(config, raw, address=args.address, verbose=args.verbose)
    if "test" in results:
        print_results("test accuracy", results["test"])
    mfu = f", MFU {results['mfu']:.1%}" if results.get("mfu") is not None else ""
    print(f"run folder: {run_location(config.run.runs_dir, config.run.name)}  ({results['world_size']} worker(s), "
          f"{results['samples_per_s']:.0f} samples/s{mfu}, {results['steps']} steps)")
    if results.get("workers"):  # where each worker ran: one node per worker, or several per node
        print("workers: " + ", ".join(f"rank {rank} on node {worker['node_id'][:12]} ({worker['node']})"
                                      for rank, worker in enumerate(results["workers"])))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from plait.launch.evaluate import evaluate_run

    keep = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    metrics = evaluate_run(Path(args.run_dir), data=args.data, modalities=keep)
    if args.json:
        print(json.dumps(metrics))
    else:
        print_results(str(args.run_dir), {"+".join(metrics["modalities"]): metrics})
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from plait.core.runs import load
    from plait.launch.plan import parse_size, plan, print_plan

    limit = parse_size(args.device_memory) if args.device_memory else None
    config, plugins = load(args.config, args.overrides)
    result = plan(config, plugins, limit)
    if args.json:
        print(json.dumps(result))
    else:
        print_plan(args.config, result)
    return 0 if result["fits"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from plait.core import checkpoint
    from plait.core.runs import load_run

    run_dir = Path(args.run_dir)
    if args.format == "hf":
        from plait.launch.export import export_hf

        print(f"{export_hf(run_dir, Path(args.out) if args.out else None)}: written")
        return 0
    newest = checkpoint.latest(run_dir / "checkpoints")
    if newest is not None and not (newest / checkpoint.SHARDS).is_dir():
        print(f"{newest}: already in the full format (model.safetensors)")
        return 0
    state = load_run(run_dir)[2]  # the newest checkpoint's weights, from its shards (or one line why not)
    assert newest is not None  # load_run refused a folder without one
    print(f"{checkpoint.export(newest, state.model)}: written")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from plait.launch.compress import compress_run

    result = compress_run(Path(args.run_dir), args.spec, args.overrides)
    if args.json:
        print(json.dumps(result))
        return 0
    before, after = result["before"]["accuracy"], result["after"]["accuracy"]
    print_results("test accuracy before", before)
    print_results("test accuracy after", after)
    print(f"compressed run: {result['run_dir']}  (size {result['before']['size_mib']:.2f} -> "
          f"{result['after']['size_mib']:.2f} MiB; batch-32 CPU latency {result['before']['latency_bs32_ms']:.1f} -> "
          f"{result['after']['latency_bs32_ms']:.1f} ms; report.md there)")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from plait.launch.preprocess import option_pairs, run_preprocess

    options = option_pairs([*args.options, *getattr(args, "extra", [])])
    return run_preprocess(args.name, options, args.input, args.output, args.query, args.json, on_ray=args.ray,
                          address=args.address, cpus=args.cpus, rows_per_part=args.rows_per_part)


def cmd_runs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from plait.launch.compare import compare, find_runs, plot_runs

    runs = find_runs(args.runs)
    header, rows = compare(runs)
    if args.json:
        print(json.dumps({"header": header, "rows": rows}))
    else:
        table = Table(title="plait runs")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    if args.plot:
        print(f"{plot_runs(runs, Path(args.plot))}: written")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    if args.order:
        return _print_order(args)
    infos = list_plugins()
    if args.json:
        print(json.dumps([vars(i) for i in infos], indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="plait plugins")
    for column in ("name", "source", "distribution", "version", "status", "hooks"):
        table.add_column(column)
    for info in infos:
        status = info.status if not info.error else f"{info.status}: {info.error}"
        table.add_row(info.name, info.source, info.distribution or "", info.version or "", status,
                      ", ".join(info.hooks))
    Console().print(table)
    return 0


def _print_order(args: argparse.Namespace) -> int:
    """Per hook, the config's plugins in the order they run."""
    from plait.launch.hookdoc import hook_order
    from plait.launch.ray_runner import add_runner_plugins

    config, plugins = load(args.order, [])
    # and the plugins `plait train` adds on rank 0 (a stand-in for the driver's queue: nothing is sent)
    add_runner_plugins(plugins, config, progress=object() if config.scaling.max_workers else None)
    order = hook_order(plugins)
    if args.json:
        print(json.dumps(order, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hook order for {args.order} (start hooks in YAML order, end hooks reversed; "
                        "plait-* plugins are the runner's)")
    table.add_column("hook")
    table.add_column("plugins, in the order they run")
    for hook, names in order.items():
        table.add_row(hook, " -> ".join(names))
    Console().print(table)
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    from plait.launch.hookdoc import hook_reference

    print(hook_reference(args.name), end="")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from plait.launch.scaffold import scaffold

    root = scaffold(args.name, Path(args.dir))
    print(f"created {root}: `pip install -e {root}`, then `pytest {root}`")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from plait.launch import submit

    if args.status or args.stop:
        jobs = submit.client(args.address)
        if args.stop:
            jobs.stop_job(args.stop)
            print(f"stopping {args.stop}")
        else:
            print(jobs.get_job_status(args.status).value)
        return 0
    if not args.config:
        raise ConfigError("plait launch: give a CONFIG (or --status JOB_ID / --stop JOB_ID)")
    config, plugins = load(args.config, args.overrides)
    if args.emit == "rayjob":
        print(submit.rayjob_manifest(config, plugins, image=args.image, pip_deps=args.pip_deps), end="")
        return 0
    jobs, job_id = submit.submit(config, plugins, args.address, wheel=not args.no_wheel)
    print(f"submitted job {job_id} (run '{config.run.name}'); `plait launch --status {job_id}`", file=sys.stderr)
    if not args.follow:
        print(job_id)
        return 0
    status = submit.follow(jobs, job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_config(args: argparse.Namespace) -> int:
    config, _ = load(args.config, args.overrides)
    print(config.to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="Plugin-based multimodal training.")
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a YAML plugin set")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", metavar="key.path=value")
    train.add_argument("--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    train.add_argument("--verbose", action="store_true", help="show the Ray workers' own logs")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a run folder")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", help="a CSV/JSONL manifest to evaluate on instead of the run's test split")
    evaluate.add_argument("--modalities", help="comma list: use only these modalities (e.g. audio,image)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.set_defaults(func=cmd_eval)

    plan_cmd = sub.add_parser("plan", help="per-worker memory of a config's training step, built on the meta device")
    plan_cmd.add_argument("config")
    plan_cmd.add_argument("overrides", nargs="*", metavar="key.path=value")
    plan_cmd.add_argument("--device-memory", help="memory per worker to fit in (e.g. 24GiB; default: this machine's)")
    plan_cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_cmd.set_defaults(func=cmd_plan)

    export = sub.add_parser("export", help="full: write a sharded run's newest checkpoint as one "
                            "model.safetensors; hf: each tower in its native format (LoRA merged), the fusion, the "
                            "head and a model card")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=["full", "hf"], default="full")
    export.add_argument("--out", help="hf: the folder to write (default: RUN_DIR/export)")
    export.set_defaults(func=cmd_export)

    compress = sub.add_parser("compress", help="compress a run folder (quantize, distill...) into a new one")
    compress.add_argument("run_dir")
    compress.add_argument("spec", nargs="?", metavar="compress.yaml",
                          help="plugins: blocks of the compressing plugins (default: quantize with its defaults)")
    compress.add_argument("overrides", nargs="*", metavar="key.path=value")
    compress.add_argument("--json", action="store_true", help="print the figures as JSON")
    compress.set_defaults(func=cmd_compress)

    preprocess = sub.add_parser(
        "preprocess", help="run a plugin's sample transform over JSONL lines (medical, finance, legal...)",
        description="Options of the plugin follow as --key value or key=value, e.g. "
                    "`plait preprocess legal --corpus DIR --query '...' --k 5 --json`.")
    preprocess.add_argument("name", help="the plugin (legal is legal_rag)")
    preprocess.add_argument("options", nargs="*", metavar="key=value", help="the plugin's options")
    preprocess.add_argument("--input", help="a JSONL or Parquet file whose rows have a 'text' field, or a folder "
                                            "of them (read in name order)")
    preprocess.add_argument("--output", help="where the JSONL goes (default: stdout); with --ray, a new folder")
    preprocess.add_argument("--ray", action="store_true",
                            help="transform across a Ray cluster (RAY_ADDRESS, --address, or a local one) and "
                                 "write part-NNNNN.jsonl files whose concatenation is the one-process output")
    preprocess.add_argument("--address", help="with --ray: the cluster (default: RAY_ADDRESS or a local Ray)")
    preprocess.add_argument("--cpus", type=int, help="with --ray: how many CPUs (actors) transform (default: all)")
    preprocess.add_argument("--rows-per-part", type=int, default=2_000,
                            help="rows per chunk of work, and per output part with --ray (default: 2000)")
    preprocess.add_argument("--query", help="transform this one text instead of a file")
    preprocess.add_argument("--json", action="store_true", help="with --query: print JSON only")
    preprocess.set_defaults(func=cmd_preprocess, takes_plugin_options=True)

    launch = sub.add_parser("launch", help="run a config as a Ray job on a cluster")
    launch.add_argument("config", nargs="?")
    launch.add_argument("overrides", nargs="*", metavar="key.path=value")
    launch.add_argument("--address", help="the Ray job server, http://HOST:8265 (default: $RAY_ADDRESS)")
    launch.add_argument("--follow", action="store_true", help="stream the job's logs; Ctrl-C stops the job")
    launch.add_argument("--status", metavar="JOB_ID", help="print a job's status")
    launch.add_argument("--stop", metavar="JOB_ID", help="stop a job")
    launch.add_argument("--emit", choices=["rayjob"], help="print a KubeRay RayJob instead of submitting")
    launch.add_argument("--no-wheel", action="store_true", help="use the plait installed on the cluster")
    launch.add_argument("--image", help="--emit rayjob: the pods' image, which provides torch and plait's "
                        "dependencies (plait itself travels as its wheel)")
    launch.add_argument("--pip-deps", action="store_true", help="--emit rayjob: install plait's dependencies, "
                        "pinned to this machine's versions, at the job's start (on Ray's own image by default)")
    launch.set_defaults(func=cmd_launch)

    runs = sub.add_parser("runs", help="runs side by side: config differences, final metrics, speed, MFU")
    runs.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders of run folders")
    runs.add_argument("--plot", metavar="PNG", help="also draw their curves (loss, val accuracy, samples/s) here")
    runs.add_argument("--json", action="store_true", help="the table as JSON")
    runs.set_defaults(func=cmd_runs)

    plugins = sub.add_parser("plugins", help="list installed plugins")
    plugins.add_argument("--json", action="store_true")
    plugins.add_argument("--order", metavar="CONFIG", help="print, per hook, the order the config's plugins run in")
    plugins.set_defaults(func=cmd_plugins)

    hooks = sub.add_parser("hooks", help="the hook reference (markdown), or one hook's entry")
    hooks.add_argument("name", nargs="?")
    hooks.set_defaults(func=cmd_hooks)

    new_plugin = sub.add_parser("new-plugin", help="scaffold a pip-installable plugin package")
    new_plugin.add_argument("name", help="the plugin's name (lowercase, digits, _)")
    new_plugin.add_argument("--dir", default=".", help="where to create plait-NAME/ (default: here)")
    new_plugin.set_defaults(func=cmd_new_plugin)

    config = sub.add_parser("config", help="print the resolved config")
    config.add_argument("config")
    config.add_argument("overrides", nargs="*", metavar="key.path=value")
    config.set_defaults(func=cmd_config)
    register_plugin_commands(sub)
    return parser


def register_plugin_commands(subparsers: Any) -> None:
    """Let installed third-party plugins add subcommands; one that fails is reported and
    skipped. (Built-ins add none, and importing them would cost every command seconds.)"""
    for name, entry_point in manager.discover().items():
        if entry_point.value.startswith(BUILTIN_PREFIX):
            continue
        try:
            plugins = Plugins().load([name])
            plugins.call_each(hookspecs.plait_register_commands, subparsers=subparsers)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
            print(f"plait: warning: plugin '{name}' could not add its commands: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`plait train c.yaml --verbose run.epochs=2`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra and getattr(args, "takes_plugin_options", False):
        args.extra = extra  # `plait preprocess legal --corpus DIR --k 5`: the plugin's options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="plait: %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args)
    except PlaitError as exc:
        if args.debug:
            raise
        print(f"plait: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
