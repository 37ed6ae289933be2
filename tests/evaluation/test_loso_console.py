"""What a LOSO fold prints while its federation runs: one line per round by default, FLARE's whole log with verbose.
(The simulator child process is replaced by a fake printing what `fedfms simulate` prints.)"""

from __future__ import annotations

import io

import pytest

from fedfms.flare import loso_runner

CHILD_OUTPUT = [
    "2026-11-27 00:00:00,000 - SimulatorRunner - INFO - Create the simulate clients.\n",
    "round 1/2  a loss 0.500 Dice 0.600 | b loss 0.400 Dice 0.700 | 1.2 s\n",
    "WARNING nvflare.x: something FLARE wants seen\n",
    "round 2/2  a loss 0.300 Dice 0.800 | b loss 0.200 Dice 0.850 | 1.1 s\n",
]


class FakeChild:
    commands: list[list[str]] = []

    def __init__(self, cmd, **kwargs):
        FakeChild.commands.append(cmd)
        self.stdout = io.StringIO("".join(CHILD_OUTPUT))
        self.pid = -1

    def wait(self):
        return 0


@pytest.mark.parametrize("verbose", [False, True])
def test_fold_console_is_one_line_per_round_unless_verbose(tmp_path, monkeypatch, verbose):
    monkeypatch.setattr(loso_runner, "_start_fold_process", FakeChild)
    said: list[str] = []
    rc = loso_runner.simulate(tmp_path / "job", tmp_path / "ws", ["a", "b"], tmp_path / "data", tmp_path / "simulator.log",
                              say=said.append, verbose=verbose)
    assert rc == 0
    assert ("--verbose" if verbose else "--quiet") in FakeChild.commands[-1]
    expected = CHILD_OUTPUT if verbose else [CHILD_OUTPUT[1], CHILD_OUTPUT[3]]
    assert said == [f"  {line.rstrip()}" for line in expected]
    assert (tmp_path / "simulator.log").read_text() == "".join(CHILD_OUTPUT)  # the log file always gets everything
