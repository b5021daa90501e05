"""`python -m sd generate / img2img`: a PNG and where it went; bad arguments exit 2 with one clear line."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

import sd
from sd.io.checkpoint import save_checkpoint
from sd.cli import main


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
    assert f"saved {out}" in capsys.readouterr().out


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
    (["generate", "x", "--steps", "1001"], "num_inference_steps must be an integer from 1 to 1000"),
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


@pytest.mark.parametrize("args", [["train", "vae", "--minutes", "0.01"], ["evaluate"]])
def test_train_and_evaluate_reject_a_device_this_machine_lacks(args, tmp_path, capsys):
    bad = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(args + ["--device", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"device '{bad}'" in err, err
