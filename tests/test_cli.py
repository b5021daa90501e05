"""`python -m sd generate / img2img`: a PNG and where it went; bad arguments exit 2 with one clear line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sd
from sd.io.checkpoint import save_checkpoint
import sd.cli.generate
from sd.cli import build_parser, main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    cfg_u = sd.UNetConfig.tiny()
    save_checkpoint(path, sd.CLIP(sd.CLIPConfig.tiny()), sd.VAE_Encoder(sd.VAEConfig.tiny()),
                    sd.VAE_Decoder(sd.VAEConfig.tiny()), sd.DiffusionUNET(cfg_u))
    return path


def test_python_m_sd_generate_writes_a_png_and_says_where(checkpoint, tmp_path):
    out = tmp_path / "cat.png"
    result = subprocess.run([sys.executable, "-m", "sd", "generate", "a cat", "--checkpoint", str(checkpoint),
                             "--steps", "3", "--sampler", "dpmpp2m", "--cfg", "7.5", "--seed", "0", "--size", "64",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"saved {out}" in result.stdout
    assert Image.open(out).size == (64, 64)


def test_img2img_writes_a_png(checkpoint, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 128), (200, 30, 30)).save(src)
    out = tmp_path / "out.png"
    assert main(["img2img", str(src), "a cat", "--checkpoint", str(checkpoint), "--strength", "0.6",
                 "--steps", "4", "--seed", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 128)
    # SDEdit runs the last int(steps * strength) of the steps (diffusers' img2img: int(4 * 0.6) = 2); say those
    assert f"saved {out} (64x128, 2 of 4 ddim steps (strength 0.6)" in capsys.readouterr().out


def test_same_seed_gives_the_same_file(checkpoint, tmp_path):
    args = ["generate", "a dog", "--checkpoint", str(checkpoint), "--steps", "2", "--size", "64", "--seed", "5"]
    main(args + ["--out", str(tmp_path / "a.png")])
    main(args + ["--out", str(tmp_path / "b.png")])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--steps", "abc"], "argument --steps: expected a positive integer, got 'abc'"),
    (["generate", "x", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["generate", "x", "--sampler", "plms"], "argument --sampler: invalid choice: 'plms'"),
    (["generate", "x", "--cfg", "lots"], "argument --cfg: invalid float value: 'lots'"),
    (["generate"], "the following arguments are required: prompt"),
    (["generate", "x", "--size", "100", "--steps", "1"], "height must be a positive multiple of 64"),
    (["generate", "x", "--steps", "1001"], "num_inference_steps must be an integer"),
    (["img2img", "missing.png", "x", "--steps", "1"], "cannot read the input image missing.png"),
    (["img2img", "IN", "x", "--strength", "1.5"], "strength must be in (0, 1]"),
    (["generate", "x", "--checkpoint", "nowhere.safetensors"], "no checkpoint at nowhere.safetensors"),
    (["generate", "x", "--device", "gpu"], "device must be cpu, cuda, cuda:N or mps, got 'gpu'"),
    (["generate", "x", "--device", "cuda:99"], "device 'cuda:99': "),
    (["generate", "x", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
])
def test_bad_arguments_exit_2_with_one_clear_line(checkpoint, tmp_path, capsys, args, message):
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(src)
    args = [str(src) if a == "IN" else a for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(checkpoint)]
    args += ["--out", str(tmp_path / "o.png")]
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err


def test_help_explains_each_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--steps", "--sampler", "--cfg", "--seed", "--size", "--out", "--negative"):
        assert option in text


def test_generate_help_gives_each_models_size_rule_and_the_small_models_output_size(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    small = sd.load_checkpoint(device="cpu")                 # the default model: its own sizes, read off it
    assert f"{small.size_multiple} for the small default model" in text and "64 for SD v1.5" in text
    assert f"draws {small.native_size}x{small.native_size} images" in text
    assert f"{small.native_size} for the small model" in text


def test_generate_reports_the_steps_it_ran(checkpoint, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["generate", "a cat", "--checkpoint", str(checkpoint), "--steps", "3", "--size", "64",
                 "--seed", "0", "--out", str(out)]) == 0
    assert f"saved {out} (64x64, 3 ddim steps, cfg 7.5," in capsys.readouterr().out


@pytest.mark.parametrize("args", [["train", "vae", "--minutes", "0.01"], ["evaluate"]])
def test_train_and_evaluate_reject_a_device_this_machine_lacks(args, tmp_path, capsys):
    bad = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(args + ["--device", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"device '{bad}'" in err, err


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if a model gets loaded: the argument must be refused before that."""
    def refuse(args):
        raise AssertionError("the model was loaded before the bad argument was reported")
    monkeypatch.setattr(sd.cli.generate, "_load", refuse)


