"""Memory and speed options of the pipeline change memory or speed, not the picture."""
import copy

import pytest
import torch

import sd
from sd.pipeline import StableDiffusion
from sd.runtime.vae_tiling import decode_tiled
from tests.reference import reference_and_ours

KW = dict(height=64, width=64, num_inference_steps=3, seed=0, output_type="pt", progress=False)


@pytest.fixture(scope="module")
def models():
    return reference_and_ours(seed=4)[1], sd.CLIPTokenizer()


@pytest.fixture()
def pipe(models):
    ours, tokenizer = models
    return StableDiffusion(**copy.deepcopy(ours), tokenizer=tokenizer)


def test_attention_slicing_gives_the_same_images(pipe):
    expected = pipe.generate(["a cat", "a dog"], **KW)
    pipe.enable_attention_slicing(1)
    assert pipe.unet.down[0].attn[0].blocks[0].attn2.slice_size == 1
    assert torch.allclose(pipe.generate(["a cat", "a dog"], **KW), expected, atol=1e-6)


def test_vae_slicing_gives_the_same_images(pipe):
    expected = pipe.generate("a cat", num_images=3, **KW)
    pipe.enable_vae_slicing()
    assert torch.allclose(pipe.generate("a cat", num_images=3, **KW), expected, atol=1e-6)


def test_cpu_offload_gives_the_same_images_and_parks_models_on_cpu(pipe):
    expected = pipe.generate("a cat", **KW)
    pipe.enable_model_cpu_offload()
    assert torch.equal(pipe.generate("a cat", **KW), expected)
    assert all(next(m.parameters()).device.type == "cpu" for m in pipe.models().values())


def test_vae_tiling_is_exact_for_one_tile_and_seamless_for_many(pipe):
    torch.manual_seed(0)
    z = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        whole = pipe.decoder(z)
        assert torch.equal(decode_tiled(pipe.decoder, z, tile=24, overlap=4), whole)
        tiled = decode_tiled(pipe.decoder, z, tile=12, overlap=4)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # away from the blended overlaps the first tile is exactly its own decode
    with torch.no_grad():
        corner = pipe.decoder(z[:, :, :12, :12])
    assert torch.allclose(tiled[:, :, :64, :64], corner[:, :, :64, :64], atol=1e-5)


def test_compile_falls_back_to_eager_when_compilation_fails(pipe, monkeypatch):
    expected = pipe.generate("a cat", **KW)

    def broken_compile(module, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    pipe.compile_unet()
    with pytest.warns(UserWarning, match="torch.compile failed.*no C\\+\\+ compiler found.*eagerly"):
        got = pipe.generate("a cat", **KW)
    assert torch.equal(got, expected)


def test_channels_last_gives_the_same_images(pipe):
    expected = pipe.generate("a cat", **KW)
    pipe.enable_channels_last()
    assert torch.allclose(pipe.generate("a cat", **KW), expected, atol=1e-5)


def test_compiled_unet_is_one_graph_compiled_once_for_all_steps(pipe):
    """No graph break and no recompilation in the step loop (what CUDA graphs and torch.compile need): the
    timestep reaches the UNet as a tensor, and the UNet has no data-dependent Python branches."""
    graphs = []

    def counting_backend(graph_module, example_inputs):   # a torch.compile backend that runs the graph as is
        graphs.append(graph_module)
        return graph_module.forward

    expected = pipe.generate("a cat", **{**KW, "num_inference_steps": 4})
    torch._dynamo.reset()
    pipe.compile_unet(backend=counting_backend, fullgraph=True)
    got = pipe.generate("a cat", **{**KW, "num_inference_steps": 4})
    torch._dynamo.reset()
    assert len(graphs) == 1, f"the UNet was compiled {len(graphs)} times for 4 steps"
    assert torch.allclose(got, expected, atol=1e-5)


def test_compile_freezes_weights_on_cpu_unless_told_otherwise(pipe, monkeypatch):
    import torch._inductor.config as inductor_config
    seen = []

    def fake_compile(module, **kwargs):
        def run(*args):
            seen.append((kwargs, inductor_config.freezing))
            return module(*args)
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    eager = pipe.unet
    pipe.compile_unet()
    pipe.generate("a cat", **{**KW, "num_inference_steps": 1})
    assert seen[-1] == ({}, True)                    # freezing in force while the compiled UNet runs
    pipe.unet = eager
    pipe.compile_unet(mode="max-autotune")
    pipe.generate("a cat", **{**KW, "num_inference_steps": 1})
    assert seen[-1] == ({"mode": "max-autotune"}, False)
