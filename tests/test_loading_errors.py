"""Bad checkpoint files get one line that names the file, and keys named as that file spells them."""
import dataclasses
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sd
from sd.io import keys
from sd.io.checkpoint import DEFAULT_MODEL, save_checkpoint
from sd.io.safe_read import TOKENIZER_METADATA_KEY
from sd.tokenizer import learn_bpe_merges
from tests.compvis_layout import compvis_checkpoint
from tests.reference import diffusers_unet, diffusers_vae, reference_and_ours, transformers_clip

NOT_A_CHECKPOINT = r"not a checkpoint \(could not be read as safetensors or a PyTorch file\)"
CODE_REFUSED = r"this file holds Python objects beyond tensors.*loading it would run code, refused"


def one_line_error(source, match: str) -> str:
    """Load `source`, expect a ValueError matching `match`; return its message after checking it is one clean line."""
    with pytest.raises(ValueError, match=match) as e:
        sd.load_checkpoint(source, device="cpu")
    message = str(e.value)
    assert "\n" not in message and "\x1b" not in message, repr(message)
    return message


@pytest.fixture(scope="module")
def ref():
    return reference_and_ours(seed=5)[0]


@pytest.fixture(scope="module")
def compvis(ref):
    return compvis_checkpoint(ref)


# --- keys named in the file's own layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", [
    "model.diffusion_model.output_blocks.5.2.conv.weight",             # our `up.1.upsample.conv.weight`
    "model.diffusion_model.input_blocks.4.0.in_layers.0.weight",      # our `down.1.res.0.norm1.weight`
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
    "first_stage_model.decoder.up.3.block.0.conv1.weight",            # the decoder numbers its levels in reverse
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
])
def test_a_missing_key_of_a_compvis_file_is_named_as_the_file_spells_it(compvis, tmp_path, key):
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in compvis.items() if k != key}, str(path))
    message = one_line_error(path, rf"^{path}: .* weights do not fit SD v1\.x's layout: missing `{key}`$")
    assert "up.1.upsample" not in message


def test_a_missing_key_that_shapes_are_read_from_is_named_as_the_file_spells_it(compvis, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in compvis.items() if k != "model.diffusion_model.out.2.weight"}, str(path))
    one_line_error(path, rf"^{path}: missing `model\.diffusion_model\.out\.2\.weight` \(UNet output conv\)")


def test_an_unexpected_key_of_a_compvis_file_is_named_as_the_file_spells_it(compvis, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({**compvis, "model.diffusion_model.output_blocks.5.3.conv.weight": torch.zeros(1)}, str(path))
    one_line_error(path, rf"^{path}: UNet weights .*unexpected `model\.diffusion_model\.output_blocks\.5\.3\.conv"
                         r"\.weight`$")


def test_a_missing_key_of_a_diffusers_folder_is_named_with_its_file(ref, tmp_path):
    ref["unet"].save_pretrained(tmp_path / "unet")
    ref["vae"].save_pretrained(tmp_path / "vae")
    ref["clip"].save_pretrained(tmp_path / "text_encoder")
    unet_file = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(unet_file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2.bias"}
    save_file(state, str(unet_file))
    one_line_error(tmp_path, rf"^{unet_file}: UNet weights .*missing "
                             r"`up_blocks\.1\.attentions\.2\.transformer_blocks\.0\.ff\.net\.2\.bias`$")


def test_compvis_keys_go_to_our_names_and_back_unchanged(compvis):
    """Every key of an independently written CompVis file maps to one of our model's keys, and back to itself."""
    attn = sd.UNetConfig.tiny().attention_levels
    ours = set(sd.DiffusionUNET(sd.UNetConfig.tiny()).state_dict())
    unet = [k.removeprefix(keys.COMPVIS_UNET) for k in compvis if k.startswith(keys.COMPVIS_UNET)]
    assert {keys.compvis_unet_key(k, 2, attn) for k in unet} == ours
    assert all(keys.compvis_unet_file_key(keys.compvis_unet_key(k, 2, attn), 2, attn) == k for k in unet)
    vae = [k.removeprefix(keys.COMPVIS_VAE) for k in compvis if k.startswith(keys.COMPVIS_VAE)]
    assert all(keys.compvis_vae_file_key(keys.compvis_vae_key(k, 4), 4) == k for k in vae)
    clip = [k.removeprefix(keys.COMPVIS_CLIP) for k in compvis if k.startswith(keys.COMPVIS_CLIP)]
    assert all(keys.transformers_clip_file_key(keys.transformers_clip_key(k)) == k for k in clip)


def test_diffusers_keys_go_to_our_names_and_back_unchanged():
    unet = diffusers_unet(sd.UNetConfig.tiny()).state_dict()
    vae = diffusers_vae(sd.VAEConfig.tiny()).state_dict()
    assert {keys.diffusers_unet_key(k) for k in unet} == set(sd.DiffusionUNET(sd.UNetConfig.tiny()).state_dict())
    assert all(keys.diffusers_file_key(keys.diffusers_unet_key(k)) == k for k in unet)
    assert all(keys.diffusers_file_key(keys.diffusers_vae_key(k)) == k for k in vae)
    clip = transformers_clip(sd.CLIPConfig.tiny()).state_dict()
    prefix = keys.CLIP_TEXT_MODEL if next(iter(clip)).startswith(keys.CLIP_TEXT_MODEL) else ""
    assert all(keys.transformers_clip_file_key(keys.transformers_clip_key(k), prefix) == k for k in clip)


def test_an_sd2_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "v2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4)}, str(path))
    one_line_error(path, rf"^{path}: this looks like an SD 2\.x checkpoint")


# --- this package's own files: metadata and the tokenizer folder -----------------------------------------------------

def _tiny_models(vocab_size=sd.CLIPConfig.tiny().vocab_size):
    clip_cfg = dataclasses.replace(sd.CLIPConfig.tiny(), vocab_size=vocab_size)
    vae_cfg = sd.VAEConfig.tiny()
    return dict(clip=sd.CLIP(clip_cfg), encoder=sd.VAE_Encoder(vae_cfg), decoder=sd.VAE_Decoder(vae_cfg),
                unet=sd.DiffusionUNET(sd.UNetConfig.tiny()))


def _with_metadata(path, metadata: dict):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=metadata)


def test_sd_config_metadata_that_is_not_json_names_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "model.safetensors", **_tiny_models())
    _with_metadata(path, {"sd_config": '{"unet": {"heads": 8'})
    one_line_error(path, rf"^{path}: its `sd_config` metadata is not valid JSON")


