"""The ``invardiff`` command: plan inspection and argument errors (demo runs need trained weights)."""

from __future__ import annotations

import json

import pytest
from support import official_plan_files

import invardiff
from invardiff.cli import main


def test_show_prints_a_reference_plan_as_json(capsys):
    path = official_plan_files("flux")[0]
    assert main(["show", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    plan = invardiff.load_plan(path)
    assert shown["sha256"] == plan.sha256 and shown["steps"] == 28
    assert shown["summary"]["ideal_speedup"] == plan.summary().ideal_speedup


def test_bad_plan_file_is_one_line_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "invardiff.cache-plan", "format_version": 1}')
    assert main(["show", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing field 'arch'" in err


def test_non_positive_counts_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--trajectories", "0"])
    assert exit_info.value.code == 2
    assert "must be positive" in capsys.readouterr().err
