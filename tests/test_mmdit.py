"""The transformer (sd/mmdit.py, sd/mmdit_blocks.py): exact against diffusers' SD3Transformer2DModel with copied
weights, and the behaviours its design promises (patches, adaLN-zero, joint attention, bad inputs)."""
from __future__ import annotations

import math

import pytest
import torch

from sd.config import MMDiTConfig
from sd.mmdit import MMDiT, TIME_SCALE
from sd.mmdit_blocks import MMDiTBlock, grid_positions, joint_attention, patchify, unpatchify

diffusers = pytest.importorskip("diffusers")


def _tiny(**changes) -> MMDiTConfig:
    return MMDiTConfig(**{**dict(in_channels=4, out_channels=4, patch_size=2, width=64, depth=3, heads=2,
                                 context_dim=40, sample_size=8), **changes})


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the zero-initialised layers too), so that every path counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _copy_from_diffusers(ours: MMDiT, theirs) -> None:
    """diffusers' SD3 weights into our names: q/k/v fused, the patch convolution as a linear map over
    (row, column, channel), the continuous adaLN's (scale, shift) as our (shift, scale)."""
    d = ours.config.width
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}
    conv = sd["pos_embed.proj.weight"]                                 # (D, C, p, p)
    state = {"patch_embed.weight": conv.permute(0, 2, 3, 1).reshape(d, -1), "patch_embed.bias": sd["pos_embed.proj.bias"],
             "context_embed.weight": sd["context_embedder.weight"], "context_embed.bias": sd["context_embedder.bias"]}
    for ours_name, theirs_name in (("time_embed", "time_text_embed.timestep_embedder"),
                                   ("pooled_embed", "time_text_embed.text_embedder")):
        for layer in ("linear_1", "linear_2"):
            for kind in ("weight", "bias"):
                state[f"{ours_name}.{layer}.{kind}"] = sd[f"{theirs_name}.{layer}.{kind}"]
    last = ours.config.depth - 1
    for i in range(ours.config.depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state[o + f"image.modulation.linear.{kind}"] = sd[b + f"norm1.linear.{kind}"]
            state[o + f"image.qkv.{kind}"] = torch.cat([sd[b + f"attn.to_{x}.{kind}"] for x in "qkv"])
            state[o + f"image.out.{kind}"] = sd[b + f"attn.to_out.0.{kind}"]
            state[o + f"image.mlp.fc1.{kind}"] = sd[b + f"ff.net.0.proj.{kind}"]
            state[o + f"image.mlp.fc2.{kind}"] = sd[b + f"ff.net.2.{kind}"]
            state[o + f"text.qkv.{kind}"] = torch.cat([sd[b + f"attn.add_{x}_proj.{kind}"] for x in "qkv"])
            if i < last:
                state[o + f"text.modulation.linear.{kind}"] = sd[b + f"norm1_context.linear.{kind}"]
                state[o + f"text.out.{kind}"] = sd[b + f"attn.to_add_out.{kind}"]
                state[o + f"text.mlp.fc1.{kind}"] = sd[b + f"ff_context.net.0.proj.{kind}"]
                state[o + f"text.mlp.fc2.{kind}"] = sd[b + f"ff_context.net.2.{kind}"]
            else:   # SD3's last block updates only the image: its text norm gives (scale, shift), nothing after
                scale, shift = sd[b + f"norm1_context.linear.{kind}"].chunk(2)
                mods = torch.zeros_like(ours.state_dict()[o + f"text.modulation.linear.{kind}"]).chunk(6)
                state[o + f"text.modulation.linear.{kind}"] = torch.cat([shift, scale, *mods[2:]])
                for name in ("out", "mlp.fc1", "mlp.fc2"):
                    state[o + f"text.{name}.{kind}"] = ours.state_dict()[o + f"text.{name}.{kind}"]
    for kind in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{kind}"].chunk(2)
        state[f"final.modulation.linear.{kind}"] = torch.cat([shift, scale])
        state[f"final.linear.{kind}"] = sd[f"proj_out.{kind}"]
    ours.load_state_dict(state, strict=True)


def _diffusers_sd3(cfg: MMDiTConfig, latent_side: int):
    from diffusers import SD3Transformer2DModel
    grid = latent_side // cfg.patch_size
    model = SD3Transformer2DModel(sample_size=latent_side, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                                  num_layers=cfg.depth, attention_head_dim=cfg.width // cfg.heads,
                                  num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_dim,
                                  caption_projection_dim=cfg.width, pooled_projection_dim=cfg.context_dim,
                                  out_channels=cfg.out_channels, pos_embed_max_size=grid).eval()
    _randomise(model, seed=1)
    with torch.no_grad():   # SD3's positions are a stored table: put ours in it (no crop: the table is the grid)
        model.pos_embed.pos_embed.copy_(grid_positions(grid, grid, cfg.width)[None])
    return model


@pytest.mark.parametrize("patch_size", [1, 2])
def test_the_transformer_equals_diffusers_sd3_transformer_with_the_same_weights(patch_size):
    cfg = _tiny(patch_size=patch_size)
    theirs = _diffusers_sd3(cfg, latent_side=8)
    ours = MMDiT(cfg).eval()
    _randomise(ours, seed=2)          # the parts SD3's last block lacks keep these; they must not matter
    _copy_from_diffusers(ours, theirs)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, cfg.context_dim, generator=g)
    t = torch.tensor([0.3, 0.9]) * TIME_SCALE
    with torch.no_grad():
        want = theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=context.mean(1),
                      timestep=t).sample
        got = ours(x, context, t)
    assert want.abs().mean() > 0.1                                   # a real signal, not two zero maps
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_patches_are_cut_in_reading_order_and_put_back_exactly():
    latent = torch.randn(2, 3, 4, 6)
    tokens = patchify(latent, 2)                                      # (2, 2*3, 2*2*3)
    assert tokens.shape == (2, 6, 12)
    # token 4 is patch row 1, column 1: latent rows 2-3, columns 2-3; inside it (row, column, channel)
    expected = torch.stack([latent[0, c, 2 + r, 2 + q] for r in range(2) for q in range(2) for c in range(3)])
    assert torch.equal(tokens[0, 4], expected)
    assert torch.equal(unpatchify(tokens, 2, 4, 6), latent)


