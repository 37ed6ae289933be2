"""``fedfms simulate``: run a job in FLARE's simulator, with one truthful verdict."""

from __future__ import annotations

from pathlib import Path

from fedfms.errors import FedFMSError


def _cmd_simulate(args) -> int:
    from fedfms.flare.simulate import report_outcome, simulate

    clients = [c for c in args.clients.split(",") if c]
    gpus = None
    if args.gpu:
        try:
            gpus = sorted({int(g) for g in args.gpu.split(",") if g.strip()})
        except ValueError:
            raise FedFMSError(f"--gpu: {args.gpu!r} is not a list of GPU ids; expected e.g. 0 or 0,1") from None
    outcome = simulate(args.job, args.workspace, clients, data_root=args.data_root, threads=args.threads,
                       quiet=not args.verbose, gpus=gpus)
    return report_outcome(Path(args.workspace), outcome)


def add_parsers(sub) -> None:
    p = sub.add_parser("simulate", help="run a job in FLARE's simulator")
    p.add_argument("job")
    p.add_argument("--workspace", required=True)
    p.add_argument("--clients", default="site-1,site-2", help="comma-separated site names")
    p.add_argument("--data-root", help="folder holding one prepared site folder per client name")
    p.add_argument("--threads", type=int, help="sites that train at the same time (default: as many as fit in free "
                                                 "GPU or host memory; the others wait their turn each round)")
    p.add_argument("--gpu", help="GPU ids to spread the simulated sites over, e.g. 0 or 0,1 (default: every visible GPU)")
    p.add_argument("--verbose", action="store_true", help="console: FLARE's full INFO log (default: one line per round, "
                                                          "warnings and errors; the full logs are always in the workspace)")
    p.add_argument("--quiet", action="store_true", help="the default (kept for scripts written for older versions)")
    p.set_defaults(func=_cmd_simulate)
