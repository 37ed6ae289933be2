"""A full-size job through a POC federation on this machine (random init, 1024-px samples): peak memory of the
server and site processes, and the bytes and seconds of each model transfer.

    python bench/bench_fullsize.py                                  # fedsam_l (ViT-L, 1.2 GB a way), 1 site, 1 round
    python bench/bench_fullsize.py --variant fedmsa --sites 2 --threads 1
    python bench/bench_fullsize.py --json out.json                  # also the figures as JSON (the fullsize tier uses it)

Peaks: every 0.5 s the resident memory of each FLARE process of the federation (server, its job process, each
site's client and job process) is read (a sampled peak), and the job processes' own peaks (the kernel's
``ru_maxrss``) come from the run record, with the per-site figure of the memory table ``fedfms simulate`` plans with
(``custom/fedfms/assets/site_memory.json``) beside it. Transfers: from the run record; the task's way to the site is
the server's hand-out to the site's executor (one clock on one machine), the result's upload is timed at the site.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROLES = (("nvflare.private.fed.app.server.runner_process", "server job"),
         ("nvflare.private.fed.app.server.server_train", "server"),
         ("nvflare.private.fed.app.client.worker_process", "job"),
         ("nvflare.private.fed.app.client.client_train", "client"))
SAM_VARIANT = {"fedsam": "vit_b", "fedmsa": "vit_b", "fedsam_l": "vit_l", "fedmsa_l": "vit_l"}


class PeakSampler(threading.Thread):
    """The largest resident memory seen per FLARE process role ("server", "server job", "site-1 client", ...)."""

    def __init__(self, workspace: Path, sites: list[str], every: float = 0.5):
        super().__init__(daemon=True)
        self.workspace, self.sites, self.every = str(workspace), sites, every
        self.peaks: dict[str, float] = {}
        self._halt = threading.Event()

    def role(self, cmd: str) -> str | None:
        if self.workspace not in cmd:
            return None
        for marker, name in ROLES:
            if marker in cmd:
                if name in ("server", "server job"):
                    return name
                site = next((s for s in self.sites if f"/{s}" in cmd or f" {s} " in cmd or f"={s}" in cmd), "site")
                return f"{site} {name}"
        return None

    def run(self):
        while not self._halt.wait(self.every):
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    name = self.role(" ".join(proc.info["cmdline"] or []))
                    if name and proc.info["memory_info"]:
                        self.peaks[name] = max(self.peaks.get(name, 0.0), proc.info["memory_info"].rss / 1e9)
                except (psutil.Error, TypeError):
                    continue

    def stop(self):
        self._halt.set()
        self.join(timeout=5)


def run(variant: str, sites: list[str], threads: int | None, volumes: int, slices: int, workdir: Path) -> dict:
    from fedfms.data.synthetic import make_disc_site
    from fedfms.deploy import poc, runtime as rt
    from fedfms.flare.fed_job import write_job

    for i, site in enumerate(sites):
        make_disc_site(workdir / "data" / site, site=site, num_volumes=volumes, slices_per_volume=slices, size=128,
                       image_size=1024, mask_size=256, seed=i)
    # the job names its sites: a site-less job needs 2 connected (min_clients), which a one-site POC never has
    job = write_job(variant, workdir / "job", num_rounds=1, model={"pretrained": False}, sites=sites, overwrite=True)
    ws = workdir / "poc"
    poc.prepare(str(ws), sites, site_data={s: workdir / "data" / s for s in sites}, threads=threads)
    sampler = PeakSampler(ws, sites)
    started = time.monotonic()
    try:
        poc.start(str(ws), timeout=600)
        sampler.start()
        job_id = poc.submit(str(ws), str(job))
        meta = poc.wait(str(ws), job_id, timeout=3000)
        result = poc.download(str(ws), job_id, str(workdir / "results"))
    finally:
        sampler.stop()
        state = poc.load_state(str(ws))
        rt.kill_all(state.get("pids", {}).values(), paths=[state["poc_workspace"]])
    record = json.loads(next(Path(result).rglob("fedfms_run.json")).read_text())
    return {"variant": variant, "sites": sites, "status": meta.get("status"), "wall_s": round(time.monotonic() - started, 1),
            "record": record, "sampled_peak_gb": {k: round(v, 2) for k, v in sorted(sampler.peaks.items())},
            "result": str(result)}


def report(out: dict) -> str:
    from fedfms.capacity import GB_PER_GIB, site_host_memory

    record = out["record"]
    variant = SAM_VARIANT.get(out["variant"], "vit_b")
    mode = "fedmsa" if "msa" in out["variant"] else "fedsam"
    lines = [f"{out['variant']}, {len(out['sites'])} site(s), 1 round through POC: {out['status']}, record "
             f"{record['status']}, {out['wall_s']:.0f} s from start to download; round "
             f"{[r['seconds'] for r in record['rounds']]} s", "",
             "| process | peak RSS GB (sampled every 0.5 s) | peak GB (kernel, run record) | table GB |", "|---|---|---|---|"]
    table = site_host_memory(variant, mode, "cpu", 1)
    for name, peak in out["sampled_peak_gb"].items():
        kernel, expected = "", ""
        if name == "server job":
            kernel = record.get("server_peak_rss_gb", "")
        site = name.rsplit(" ", 1)[0]
        if name.endswith(" job") and site in record.get("peak_rss_gb", {}):
            kernel = record["peak_rss_gb"][site]
            expected = f"{table.gib * GB_PER_GIB:.2f} ({table.how})"
        lines.append(f"| {name} | {peak:.2f} | {kernel} | {expected} |")
    lines += ["", "| round | site | task MB | task s | MB/s | result MB | upload s | MB/s |", "|---|---|---|---|---|---|---|---|"]
    for t in sorted(record.get("transfers", {}).values(), key=lambda t: (t["round"], t["site"])):
        def rate(mb, s):
            return f"{mb / s:.0f}" if mb and s else "-"
        lines.append(f"| {t['round']} | {t['site']} | {t.get('down_mb', '-')} | {t.get('down_s', '-')} | "
                     f"{rate(t.get('down_mb'), t.get('down_s'))} | {t.get('up_mb', '-')} | {t.get('up_s', '-')} | "
                     f"{rate(t.get('up_mb'), t.get('up_s'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="fedsam_l")
    ap.add_argument("--sites", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per site (the sites share the cores)")
    ap.add_argument("--volumes", type=int, default=2, help="volumes per site (the jobs' split validates on one)")
    ap.add_argument("--slices", type=int, default=1, help="samples per volume")
    ap.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    sites = [f"site-{i + 1}" for i in range(args.sites)]
    with tempfile.TemporaryDirectory(prefix="fedfms_fullsize_") as tmp:
        workdir = Path(args.workdir or tmp)
        out = run(args.variant, sites, args.threads, args.volumes, args.slices, workdir)
        print(report(out))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0 if out["status"] == "FINISHED:COMPLETED" and out["record"]["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
