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
    # the user's --threads wins, and at least one site always runs
    assert choose_placement(16, "tiny", "fedmsa", device="cpu", free_host=100, threads=3).threads == 3
    assert choose_placement(4, "vit_h", "fedsam", device="cpu", free_host=1).threads == 1
