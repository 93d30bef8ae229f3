"""The ``colora`` command line: run, resume, report, compare (CONTRACT.md)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .config import ColoraError, load_config

EXIT_BAD_INPUT = 2
EXIT_RUNS_FAILED = 1  # colora compare: the sweep was valid, but some of its runs failed
# An error line is one line of at most this many characters, whatever it quotes.
MAX_ERROR_CHARS = 1000


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="colora", description="Collaborative LoRA fine-tuning: central, federated, split, decentralized.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment from a YAML config",
                         description="Run one experiment. Writes config.yaml, metrics.jsonl, summary.json and adapter/ to the run directory.")
    run.add_argument("config", nargs="?", help="experiment config (YAML)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted config key, e.g. --set train.lr=1e-3 (repeatable)")
    run.add_argument("--out", help="run directory (default runs/<config name>-<timestamp>)")
    run.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last completed round; with --set, "
                     "change settings that may change mid-run (learning rates, schedule, rounds, eval cadence)")
    rep = sub.add_parser("report", help="plots and an HTML page comparing run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", required=True, metavar="REPORT_DIR")
    rep.add_argument("--target", metavar="METRIC=VALUE", help="time-to-target column, e.g. eval/accuracy=0.8")
    cmp = sub.add_parser("compare", help="run a sweep of configs with shared seeds and report them",
                         description="Run every config of a sweep file (base + set + runs x grid), then write plots, "
                                     "an HTML page, summary.csv and a time-to-target table to --out.")
    cmp.add_argument("sweep", metavar="SWEEP.yaml")
    cmp.add_argument("--out", required=True, metavar="DIR")
    cmp.add_argument("--target", metavar="METRIC=VALUE", help="e.g. eval/accuracy=0.8")
    cmp.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="runs at once, each in its own process with cpu_count/N threads (default 1: one after another)")
    _deploy_parser(sub)
    return p


def _deploy_parser(sub) -> None:
    dep = sub.add_parser("deploy", help="run on real machines: data owners over TLS on Flower's Deployment Runtime (docs/deploy.md)")
    ds = dep.add_subparsers(dest="deploy_command", required=True)
    keys = ds.add_parser("keys", help="make the CA, the server's TLS certificate and one key pair per data owner")
    keys.add_argument("out", metavar="DIR")
    keys.add_argument("--clients", type=int, required=True, metavar="N")
    keys.add_argument("--host", action="append", default=[], metavar="HOST",
                      help="a name or IP address the owners reach the server at (repeatable; default 127.0.0.1 and localhost)")
    split = ds.add_parser("split-data", help="cut a config's data set into one folder per data owner (as colora run partitions it) "
                                             "and one for the server's evaluation")
    split.add_argument("config")
    split.add_argument("out", metavar="DIR")
    split.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    srv = ds.add_parser("server", help="serve a run: Flower SuperLink with TLS and owner authentication, then colora's rounds")
    srv.add_argument("config", nargs="?")
    srv.add_argument("--credentials", required=True, metavar="DIR", help="the folder of colora deploy keys (ca.crt, server.pem, server.key)")
    srv.add_argument("--owner-keys", nargs="+", required=True, metavar="PUB", help="the registered owners' public keys (client_K.pub)")
    srv.add_argument("--data", required=True, metavar="DIR", help="the server's evaluation data folder (colora deploy split-data's server/)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=9092)
    srv.add_argument("--out", help="run directory (default runs/<config name>-<timestamp>)")
    srv.add_argument("--resume", metavar="DIR", help="continue a deployed run from its last completed round")
    srv.add_argument("--join-timeout", type=float, default=600.0, metavar="S", help="seconds to wait for every owner to join (default 600)")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cli = ds.add_parser("client", help="join a deployed run as a data owner, with this machine's own data folder")
    cli.add_argument("config")
    cli.add_argument("--data", required=True, metavar="DIR", help="this owner's data folder (its rows only)")
    cli.add_argument("--server", required=True, metavar="HOST:PORT")
    cli.add_argument("--ca", required=True, metavar="CA.crt", help="the deployment's CA certificate")
    cli.add_argument("--key", required=True, metavar="KEY", help="this owner's private key (client_K of colora deploy keys)")
    cli.add_argument("--client", type=int, metavar="K", help="the client id (default: the one written in the data folder)")
    cli.add_argument("--join-timeout", type=float, default=120.0, metavar="S",
                     help="seconds to keep trying while the server refuses or does not answer (default 120)")
    cli.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _deploy(args) -> int:
    from .config import load_config

    if args.deploy_command == "keys":
        from .deploy.pki import make_credentials

        if args.clients < 1:
            raise ColoraError(f"--clients {args.clients}: needs at least 1")
        make_credentials(Path(args.out), args.clients, args.host or ["127.0.0.1", "localhost"])
        print(f"credentials: {args.out} (give each owner ca.crt and its own client_K; keep ca.key and server.key on the server)")
        return 0
    if args.deploy_command == "split-data":
        from .deploy.partition import split_data

        folders = split_data(load_config(args.config, args.overrides), Path(args.out))
        print(f"data folders: {args.out}/server and {len(folders)} owners' {args.out}/client_K")
        return 0
    if args.deploy_command == "server":
        from .deploy.launch import run_server

        if bool(args.config) == bool(args.resume) or (args.resume and args.out):
            raise ColoraError("colora deploy server takes a CONFIG (with --out) or --resume DIR, not both")
        run_dir = run_server(args.config, args.overrides, args.out, Path(args.resume) if args.resume else None,
                             Path(args.credentials), [Path(k) for k in args.owner_keys], args.host, args.port, Path(args.data),
                             args.join_timeout)
        print(f"run directory: {run_dir}")
        return 0
    from .deploy.owner import run_owner

    cfg = load_config(args.config, [*args.overrides, f"data.path={Path(args.data).resolve()}"])
    return run_owner(cfg, args.server, Path(args.ca), Path(args.key), args.client, args.join_timeout)


def _run(args) -> int:
    if args.resume:
        if args.config or args.out:
            raise ColoraError("--resume DIR takes no config file or --out: the run directory's config.yaml is used "
                              "(--set changes the settings that may change mid-run)")
        from .experiment import run_experiment
        from .rundir import resume_config

        run_dir = Path(args.resume)
        cfg, changed = resume_config(run_dir, args.overrides)
        run_experiment(cfg, resume=run_dir, changed=changed)
    else:
        if not args.config:
            raise ColoraError("colora run needs a CONFIG.yaml (or --resume DIR)")
        cfg = load_config(args.config, args.overrides)  # a bad config answers before torch is imported
        from .experiment import run_experiment

        run_dir = run_experiment(cfg, out=args.out)
    print(f"run directory: {run_dir}")
    return 0


def _report(args) -> int:
    from .report import parse_target, write_report

    target = parse_target(args.target) if args.target else None
    html = write_report([Path(r) for r in args.runs], Path(args.out), target=target)
    print(f"report: {html}")
    return 0


def _compare(args) -> int:
    from .compare import check_sweep, format_table, load_sweep, run_sweep
    from .report import load_run, main_metric, parse_target, seed_summary, time_to_target, write_report

    target = parse_target(args.target) if args.target else None
    if args.jobs < 1:
        raise ColoraError(f"--jobs {args.jobs}: needs at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ColoraError(f"--out {out}: is a file, not a folder; give a new or empty folder")
    runs = load_sweep(args.sweep)  # every config validated ...
    check_sweep(runs, out)  # ... and every entry's whole setup built, before the first run
    result = run_sweep(runs, out, args.jobs)
    if not result.finished:
        print(f"colora: error: all {len(runs)} sweep runs failed, no report written: {result.failed[0]}", file=sys.stderr)
        return EXIT_RUNS_FAILED
    html = write_report(result.finished, out, target=target)
    loaded = [load_run(d) for d in result.finished]
    metric = main_metric(loaded)
    rows = []
    for run in loaded:
        s = run.summary
        row = {"run": run.dir.name, metric: f"{s['final'].get(metric, float('nan')):.4f}",
               "best": f"{s['best'].get(metric, float('nan')):.4f}",
               "MB up": f"{s['bytes_up'] / 1e6:.2f}", "MB down": f"{s['bytes_down'] / 1e6:.2f}",
               "sim time s": f"{s['sim_time_s']:.1f}", "wall s": f"{s['wall_time_s']:.1f}"}
        if target:
            hit = time_to_target(run, *target)["sim_time_s"]
            row[f"sim s to {target[1]:g}"] = "not reached" if hit is None else f"{hit:.1f}"
        rows.append(row)
    print(format_table(rows))
    over_seeds = seed_summary(loaded, metric)
    if over_seeds:
        print(f"\nover seeds ({metric}, final; std over seeds, n - 1):")
        print(format_table([{"setting": r["setting"], "seeds": r["seeds"], "mean ± std": f"{r['final_mean']:.4f} ± {r['final_std']:.4f}",
                             "min": f"{r['final_min']:.4f}", "max": f"{r['final_max']:.4f}"} for r in over_seeds]))
    print(f"report: {html}")
    if result.failed:
        print(f"colora: error: {len(result.failed)} of {len(runs)} sweep runs failed (the report covers the others; "
              f"rerun the same command to retry them): {'; '.join(result.failed)}"[:2000], file=sys.stderr)
        return EXIT_RUNS_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``colora`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    # peft calls a transformers API that transformers deprecates: noise for users, not actionable.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        return {"run": _run, "report": _report, "compare": _compare, "deploy": _deploy}[args.command](args)
    except ColoraError as exc:
        message = " ".join(str(exc).split())
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        print(f"colora: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("colora: interrupted; completed rounds are checkpointed (colora run --resume DIR continues)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
