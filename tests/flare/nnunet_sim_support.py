"""Test-only FLARE filter for the FednnU-Net simulator tests, shipped to the simulated sites as custom code.

It records, at the site's boundary (after the project's own result filters), everything a site sends: the
fingerprint, the plan digest it answers with, and every update with its sample count and plan digest."""

import json
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import MetaKey
from nvflare.apis.dxo_filter import DXOFilter

FROZEN_FINGERPRINT = "fedfms_frozen_fingerprint"


class RecordEverythingSent(DXOFilter):
    def __init__(self, out_dir):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.out_dir = Path(out_dir)

    def process_dxo(self, dxo, shareable, fl_ctx):
        site = fl_ctx.get_identity_name()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rnd = shareable.get_header("current_round")
        kind = getattr(dxo.data_kind, "value", dxo.data_kind)
        if kind == "WEIGHTS":
            name = f"{site}_r{rnd}" if rnd is not None else f"{site}_submit"
            np.savez(self.out_dir / f"{name}.npz", **dxo.data)
            meta = {"num_samples": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
                    "plan_digest": dxo.get_meta_prop(FROZEN_FINGERPRINT),
                    "initial_metrics": dxo.get_meta_prop(MetaKey.INITIAL_METRICS)}
            (self.out_dir / f"{name}.json").write_text(json.dumps(meta))
        else:  # the planning answers: the fingerprint, the plan digest
            (self.out_dir / f"{site}_{kind}.json").write_text(json.dumps(dxo.data))
        return dxo
