"""How many simulated sites train at once (fedfms.capacity), without a GPU: the free memory is given."""

from fedfms.capacity import choose_placement, site_gpu_gib


def test_six_vit_b_sites_on_one_80_gb_gpu():
    # FedMSA fits all six (about 10 GiB each); FedSAM (about 14.5 GiB each) runs four at a time
    msa = choose_placement(6, "vit_b", "fedmsa", free_host=100, free_gpu={0: 78}, gpus=[0])
    assert msa.threads == 6 and msa.gpu_arg == "0,0,0,0,0,0" and msa.simulator_threads == 1
    assert "all at once" in msa.reason
    sam = choose_placement(6, "vit_b", "fedsam", free_host=100, free_gpu={0: 78}, gpus=[0])
    assert sam.threads == 4 and sam.gpu_arg == "0,0,0,0" and "4 at a time" in sam.reason
    assert sam.threads * site_gpu_gib("vit_b", "fedsam") <= 78
    # a 24 GB card trains one FedSAM site at a time, or several with activation checkpointing
    assert choose_placement(2, "vit_b", "fedsam", free_host=100, free_gpu={0: 24}, gpus=[0]).threads == 1
    assert choose_placement(6, "vit_b", "fedsam", checkpointing=True, free_host=100, free_gpu={0: 24}, gpus=[0]).threads == 4


def test_sites_spread_over_gpus_and_host_memory_limits_cpu_runs():
    two = choose_placement(6, "vit_l", "fedmsa", free_host=200, free_gpu={0: 78, 1: 40}, gpus=[0, 1])
    assert two.per_gpu == {0: 2, 1: 1} and two.gpu_arg == "0,0,1"
    cpu = choose_placement(40, "tiny", "fedmsa", device="cpu", free_host=22)
    assert cpu.gpus is None and 10 <= cpu.threads < 40 and "wait their turn" in cpu.reason
    assert choose_placement(16, "tiny", "fedmsa", device="cpu", free_host=100).threads == 16
    # the user's --threads wins when it fits
    assert choose_placement(16, "tiny", "fedmsa", device="cpu", free_host=100, threads=3).threads == 3


# measured rows as bench/bench_memory.py writes them (GB): batch 1 and 2, a site's shared pages 0.4 GB
ROWS = ({"variant": "vit_b", "mode": "fedmsa", "device": "cpu", "batch": 1, "checkpointing": False, "peak_rss_gb": 5.0,
         "shared_gb": 0.4},
        {"variant": "vit_b", "mode": "fedmsa", "device": "cpu", "batch": 2, "checkpointing": False, "peak_rss_gb": 8.0,
         "shared_gb": 0.4},
        {"variant": "vit_b", "mode": "fedmsa", "device": "cpu", "batch": 1, "checkpointing": True, "peak_rss_gb": 3.0,
         "shared_gb": 0.4})


def test_site_memory_comes_from_the_measured_table_and_grows_with_the_batch(monkeypatch):
    from fedfms import capacity

    monkeypatch.setattr(capacity, "memory_rows", lambda *a: ROWS)
    two = capacity.site_host_memory("vit_b", "fedmsa", "cpu", 2)
    assert two.how == "measured" and abs(two.gib * capacity.GB_PER_GIB - 8.0) < 1e-9
    six = capacity.site_host_memory("vit_b", "fedmsa", "cpu", 6)  # 5 + 3 GB per extra sample
    assert six.how == "extrapolated from batch 1-2" and abs(six.gib * capacity.GB_PER_GIB - 20.0) < 1e-9
    assert capacity.site_host_memory("vit_b", "fedmsa", "cpu", 1, checkpointing=True).how == "measured"
    assert capacity.site_host_memory("vit_l", "fedsam", "cpu", 1).how == "estimated"  # no row: the estimate, said so


def test_a_plan_that_cannot_fit_is_refused_with_what_would(monkeypatch):
    from fedfms import capacity

    monkeypatch.setattr(capacity, "memory_rows", lambda *a: ROWS)
    # 2 sites at batch 2 need 4.8 (server) + 8 + 7.6 GB; 17 GB free (14.5 usable): one at a time fits, both do not
    both = choose_placement(2, "vit_b", "fedmsa", device="cpu", batch_size=2, free_host=17 / capacity.GB_PER_GIB, threads=2)
    assert not both.fits and both.reason.startswith("2 vit_b FedMSA sites at batch 2 on CPU need ~20 GB (8.0 GB each, measured")
    assert "run them one at a time with --threads 1" in both.reason and '"batch_size": 1' in both.reason
    auto = choose_placement(2, "vit_b", "fedmsa", device="cpu", batch_size=2, free_host=17 / capacity.GB_PER_GIB)
    assert auto.fits and auto.threads == 1 and "1 at a time" in auto.reason
    none = choose_placement(2, "vit_b", "fedmsa", device="cpu", batch_size=6, free_host=17 / capacity.GB_PER_GIB)
    assert not none.fits and none.reason.startswith("one vit_b FedMSA site at batch 6 on CPU needs ~")
    assert "activation checkpointing" in none.reason and "--threads 1" not in none.reason