def test_a_misspelt_config_key_in_the_metadata_is_named_with_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "model.safetensors", **_tiny_models())
    _with_metadata(path, {"sd_config": '{"unet": {"haeds": 8}, "vae": {}, "clip": {}}'})
    one_line_error(path, rf"^{path}: UNetConfig has no field\(s\) 'haeds'; valid fields: .*heads")


def test_a_model_copied_without_its_tokenizer_folder_is_caught_at_load(tmp_path):
    tokenizer = sd.CLIPTokenizer.from_merges(learn_bpe_merges(["a red circle", "a blue square"], 12))
    path = save_checkpoint(tmp_path / "shapes.safetensors", **_tiny_models(tokenizer.vocab_size), tokenizer=tokenizer)
    assert sd.load_checkpoint(path, device="cpu").tokenizer.vocab_size == tokenizer.vocab_size
    shutil.rmtree(tmp_path / "shapes_tokenizer")
    one_line_error(path, rf"^{path}: its tokenizer folder shapes_tokenizer/ is not beside it")
    moved = path.rename(tmp_path / "moved.safetensors")
    one_line_error(moved, rf"^{moved}: its tokenizer folder moved_tokenizer/ is not beside it .*saved as shapes_tokenizer/")


def test_an_older_file_without_its_tokenizer_folder_is_caught_by_vocabulary_size(tmp_path):
    """A file written before checkpoints recorded their tokenizer folder (the shipped model's tensors, its metadata
    without that record) and copied without the folder: its 586-id text encoder gives it away."""
    path = tmp_path / "default_model.safetensors"
    with safe_open(str(DEFAULT_MODEL), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != TOKENIZER_METADATA_KEY}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(path), metadata=metadata)
    one_line_error(path, rf"^{path}: its text encoder knows \d+ token ids, and CLIP's standard tokenizer .* has 49408;"
                         r".*<name>_tokenizer/")


# --- files that are no checkpoint, and pickles that would run code ---------------------------------------------------

class Opaque:
    """Any Python object other than tensors and containers: the weights-only unpickler refuses it."""


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name in ("random.ckpt", "random.safetensors", "random.bin"):
        path = tmp_path / name
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
        message = one_line_error(path, rf"^{path}: {NOT_A_CHECKPOINT}")
        assert "Python objects" not in message


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_truncated_pytorch_file_is_not_a_checkpoint(tmp_path, zipped):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=zipped)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = one_line_error(path, rf"^{path}: {NOT_A_CHECKPOINT}")
    assert "Python objects" not in message


def test_a_truncated_safetensors_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(path, rf"^{path}: {NOT_A_CHECKPOINT}")


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_pytorch_file_with_python_objects_is_refused_on_one_line(tmp_path, zipped):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Opaque()}, path, _use_new_zipfile_serialization=zipped)
    message = one_line_error(path, rf"^{path}: {CODE_REFUSED}")
    assert "Opaque" in message and NOT_A_CHECKPOINT.replace("\\", "") not in message


def test_a_plain_pickle_with_python_objects_is_refused_on_one_line(tmp_path):
    path = tmp_path / "objects.pt"
    path.write_bytes(pickle.dumps({"w": Opaque()}))
    one_line_error(path, rf"^{path}: {CODE_REFUSED}")


def test_a_course_checkpoint_path_that_does_not_exist_is_one_line_naming_the_variable(tmp_path, monkeypatch,
                                                                                      offline_hub, capsys):
    from sd.course.models import CHECKPOINT_ENV, load_course_model
    missing = tmp_path / "no-such-file.safetensors"
    monkeypatch.setenv(CHECKPOINT_ENV, str(missing))
    with pytest.raises(ValueError) as e:
        load_course_model("cpu")
    message = str(e.value)
    assert "\n" not in message
    assert message == f"$SD_CHECKPOINT must be the path of an existing file or folder, got '{missing}' (not found)"
    assert "Using" not in capsys.readouterr().out              # no model was loaded in its place