def _one_line_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("out, message", [
    ("DIR", "is a folder; give a file name, e.g."),
    ("DIR/picture", "has no extension; give an image file name, e.g."),
    ("DIR/picture.xyz", "'.xyz' is not an image format PIL can write; use .png, .jpg or .webp"),
    ("DIR/file.txt/picture.png", "file.txt' is a file, not a folder"),
    ("/proc/sd-test/picture.png", "cannot write in '/proc'"),
])
def test_out_is_checked_before_generating(tmp_path, capsys, no_generation, out, message):
    (tmp_path / "file.txt").write_text("not a folder")
    out = out.replace("DIR", str(tmp_path))
    err = _one_line_error(capsys, ["generate", "x", "--out", out])
    assert err.startswith("python -m sd generate: error: argument --out:") and message in err, err


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**70), "abc", "1.5"])
def test_seed_outside_the_generators_range_says_the_range(capsys, no_generation, seed):
    err = _one_line_error(capsys, ["generate", "x", "--seed", seed])
    assert f"argument --seed: expected an integer seed from 0 to 2**64-1 ({2**64 - 1}), got '{seed}'" in err


def test_the_largest_seed_generates(checkpoint, tmp_path):
    out = tmp_path / "max.png"
    assert main(["generate", "x", "--checkpoint", str(checkpoint), "--steps", "1", "--size", "64",
                 "--seed", str(2**64 - 1), "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--size", "4096"], "argument --size: expected an integer from 1 to 2048"),
    (["generate", "x", "--height", "2049"], "argument --height: expected an integer from 1 to 2048"),
    (["generate", "x", "--width", "0"], "argument --width: expected an integer from 1 to 2048"),
    (["img2img", "in.png", "x", "--size", "3000"], "argument --size: expected an integer from 1 to 2048"),
    (["generate", "x", "--num-images", "65"], "argument --num-images: expected an integer from 1 to 64"),
])
def test_sizes_and_image_counts_are_capped_at_what_the_cli_can_run(capsys, no_generation, args, message):
    assert message in _one_line_error(capsys, args)


@pytest.mark.parametrize("error, message", [
    (ValueError("bad value\nsecond line"), "python -m sd generate: error: bad value"),
    (TypeError("prompt must be a str"), "python -m sd generate: error: prompt must be a str"),
    (FileNotFoundError("no such weights"), "python -m sd generate: error: no such weights"),
    (OSError(28, "No space left on device"), "python -m sd generate: error: [Errno 28] No space left on device"),
])
def test_expected_errors_become_one_line_and_exit_2(monkeypatch, tmp_path, capsys, error, message):
    def fail(args):
        raise error
    monkeypatch.setattr(sd.cli.generate, "_load", fail)
    assert _one_line_error(capsys, ["generate", "x", "--out", str(tmp_path / "o.png")]) == message


def test_ctrl_c_exits_130_with_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(sd.cli.generate, "_load", interrupted)
    args = ["generate", "x", "--out", str(tmp_path / "o.png")]
    assert main(args) == 130
    assert capsys.readouterr().err == "python -m sd generate: error: interrupted (Ctrl-C)\n"
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--debug"])


def test_debug_shows_the_traceback_of_an_expected_error(monkeypatch, tmp_path):
    def fail(args):
        raise ValueError("bad value")
    monkeypatch.setattr(sd.cli.generate, "_load", fail)
    with pytest.raises(ValueError, match="bad value"):
        main(["generate", "x", "--out", str(tmp_path / "o.png"), "--debug"])


def test_every_command_has_its_handler_and_the_sd_script_entry_point():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"generate", "img2img", "inpaint", "train", "evaluate"}
    for name, parser in commands.items():
        assert callable(parser.get_default("handler")), name
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'sd = "sd.cli:main"' in pyproject


def test_a_broken_command_module_fails_loudly_not_as_an_invalid_choice():
    """An import error in a command's dependencies stops the CLI with that error; no command silently vanishes."""
    code = ("import sys; sys.modules['sd.training.evaluation'] = None\n"   # importing it now raises ImportError
            "from sd.cli import main; main(['train', '--help'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "import of sd.training.evaluation halted" in result.stderr
    assert "invalid choice" not in result.stderr


def test_generate_with_a_lora_file_changes_the_picture_and_a_bad_file_exits_2(checkpoint, tmp_path, capsys):
    from sd.adapters import lora
    pipe = sd.load_checkpoint(checkpoint, device="cpu")
    lora.add_lora(pipe.unet, rank=2)
    torch.manual_seed(1)
    for layer in lora.lora_layers(pipe.unet).values():     # a LoRA that does something (B starts at zero)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    lora_file = pipe.save_lora_weights(tmp_path / "style.safetensors")
    common = ["generate", "a cat", "--checkpoint", str(checkpoint), "--steps", "2", "--seed", "0", "--size", "64"]
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--lora", str(lora_file), "--out", str(tmp_path / "lora.png")]) == 0
    plain, styled = (torch.tensor(list(Image.open(tmp_path / f).getdata())) for f in ("plain.png", "lora.png"))
    assert (plain - styled).abs().max() > 0
    capsys.readouterr()
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    assert main(common + ["--lora", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.safetensors" in err and "\n" not in err


@pytest.mark.parametrize("runs", ["guided,guided", "fast", ""])
def test_evaluate_names_its_runs_or_exits_2(capsys, runs):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["evaluate", "--runs", runs])
    assert e.value.code == 2
    assert "generate_defaults, guided, unguided" in capsys.readouterr().err