def test_simulate_refuses_before_anything_starts(monkeypatch, tmp_path):
    from fedfms import capacity
    from fedfms.cli import main
    from fedfms.flare.fed_job import write_job

    monkeypatch.setattr(capacity, "memory_rows", lambda *a: ROWS)
    monkeypatch.setattr(capacity, "free_host_gib", lambda: 10.0)
    job = write_job("fedmsa", tmp_path / "job", model={"pretrained": False})
    assert main(["simulate", str(job), "--workspace", str(tmp_path / "ws"), "--clients", "a,b", "--threads", "2"]) == 2
    assert not (tmp_path / "ws").exists()


def test_nnunet_sites_are_planned_with_their_own_figures_not_a_vit_b_guess():
    # CI refused the fednnunet_tiny simulation (3 sites, --threads 3) with 15 GB free: nnunet had no figures, so
    # each site counted as a ViT-B (3.2 GB) plus a ViT-B server (4.8 GB), at the job's "batch 6"
    from fedfms import capacity

    three = choose_placement(3, "nnunet", "fedsam", device="cpu", batch_size=6, free_host=15 / capacity.GB_PER_GIB, threads=3)
    assert three.fits and three.threads == 3
    short = choose_placement(3, "nnunet", "fedsam", device="cpu", batch_size=6, free_host=5 / capacity.GB_PER_GIB, threads=3)
    # its batch and patch come from the federated plan: no batch to name, no --train batch_size to suggest
    assert not short.fits and "plan's batch" in short.reason and "batch 6" not in short.reason
    assert "batch_size" not in short.reason and "--threads 1" in short.reason
    assert site_gpu_gib("nnunet", "fedsam", batch_size=1) == site_gpu_gib("nnunet", "fedsam", batch_size=12)


def test_sites_forked_from_one_process_count_its_pages_once():
    # 16 tiny sites: a plain process each holds its own imports (1.0 GB, 0.4 GB of it libraries); forked from the
    # fork server (0.8 GB after its imports) a site adds ~0.2 GB (measured: tests/README.md, bench/bench_sim_sites.py)
    from fedfms import capacity

    free = 10 / capacity.GB_PER_GIB
    plain = choose_placement(16, "tiny", "fedmsa", device="cpu", free_host=free)
    assert plain.fits and plain.threads < 16 and "wait their turn" in plain.reason
    forked = choose_placement(16, "tiny", "fedmsa", device="cpu", free_host=free, forked_from_gib=0.79 / capacity.GB_PER_GIB)
    assert forked.fits and forked.threads == 16 and "shared by the sites forked" in forked.reason
    # asked for all sixteen at once: refused plainly, fits forked
    assert not choose_placement(16, "tiny", "fedmsa", device="cpu", free_host=free, threads=16).fits
    assert choose_placement(16, "tiny", "fedmsa", device="cpu", free_host=free, threads=16,
                            forked_from_gib=0.79 / capacity.GB_PER_GIB).fits
    # the shipped table carries the fork server's measured figure
    assert 0.3 < capacity.fork_server_gib() * capacity.GB_PER_GIB < 2.0


def test_simulate_forks_its_sites_only_when_that_lets_every_site_run_at_once(monkeypatch, tmp_path):
    from fedfms import capacity
    from fedfms.flare.fed_job import write_job
    from fedfms.flare.simulate import site_placement

    job = write_job("fedmsa_tiny", tmp_path / "job")
    sites = [f"s{i}" for i in range(16)]
    monkeypatch.setattr(capacity, "free_host_gib", lambda: 10 / capacity.GB_PER_GIB)
    placement, forked = site_placement(job, sites)  # plain processes would take turns; forked, all fit at once
    assert forked and placement.threads == 16
    placement, forked = site_placement(job, sites, threads=4)  # the user's turns: sites restart, so started plainly
    assert not forked and placement.threads == 4
    monkeypatch.setattr(capacity, "free_host_gib", lambda: 6 / capacity.GB_PER_GIB)
    placement, forked = site_placement(job, sites)  # not even forked do all fit: turns, plain
    assert not forked and placement.fits and placement.threads < 16
    monkeypatch.setattr(capacity, "free_host_gib", lambda: 10 / capacity.GB_PER_GIB)
    monkeypatch.setenv("FEDFMS_SITE_FORKSERVER", "0")
    placement, forked = site_placement(job, sites)
    assert not forked and placement.threads < 16
