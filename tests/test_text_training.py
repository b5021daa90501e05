"""The text encoder's contrastive stage: which captions count as matches, and an image tower that sees position."""
import torch
import torch.nn.functional as F

from sd.config import CLIPConfig
from sd.training.data import ATTRIBUTE_NAMES, NOT_SAID, ShapesDataset
from sd.training.text import ContrastivePair, ImageEncoder, caption_describes, contrastive_loss


def test_a_caption_describes_an_image_when_every_attribute_it_says_is_the_images():
    #                    shape color bg size position
    labels = torch.tensor([[0, 1, 2, 0, 1],     # small, top left
                           [0, 1, 2, 0, 2],     # small, top right
                           [0, 1, 2, 1, 0]])    # large, center
    said = torch.tensor([[0, 1, 2, NOT_SAID, 1],          # "... in the top left"
                         [0, 1, 2, NOT_SAID, NOT_SAID],   # "a <color> <shape> on a <bg> background"
                         [0, 1, 2, 1, NOT_SAID]])         # "a large ..."
    got = caption_describes(said, labels)        # [image, caption]
    assert got.tolist() == [[True, True, False],
                            [False, True, False],
                            [False, True, True]]


def test_left_and_right_captions_are_not_matches_in_the_training_batches():
    ds = ShapesDataset(300, seed=0)
    same = caption_describes(ds.said, ds.labels)
    assert same.diagonal().all()                             # every caption describes its own image
    left = [i for i, c in enumerate(ds.captions) if c.endswith("top left")]
    right = [i for i, c in enumerate(ds.captions) if c.endswith("top right")]
    assert left and right and not same[left][:, right].any()


def test_an_asymmetric_match_matrix_normalises_images_and_captions_separately():
    g = torch.Generator().manual_seed(0)
    img, txt, scale = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.tensor(1.0)
    same = torch.tensor([[True, True, False], [False, True, False], [False, True, True]])
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    # image 0 matches captions 0 and 1 (half each); caption 1 matches all three images (a third each)
    t_img = same.float() / same.sum(1, keepdim=True)
    t_txt = same.T.float() / same.T.sum(1, keepdim=True)
    expected = ((-t_img * logits.log_softmax(1)).sum(1).mean() + (-t_txt * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, same), expected)


def test_the_image_tower_tells_a_shape_on_the_left_from_the_same_shape_on_the_right():
    # a blob far from the borders, moved by a multiple of the tower's stride (8): convolutions and a global
    # pool would give both the same embedding; projecting the whole feature map tells them apart
    left, right = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    left[..., 28:32, 16:20] = 1
    right[..., 28:32, 40:44] = 1
    torch.manual_seed(0)
    encoder = ImageEncoder(8, 16, image_size=64)
    pooled = encoder.net(left).mean(dim=(2, 3)), encoder.net(right).mean(dim=(2, 3))
    torch.testing.assert_close(*pooled)                      # what a global pool would have seen
    gap = (encoder(left) - encoder(right)).abs().max()
    assert gap > 1e-4, gap                                   # a pool: ~1e-9


def test_caption_reading_loss_covers_the_end_and_padding_states_and_skips_what_is_not_said():
    torch.manual_seed(0)
    pair = ContrastivePair(CLIPConfig(vocab_size=10, width=8, layers=1, heads=2, mlp_width=16), 4, 8, eos_id=9)
    hidden = torch.randn(2, 6, 8)
    eos = torch.tensor([3, 4])                               # caption 0 ends at 3 (states 3, 4, 5), caption 1 at 4
    said = torch.tensor([[0, 1, 2, NOT_SAID, 3],
                         [2, 0, 1, 1, NOT_SAID]])
    states = torch.cat([hidden[0, 3:], hidden[1, 4:]])       # (5, 8)
    rows = torch.cat([said[0].expand(3, 5), said[1].expand(2, 5)])
    expected = 0
    for k, name in enumerate(ATTRIBUTE_NAMES):
        keep = rows[:, k] != NOT_SAID
        expected = expected + F.cross_entropy(pair.attribute_heads[name](states[keep]), rows[keep, k])
    torch.testing.assert_close(pair.attribute_loss(hidden, eos, said), expected)
