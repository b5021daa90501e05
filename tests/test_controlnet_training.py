"""Training a ControlNet for the shipped small model on the shapes' masks: the masks are the drawn coverage, a
few steps train only the ControlNet and a resumed run continues the same run, and the shipped ControlNet loads and
puts the shape where its mask says (IoU above the same prompts and noise without control)."""
import pytest
import torch

import sd
from sd.controlnet import ControlNet
from sd.io.controlnet import load_controlnet
from sd.training.controlnet import (SHIPPED_CONTROLNET, drawn_shape, generate_batch, iou_with_and_without,
                                    load_trained_controlnet, mask_iou, mask_picture, mask_to_control, shape_masks,
                                    train_controlnet)
from sd.training.data import PALETTE, Attributes, ShapesDataset, draw
from sd.training.loop import TrainOptions

MAX_SHIPPED_BYTES = 5_000_000


@pytest.fixture(scope="module")
def pipe():
    return sd.load_checkpoint(device="cpu", dtype=torch.float32)


def test_masks_redraw_each_picture_from_its_two_colours():
    """background + (colour - background) * mask gives the picture back, to the byte it was rounded to."""
    data = ShapesDataset(40, seed=3)
    masks = shape_masks(data)
    assert masks.shape == (40, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    fg = torch.tensor([PALETTE[a.color] for a in data.attributes], dtype=torch.float32)[:, :, None, None]
    bg = torch.tensor([PALETTE[a.background] for a in data.attributes], dtype=torch.float32)[:, :, None, None]
    redrawn = bg + (fg - bg) * masks
    assert (redrawn - data.images.float()).abs().max() <= 1.0
    assert ((masks > 0.99).flatten(1).sum(1) > 10).all()          # every picture has a shape inside


def test_drawn_shape_of_a_drawn_picture_matches_its_mask_and_a_moved_one_does_not():
    a = Attributes("square", "red", "blue", "large", "center")
    picture = draw(a, 32, radius=10.0, center=(16.0, 16.0))[None]             # (1, 3, 32, 32) in [0, 1]
    moved = draw(a, 32, radius=10.0, center=(24.0, 16.0))[None]
    blank = draw(a, 32, radius=0.0, center=(16.0, 16.0))[None]
    mask = picture.sub(torch.tensor(PALETTE["blue"]).view(1, 3, 1, 1) / 255).abs().sum(1) > 0.5   # (1, 32, 32)
    assert mask_iou(drawn_shape(picture, "red", "blue"), mask).item() > 0.95
    assert mask_iou(drawn_shape(moved, "red", "blue"), mask).item() < 0.6
    empty = torch.zeros(1, 32, 32, dtype=torch.bool)
    assert mask_iou(drawn_shape(blank, "red", "blue"), empty).item() == 1.0   # nothing drawn, nothing wanted


def _opts(tmp_path, steps, resume=False):
    return TrainOptions(out_dir=str(tmp_path), steps=steps, batch_size=4, seed=0, checkpoint_every=2,
                        progress=False, resume=resume, device="cpu")


def test_a_few_steps_train_only_the_controlnet_and_a_resumed_run_is_the_same_run(pipe, tmp_path):
    data = ShapesDataset(16, seed=5)
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    whole = train_controlnet(pipe, data, _opts(tmp_path / "whole", 4))
    train_controlnet(pipe, data, _opts(tmp_path / "split", 2))
    resumed = train_controlnet(pipe, data, _opts(tmp_path / "split", 4, resume=True))

    assert whole["steps"] == resumed["steps"] == 4
    assert whole["losses"] == pytest.approx(resumed["losses"], rel=1e-6)
    for (name, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7), name
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())   # the UNet is frozen
    assert float(whole["model"].mid_zero_conv.weight.detach().abs().max()) > 0                       # the zero convs moved
    # both written files hold the trained ControlNet: the stage checkpoint and the one generate reads
    from_stage = load_trained_controlnet(tmp_path / "whole" / "controlnet.safetensors")
    from_export = load_controlnet(whole["path"])
    for a, b, c in zip(whole["model"].state_dict().values(), from_stage.state_dict().values(),
                       from_export.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_training_refuses_a_dataset_it_cannot_use_and_writes_nothing(pipe, tmp_path):
    with pytest.raises(TypeError, match="ShapesDataset"):
        train_controlnet(pipe, [1, 2, 3], _opts(tmp_path / "a", 2))
    with pytest.raises(ValueError, match="make the dataset at the model's size"):
        train_controlnet(pipe, ShapesDataset(4, image_size=64), _opts(tmp_path / "b", 2))
    with pytest.raises(ValueError, match="caption_dropout"):
        train_controlnet(pipe, ShapesDataset(4), _opts(tmp_path / "c", 2), caption_dropout=1.5)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_shipped_controlnet_is_a_small_float16_file_that_fits_the_shipped_model(pipe):
    from safetensors import safe_open
    assert SHIPPED_CONTROLNET.stat().st_size < MAX_SHIPPED_BYTES
    with safe_open(str(SHIPPED_CONTROLNET), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    net = pipe.load_controlnet(SHIPPED_CONTROLNET)
    pipe.unload_controlnets()
    assert net.config.hint_factor == pipe.vae_factor == 4


def test_generate_batch_is_generate_with_one_control_picture_per_prompt(pipe):
    data = ShapesDataset(2, seed=11)
    masks = shape_masks(data)
    net = load_controlnet(SHIPPED_CONTROLNET)
    batch = generate_batch(pipe, data.captions, 3, net, mask_to_control(masks), steps=8)
    pipe.controlnets[:] = [net]
    try:
        for i in range(2):
            one = pipe.generate(data.captions[i], seed=3, control_image=mask_picture(masks[i]),
                                num_inference_steps=8, progress=False, output_type="pt")
            assert (one[0] - batch[i]).abs().max() < 1e-4
    finally:
        pipe.unload_controlnets()


def test_shipped_controlnet_moves_the_drawn_shapes_towards_their_masks(pipe):
    """On 8 new drawings with short prompts (no size, no place), the same noise with and without the shipped
    ControlNet: the drawn shapes cover their masks far better with it (1,600 steps; on the benchmark's 48 drawings,
    benchmarks/results/controlnet_iou_cpu.txt, short prompts: 0.42 without, 0.76 with)."""
    drawings = ShapesDataset(8, seed=4321)
    iou = iou_with_and_without(pipe, load_controlnet(SHIPPED_CONTROLNET), drawings, [0], short_prompts=True)
    assert iou["control"].mean() > iou["none"].mean() + 0.15
    assert (iou["control"] > iou["none"]).float().mean() >= 0.75    # most drawings, not a few large gains
