"""Build a FedFMS job with FLARE's Job API, then export it or run it in FLARE's simulator (as NVFlare's examples'
``job.py``). The JSON jobs beside this file are what ``export`` writes for each variant (``make jobs``).

    python jobs/job.py fedmsa_tiny --export /tmp/nvflare/jobs
    python jobs/job.py fedmsa_tiny --simulate /tmp/nvflare/ws --data-root demo_out/sites \
        --sites site-1 site-2 site-3 --rounds 2 [--gpu 0,1]

``--gpu 0,1`` places the simulated sites on those GPUs (FLARE's simulator ``-gpu``). ``fedfms simulate`` runs the
same job with pre-flight checks, a one-line-per-round console and a truthful exit code; this script is the plain
FLARE way.
"""

import argparse
import os
import sys

from fedfms.flare.jobs import VARIANTS, build
from fedfms.flare.simulate import prepare_sim_workspace


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--export", metavar="JOB_ROOT", help="write the job folder JOB_ROOT/<variant>")
    parser.add_argument("--simulate", metavar="WORKSPACE", help="run the job in FLARE's simulator")
    parser.add_argument("--data-root", help="folder with one prepared folder per site (sets FEDFMS_DATA_ROOT)")
    parser.add_argument("--sites", nargs="+", help="the sites' names (default: every folder under --data-root)")
    parser.add_argument("--rounds", type=int, help="number of rounds (default: the variant's)")
    parser.add_argument("--gpu", help="GPU ids for the simulated sites, e.g. 0,1")
    parser.add_argument("--threads", type=int, help="sites trained at once (default: all)")
    args = parser.parse_args(argv)
    if not (args.export or args.simulate):
        parser.error("nothing to do: give --export JOB_ROOT and/or --simulate WORKSPACE")
    sites = args.sites
    if args.simulate:
        if not args.data_root or not os.path.isdir(args.data_root):
            parser.error(f"--data-root is {args.data_root!r}; expected the folder with one prepared folder per site")
        sites = sites or sorted(d for d in os.listdir(args.data_root) if os.path.isdir(os.path.join(args.data_root, d)))
        if not sites:
            parser.error(f"{args.data_root}: no site folders; expected one prepared folder per site")
        os.environ["FEDFMS_DATA_ROOT"] = os.path.abspath(args.data_root)
    job = build(args.variant, sites=sites, num_rounds=args.rounds)
    if args.export:
        job.export_job(args.export)
        print(f"wrote {os.path.join(args.export, job.name)}")
    if args.simulate:
        # the simulated sites get the class allow-list a hospital's local/resources.json holds for these jobs
        workspace = prepare_sim_workspace(os.path.abspath(args.simulate))
        return job.simulator_run(str(workspace), clients=sites, threads=args.threads, gpu=args.gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
