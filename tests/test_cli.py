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


def undocumented(help_text: str) -> list[str]:
    """The options an argparse help lists without a description."""
    lines = help_text.split("options:\n", 1)[1].splitlines()
    missing = []
    for line, following in zip(lines, [*lines[1:], ""]):
        explained = "  " in line.strip() or (following.startswith(" " * 8) and following.strip())
        if line.startswith("  -") and not explained:
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("command", [[], ["demo"], ["calibrate"], ["show"]])
def test_help_has_no_markup_and_explains_every_option(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    assert "options:" in text and undocumented(text) == []
    if command == ["demo"]:
        for option in ("--trajectories N", "--out DIR", "--batch N", "--repeats N"):
            assert option in text


def test_undocumented_options_are_found():
    text = "options:\n  -h, --help  show this\n  --batch BATCH\n  --out OUT   where\n  --x X\n"
    assert undocumented(text) == ["--batch BATCH", "--x X"]


def test_show_prints_nested_fields_one_per_line(capsys):
    path = official_plan_files("dit")[0]
    assert main(["show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if "{" in line or "None" in line]  # no Python dicts
    target = lines.index("target:")
    assert lines[target + 1].split() == ["model_id:", "facebook/DiT-XL-2-256"]
    assert lines[target + 2].split() == ["revision:", "none"]
    assert "  steps:                 50" in lines[target + 1 :]


def test_render_nests_mappings_and_lists_for_people():
    from invardiff.display import render

    data = {"version": 2, "aliases": {}, "revision": None, "seeds": [900000, 900001],
            "lineage": {"workers": [{"host": "a", "pid": 1}, "raw"], "ok": True}}  # fmt: skip
    assert render(data).splitlines() == [
        "version:  2",
        "aliases:  none",
        "revision: none",
        "seeds:    900000, 900001",
        "lineage:",
        "  workers:",
        "    [1]",
        "      host: a",
        "      pid:  1",
        "    [2]",
        "      value: raw",
        "  ok:      true",
    ]


# ---- the command layer's conventions (no calibration runs: every case is refused first) ----
@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--guidance", "nan"], "'--guidance': 'nan' is not a finite number"),
     (["--guidance", "inf"], "'--guidance': 'inf' is not a finite number"),
     (["--trajectories", "x"], "'--trajectories': 'x' is not an integer"),
     (["--out", "/nonexistent-folder/plan.json"], "folder '/nonexistent-folder' does not exist"),
     (["--target-psnr", "30", "--min-psnr", "30"], "give --target-psnr (or its old spelling --min-psnr), not both")],
)  # fmt: skip
def test_calibrate_refuses_bad_input_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["calibrate", "demo"])
@pytest.mark.parametrize(
    ("new", "old", "value", "message"),
    [("--target-psnr", "--min-psnr", "-3", "must be a positive"),
     ("--target-psnr-p5", "--min-psnr-p5", "0", "must be a positive")],
)  # fmt: skip
def test_psnr_targets_take_the_new_and_the_deprecated_spelling(
    tmp_path, capsys, command, new, old, value, message
):
    """Both spellings reach the same target check, which names the flag given; the old one
    also warns, in one line, that it is deprecated."""
    out = ["--out", str(tmp_path / "plan.json")] if command == "calibrate" else []
    for flag in (new, old):
        with pytest.raises(SystemExit) as exit_info:
            main([command, *out, flag, value])
        err = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 2 and f"{flag} {message}" in err[-1]
        warnings = [line for line in err if "deprecated" in line]
        if flag == old:
            assert warnings == [(f"invardiff: warning: {old} is deprecated: it is spelled {new} "
                                 "(the --min-* flags are quality gates in invardiff-registry)")]  # fmt: skip
        else:
            assert warnings == [] and len(err) == 1
    with pytest.raises(SystemExit):
        main([command, *out, "--mode", "reference", new, "30"])
    assert "need mode='budget'" in capsys.readouterr().err


def test_help_names_the_targets_not_the_deprecated_spellings(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    assert "--target-psnr DB" in text and "--target-psnr-p5 DB" in text and "--json" in text
    assert "--min-psnr" not in text


def test_show_of_a_missing_file_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing.json"), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("invardiff: error: cannot read plan ")


def test_python_m_invardiff_runs_the_same_command(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = official_plan_files("flux")[0]
    result = subprocess.run([sys.executable, "-m", "invardiff", "show", str(path), "--json"],
                            cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sha256"] == invardiff.load_plan(path).sha256
