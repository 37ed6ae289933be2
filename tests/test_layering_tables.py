"""The flavour registry and the Table 1/Table 2 generators are ML core: importing them (and building Table 2) must not
import nvflare or the project's FLARE layer (fedfms.flare). tests/test_layering.py checks their imports statically too."""

import subprocess
import sys

MODULES = ["fedfms.flavours", "fedfms.reporting.tables", "fedfms.cli.tables", "fedfms.evaluation.scoring", "fedfms.training.metrics"]


def test_flavours_and_tables_do_not_import_nvflare():
    code = ";".join([f"import {m}" for m in MODULES] + [
        "import fedfms.reporting.tables as t", "t.build_table2(['tiny'], gpu=False)",
        "import sys", "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nvflare' or m.startswith('fedfms.flare')))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == "[]", f"FLARE was imported: {out}"