def test_positions_tell_every_patch_apart_and_do_not_depend_on_the_grid_size():
    pos = grid_positions(3, 5, 16)
    assert pos.shape == (15, 16)
    assert torch.cdist(pos, pos).add(torch.eye(15)).min() > 0.1      # no two patches share a position
    # patch (row 1, column 2) has the same features in a 3x5 and in a 4x4 grid
    assert torch.allclose(pos[1 * 5 + 2], grid_positions(4, 4, 16)[1 * 4 + 2])


def test_a_new_block_is_the_identity_and_still_learns():
    block = MMDiTBlock(32, heads=2, mlp_ratio=4.0)
    x, c, cond = torch.randn(2, 9, 32), torch.randn(2, 5, 32), torch.randn(2, 32)
    out_x, out_c = block(x, c, cond)
    assert torch.equal(out_x, x) and torch.equal(out_c, c)           # adaLN-zero: every gate is 0
    (out_x.square().sum() + out_c.square().sum()).backward()
    assert block.image.modulation.linear.weight.grad.abs().sum() > 0  # the gates' gradient is not zero


def test_a_new_transformer_predicts_zero_velocity():
    model = MMDiT(_tiny())
    out = model(torch.randn(2, 4, 8, 8), torch.randn(2, 7, 40), 500)
    assert out.shape == (2, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))


def test_joint_attention_is_one_softmax_over_both_sequences():
    g = torch.Generator().manual_seed(0)
    heads, d = 2, 8
    image, text = torch.randn(1, 4, 3 * heads * d, generator=g), torch.randn(1, 3, 3 * heads * d, generator=g)
    out_image, out_text = joint_attention(image, text, heads)
    both = torch.cat([image, text], dim=1)[0]                         # (7, 3 H d)
    q, k, v = both.split(heads * d, dim=-1)
    for h in range(heads):                                           # written out per head and token
        cols = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d), dim=-1)
        want = weights @ v[:, cols]
        assert torch.allclose(out_image[0, :, cols], want[:4], atol=1e-6)
        assert torch.allclose(out_text[0, :, cols], want[4:], atol=1e-6)


def test_the_text_tokens_change_the_picture_and_the_time_changes_it_too():
    model = MMDiT(_tiny()).eval()
    _randomise(model)
    x = torch.randn(1, 4, 8, 8)
    c1, c2 = torch.randn(1, 7, 40), torch.randn(1, 7, 40)
    with torch.no_grad():
        base = model(x, c1, 100)
        assert (model(x, c2, 100) - base).abs().max() > 1e-3
        assert (model(x, c1, 900) - base).abs().max() > 1e-3


@pytest.mark.parametrize("latent, context, timestep, message", [
    (torch.randn(1, 3, 8, 8), torch.randn(1, 7, 40), 10, r"\(B, 4, H, W\)"),
    (torch.randn(1, 4, 7, 8), torch.randn(1, 7, 40), 10, "multiple of 2"),
    (torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32), 10, r"\(B, T, 40\)"),
    (torch.randn(2, 4, 8, 8), torch.randn(3, 7, 40), 10, "context batch 3"),
    (torch.randn(1, 4, 8, 8), torch.randn(1, 7, 40), float("nan"), "finite"),
    (torch.randn(2, 4, 8, 8), torch.randn(2, 7, 40), torch.ones(3), r"\(2,\) tensor"),
])
def test_bad_inputs_get_one_line_errors(latent, context, timestep, message):
    with pytest.raises(ValueError, match=message) as e:
        MMDiT(_tiny())(latent, context, timestep)
    assert "\n" not in str(e.value)


def test_a_width_that_does_not_split_into_heads_is_refused():
    with pytest.raises(ValueError, match="divisible by heads"):
        MMDiT(_tiny(width=66, heads=4))
