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


def test_demo_compares_the_plain_model_with_the_exported_forecast_cache_and_writes_a_grid(capsys, tmp_path):
    from PIL import Image

    main(["demo", "--steps", "10", "--samples", "4", "--repeats", "1", "--out", str(tmp_path / "demo.png")])
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("plain", "forecast"))}
    assert rows["plain model, torch eager fp32"][-1] == "inf"
    torch_psnr, onnx_psnr = (float(rows[name][-1]) for name in sorted(rows) if name.startswith("forecast"))
    assert 20 < torch_psnr < 200 and abs(onnx_psnr - torch_psnr) < 0.5  # onnxruntime runs the same program
    assert "measured just now" in out
    assert Image.open(tmp_path / "demo.png").size == (3 * (4 * 17 + 1), 3 * (2 * 17 + 1))  # 2 rows of 4 digits


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
    int8 = ["export", "dit-digits", str(tmp_path / "int8"), "--precision", "int8-static"]
    main([*int8, "--calibration", str(calibration), "--float-layers", "3"])
    out = capsys.readouterr().out
    assert "StaticQuantizationPass" in out and "precision int8-static" in out
    kept = out.split("kept float by measured int8 error: ")[1].splitlines()[0].split(", ")
    errors = [float(layer.split(" (")[1].rstrip("%)")) for layer in kept]
    assert len(kept) == 3 and errors == sorted(errors, reverse=True) and errors[-1] > 0  # the largest, measured
    assert not any(layer.startswith(("pos_embed.proj", "proj_out_2")) for layer in kept)  # float already (the ends)
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["precision"] == "int8-static"


def test_an_unknown_reference_model_is_a_clean_error(capsys, tmp_path):
    bench_file = tmp_path / "bench.json"
    bench_file.write_text(json.dumps({"model": "nope", "configurations": [{"name": "a", "steps": 5}]}))
    for argv in (["tune", "nope", "--min-psnr", "30"], ["bench", str(bench_file), "--out", str(tmp_path / "r")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "error: unknown reference model 'nope': available are ['dit-digits'" in capsys.readouterr().err


def test_every_command_writes_to_its_documented_default_files():
    from diffopt.cli import build_parser

    parser = build_parser()
    defaults = {
        ("demo",): "demo.png",
        ("sample", "bundle/"): "samples.png",
        ("calibrate", "dit-digits"): "calibration.json",
        ("tune", "dit-digits", "--budget", "0.3"): "tune",
    }
    for argv, out in defaults.items():
        assert parser.parse_args(list(argv)).out == out, argv
