import json

import pytest

from diffopt.cli import main


def test_info_summarises_a_captured_model(capsys):
    main(["info", "dit-digits", "--layers"])
    out = capsys.readouterr().out
    assert "DiTTransformer2DModel" in out
    assert "transformer_blocks: 6" in out
    assert "MACs/call" in out and "transformer_blocks.5.ff.net.2" in out


def test_info_finds_unet_blocks(capsys):
    main(["info", "unet-digits"])
    out = capsys.readouterr().out
    assert "down_blocks: 3" in out and "mid_block: 1" in out and "up_blocks: 3" in out


def test_demo_prints_a_before_after_table(capsys):
    main(["demo", "--steps", "4", "--samples", "4"])
    out = capsys.readouterr().out
    assert "baseline (eager model)" in out and "ICC rank 32" in out
    identity_row = next(line for line in out.splitlines() if line.startswith("diffopt identity program"))
    assert " inf " in identity_row  # the identity program reproduces the baseline exactly


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_calibrate_then_report_a_temporal_difference_program(capsys, tmp_path):
    calibration = tmp_path / "calibration.json"
    main(["calibrate", "dit-digits", "--out", str(calibration), "--samples", "2", "--steps", "4"])
    out = capsys.readouterr().out
    assert "Ditto paper" in out and "0.983" in out and calibration.exists()
    main(
        [
            "report",
            "dit-digits",
            "--calibration",
            str(calibration),
            "--mode",
            "integer",
            "--samples",
            "2",
            "--steps",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert "transformer_blocks.0.attn1.to_q" in out and "delta" in out
    unoptimized = next(line for line in out.splitlines() if line.startswith("unoptimized"))
    integer = next(line for line in out.splitlines() if line.startswith("TemporalDifferencePass"))
    assert float(integer.split()[-3]) < float(unoptimized.split()[-3])  # fewer bit-operations than fp32


def test_an_unknown_reference_model_is_a_clean_error(capsys, tmp_path):
    bench_file = tmp_path / "bench.json"
    bench_file.write_text(json.dumps({"model": "nope", "configurations": [{"name": "a", "steps": 5}]}))
    for argv in (["tune", "nope", "--min-psnr", "30"], ["bench", str(bench_file), "--out", str(tmp_path / "r")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "error: unknown reference model 'nope': available are ['dit-digits'" in capsys.readouterr().err
