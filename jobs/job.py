"""Build a FedFMS job as a FLARE recipe (``fedfms.flare.recipe.FedFMSRecipe``), then export it or run it in FLARE's
``SimEnv`` (as NVFlare's examples' ``job.py``). The JSON jobs beside this file are what ``export`` writes for each
variant (``make jobs``).

    python jobs/job.py fedmsa_tiny --export /tmp/nvflare/jobs
    python jobs/job.py fedmsa_tiny --simulate /tmp/nvflare/sim --data-root demo_out/sites \
        --sites site-1 site-2 site-3 --rounds 2 [--gpu 0,1]

``--export`` also takes FLARE's recipe form, ``--export --export-dir DIR`` (default ``./fl_job``). ``--simulate ROOT``
runs the job in FLARE's ``SimEnv`` with ROOT as its workspace root: the run is in ``ROOT/<variant>`` (server results in
``ROOT/<variant>/server/simulate_job``). ``--gpu 0,1`` places the simulated sites on those GPUs. The exit code is the
run record's: 0 when every round averaged every site, 3 when some site missed a round, 1 when the run stopped.
``fedfms simulate`` runs the same job with pre-flight checks and a one-line-per-round console; this script is the
plain FLARE way.
"""

import argparse
import os
import sys
import warnings

from fedfms.flare.jobs import VARIANTS

DEFAULT_EXPORT_DIR = "./fl_job"  # FLARE's recipe default (nvflare.recipe.spec.DEFAULT_EXPORT_DIR)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--export", nargs="?", const=True, metavar="JOB_ROOT",
                        help=f"write the job folder JOB_ROOT/<variant> (no JOB_ROOT: --export-dir, or {DEFAULT_EXPORT_DIR})")
    parser.add_argument("--export-dir", help="FLARE's recipe form of the export folder")
    parser.add_argument("--simulate", metavar="WORKSPACE_ROOT", help="run the job in FLARE's SimEnv")
    parser.add_argument("--data-root", help="folder with one prepared folder per site (sets FEDFMS_DATA_ROOT)")
    parser.add_argument("--sites", nargs="+", help="the sites' names (default: every folder under --data-root)")
    parser.add_argument("--rounds", type=int, help="number of rounds (default: the variant's)")
    parser.add_argument("--gpu", help="GPU ids for the simulated sites, e.g. 0,1")
    parser.add_argument("--threads", type=int, help="sites trained at once (default: all)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.export_dir and not args.export:
        parser.error("--export-dir names where --export writes; give --export too")
    if not (args.export or args.simulate):
        parser.error("nothing to do: give --export JOB_ROOT and/or --simulate WORKSPACE_ROOT")
    sites = args.sites
    if args.simulate:
        if not args.data_root or not os.path.isdir(args.data_root):
            parser.error(f"--data-root is {args.data_root!r}; expected the folder with one prepared folder per site")
        sites = sites or sorted(d for d in os.listdir(args.data_root) if os.path.isdir(os.path.join(args.data_root, d)))
        if not sites:
            parser.error(f"{args.data_root}: no site folders; expected one prepared folder per site")

    # Imported once the arguments are parsed: FLARE's recipe module takes --export / --export-dir out of sys.argv
    # when it is first imported (they are its own flags for Recipe.execute, which this script does not call).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NVFlare reserves")
        from nvflare.recipe import SimEnv

        from fedfms.flare.recipe import DATA_ROOT, FedFMSRecipe, run_outcome

    from fedfms.errors import FedFMSError

    try:
        recipe = FedFMSRecipe(args.variant, sites=sites, num_rounds=args.rounds)
        if args.export:
            root = args.export if isinstance(args.export, str) else (args.export_dir or DEFAULT_EXPORT_DIR)
            recipe.export(root)
            print(f"wrote {os.path.join(root, recipe.name)}")
        if args.simulate:
            env = SimEnv(clients=sites, num_threads=args.threads, gpu_config=args.gpu,
                         workspace_root=os.path.abspath(args.simulate), extra={DATA_ROOT: os.path.abspath(args.data_root)})
            outcome = run_outcome(recipe.run(env))
            print(outcome.summary or "no run record", file=sys.stdout if outcome.exit_code == 0 else sys.stderr)
            return outcome.exit_code
    except FedFMSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # SimEnv: the simulator itself failed (its logs are in the workspace)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
