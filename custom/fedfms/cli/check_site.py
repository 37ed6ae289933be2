"""``fedfms check-site``: the pre-flight check of one site for one job (``fedfms.site_check``)."""

from __future__ import annotations

import sys


def _cmd_check_site(args) -> int:
    from fedfms.site_check import check_site, format_report

    report = check_site(args.job, args.data_dir, args.checkpoint, args.site, measure_speed=not args.no_speed)
    print(format_report(report))
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("check-site", help="pre-flight: can this site run this job? (data, checkpoint, device, its own "
                                          "seconds per sample, fingerprint)")
    p.add_argument("--job", required=True, help="the job folder the federation will run, e.g. jobs/fedmsa")
    p.add_argument("--data-dir", required=True, help="this site's prepared data folder")
    p.add_argument("--checkpoint", help="this site's SAM checkpoint (default: the job's, $VARS expanded)")
    p.add_argument("--site", default="site", help="this site's FLARE client name (for {site_name} in paths)")
    p.add_argument("--no-speed", action="store_true", help="skip the one training step that measures this site's "
                                                            "seconds per sample and peak memory on its device")
    p.set_defaults(func=_cmd_check_site)
