"""What the project reports from finished runs: ``run_report`` (one federated run: the per-site table, curves and
figures, `fedfms report`) and ``tables`` (the paper's Table 1 and Table 2 from many LOSO runs, `fedfms table1/2`).
FLARE-free: they read the run folders and records, never FLARE. The drawing of one prediction is
``fedfms.overlays``, below every layer, since ``fedfms predict --overlay`` draws it too."""
