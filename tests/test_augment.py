"""Per-sample affine augmentation, 2D and 3D: identity, exact flips, offsets, rotations, label
alignment, replay, and the margin a 3D crop needs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lunaseg.augment import (CropAugmentation, SegmentationAugmentation, apply_affine,
                             apply_crop_affine, identity_transforms, identity_transforms_3d,
                             source_crop_irc)
from lunaseg.config import AugmentConfig, CropAugmentConfig
from lunaseg.errors import ConfigError


def only(**options) -> AugmentConfig:
    """These augmentation options on, every other one off."""
    return replace(AugmentConfig.none(), **options)


SPATIAL_BOOK = AugmentConfig(flip=True, offset=0.03, scale=0.2, rotate=True, noise_hu=0.0)


def _batch(n: int = 4, c: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, c, size, size, generator=g) * 1000 - 500
    label = torch.rand(n, 1, size, size, generator=g) > 0.7
    return image, label


def _blob(n: int, size: int = 32, radius: float = 6.0):
    """Images that are 1000 HU exactly where the label is set (a disc near the centre)."""
    rows = torch.arange(size).view(-1, 1).float()
    cols = torch.arange(size).view(1, -1).float()
    centre = (size - 1) / 2
    disc = ((rows - centre - 2) ** 2 + (cols - centre + 3) ** 2) <= radius**2
    label = disc.expand(n, 1, size, size).clone()
    image = label.float().repeat(1, 2, 1, 1) * 1000.0
    return image, label


def test_all_options_off_is_exact_identity():
    augment = SegmentationAugmentation(AugmentConfig.none(), seed=0)
    image, label = _batch()
    out, out_label = augment(image, label)
    assert out is image
    assert torch.equal(out_label, label)
    _, from_float = augment(image, label.float())
    assert from_float.dtype == torch.bool and torch.equal(from_float, label)


def test_identity_theta_reproduces_input():
    image, label = _batch()
    out, out_label = apply_affine(image, label, identity_transforms(image.shape[0]))
    torch.testing.assert_close(out, image, rtol=1e-5, atol=1e-3)
    assert torch.equal(out_label, label)


@pytest.mark.parametrize("axis", [0, 1])
def test_flip_theta_is_exact_flip(axis):
    image, label = _batch(size=15)
    theta = identity_transforms(image.shape[0])
    theta[:, axis, axis] = -1.0  # row 0 scales x (columns), row 1 scales y (rows)
    dim = -1 if axis == 0 else -2
    out, out_label = apply_affine(image, label, theta)
    torch.testing.assert_close(out, torch.flip(image, dims=[dim]), rtol=1e-5, atol=1e-3)
    assert torch.equal(out_label, torch.flip(label, dims=[dim]))


def test_flip_option_gives_one_of_four_flips_per_sample():
    augment = SegmentationAugmentation(only(flip=True), seed=3)
    image, label = _batch(n=16)
    out, out_label = augment(image, label)
    seen = set()
    for i in range(image.shape[0]):
        matches = [dims for dims in ([], [-1], [-2], [-2, -1])
                   if torch.allclose(out[i], torch.flip(image[i], dims), atol=1e-3)
                   and torch.equal(out_label[i], torch.flip(label[i], dims))]
        assert len(matches) == 1
        seen.add(tuple(matches[0]))
    assert len(seen) > 1  # flips differ within the batch


def test_transforms_differ_per_sample():
    augment = SegmentationAugmentation(SPATIAL_BOOK, seed=1)
    theta = augment.draw_transforms(8)
    assert theta.shape == (8, 2, 3)
    assert len({tuple(t.flatten().tolist()) for t in theta}) == 8
    image, label = _blob(8)
    out, _ = augment(image, label)
    assert not torch.allclose(out[0], out[1])


def test_offset_moves_the_image():
    size = 16
    image, label = _batch(n=1, size=size)
    theta = identity_transforms(1)
    theta[0, 0, 2] = 2.0 / size  # one pixel in normalised units
    out, out_label = apply_affine(image, label, theta)
    # Output column j samples input column j + 1; the last column repeats the border.
    torch.testing.assert_close(out[..., :-1], image[..., 1:], rtol=1e-5, atol=1e-3)
    assert torch.equal(out_label[..., :-1], label[..., 1:])

    augment = SegmentationAugmentation(only(offset=0.2), seed=0)
    theta = augment.draw_transforms(4)
    assert torch.all(theta[:, :, 2].abs() <= 0.2) and torch.any(theta[:, :, 2] != 0)
    torch.testing.assert_close(theta[:, :, :2], identity_transforms(4)[:, :, :2])
    moved, _ = augment(image.repeat(4, 1, 1, 1), label.repeat(4, 1, 1, 1))
    assert not torch.allclose(moved, image.expand_as(moved), atol=1.0)


def test_label_stays_binary_and_follows_the_image():
    augment = SegmentationAugmentation(SPATIAL_BOOK, seed=2)
    image, label = _blob(8)
    out, out_label = augment(image, label.float())
    assert out_label.dtype == torch.bool and out_label.shape == label.shape
    # The image is 1000 * label, resampled with the same grid: bright <=> labelled.
    assert torch.equal(out_label, out[:, :1] > 500)
    assert torch.all(out_label.flatten(1).sum(1) > 50)


def test_scale_and_rotation_ranges():
    config = only(scale=0.2, rotate=True)
    theta = SegmentationAugmentation(config, seed=0).draw_transforms(256)
    linear = theta[:, :, :2]
    # Rotation keeps lengths: each axis' stretch is |row| of diag(s) @ R.
    stretch = linear.norm(dim=2)
    assert torch.all((stretch >= 0.8 - 1e-6) & (stretch <= 1.2 + 1e-6))
    angles = torch.atan2(linear[:, 1, 0], linear[:, 1, 1]) % (2 * math.pi)
    assert angles.min() < 0.5 and angles.max() > 2 * math.pi - 0.5


def test_same_seed_replays_and_draw_is_reusable():
    image, label = _batch()
    a = SegmentationAugmentation(SPATIAL_BOOK, seed=7)
    b = SegmentationAugmentation(SPATIAL_BOOK, seed=7)
    out_a, lab_a = a(image, label)
    out_b, lab_b = b(image, label)
    assert torch.equal(out_a, out_b) and torch.equal(lab_a, lab_b)

    g = torch.Generator().manual_seed(11)
    theta = a.draw_transforms(4, generator=g)
    replay = a.draw_transforms(4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(theta, replay)
    first, _ = apply_affine(image, label, theta)
    again, _ = apply_affine(image, label, replay)
    assert torch.equal(first, again)


def test_switching_an_option_keeps_the_other_draws():
    offset_only = SegmentationAugmentation(only(offset=0.1), seed=5).draw_transforms(4)
    with_flip = SegmentationAugmentation(only(offset=0.1, flip=True),
                                         seed=5).draw_transforms(4)
    assert torch.equal(offset_only[:, :, 2], with_flip[:, :, 2])


def test_noise_touches_input_only():
    augment = SegmentationAugmentation(only(noise_hu=25.0), seed=0)
    image = torch.zeros(4, 2, 64, 64)
    label = torch.zeros(4, 1, 64, 64, dtype=torch.bool)
    label[:, :, 10:20, 10:20] = True
    out, out_label = augment(image, label)
    assert torch.equal(out_label, label)
    assert out.std().item() == pytest.approx(25.0, rel=0.05)


def test_passed_generator_is_used():
    g = torch.Generator().manual_seed(0)
    augment = SegmentationAugmentation(SPATIAL_BOOK, generator=g)
    assert augment.generator("cpu") is g


@pytest.mark.parametrize("option,value", [("scale", 1.0), ("scale", -0.1), ("offset", -1.0),
                                          ("noise_hu", -5.0), ("offset", float("nan"))])
def test_bad_options_raise_config_error(option, value):
    with pytest.raises(ConfigError, match=f"augment.{option}"):
        SegmentationAugmentation(only(**{option: value}))


def test_shape_errors():
    image, label = _batch()
    with pytest.raises(ValueError, match="theta"):
        apply_affine(image, label, identity_transforms(2))
    with pytest.raises(ValueError, match="label shape"):
        apply_affine(image, label[:, :, :8], identity_transforms(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    augment = SegmentationAugmentation(AugmentConfig.book(), seed=0)
    image, label = _blob(4)
    out, out_label = augment(image.cuda(), label.cuda())
    assert out.is_cuda and out_label.is_cuda and out_label.dtype == torch.bool


def test_module_replays_a_recorded_draw():
    augment = SegmentationAugmentation(SPATIAL_BOOK, seed=4)
    image, label = _batch()
    theta = augment.draw_transforms(4)
    first = augment.apply_affine(image, label, theta)
    second = apply_affine(image, label, theta)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_class_labels_move_with_the_union_and_keep_their_classes():
    image, _ = _batch(n=6, size=32)
    g = torch.Generator().manual_seed(3)
    classes = torch.zeros(6, 1, 32, 32, dtype=torch.uint8)
    classes[:, :, 6:18, 5:15] = 1  # a benign block
    classes[:, :, 14:26, 17:29] = 2  # a malignant block (they touch at rows 14-17)
    classes[:, :, 8, 8] = 0  # and a hole
    augment = SegmentationAugmentation(SPATIAL_BOOK, generator=g)
    theta = augment.draw_transforms(6)
    _, moved = apply_affine(image, classes, theta)
    _, moved_union = apply_affine(image, classes > 0, theta)
    assert moved.dtype == torch.uint8 and set(moved.unique().tolist()) <= {0, 1, 2}
    # The nodule mask moves exactly as a bool label would, so 1-class training is unchanged.
    assert torch.equal(moved > 0, moved_union)
    assert (moved == 1).any() and (moved == 2).any()
    # A class stays where its own block went: each moved class is inside that class's moved
    # mask grown by one pixel (the blend at the border decides the rest).
    for value in (1, 2):
        _, own = apply_affine(image, (classes == value).float(), theta)
        grown = torch.nn.functional.max_pool2d(own.float(), 3, stride=1, padding=1) > 0
        assert not ((moved == value) & ~grown).any()
    # Untransformed (every option off), class labels come back as they went in.
    _, same = SegmentationAugmentation(AugmentConfig.none(), seed=0)(image, classes)
    assert torch.equal(same, classes)


# ----------------------------------------------------------------------------- 3D crops

CROP = (8, 12, 12)
BOOK_3D_SPATIAL = CropAugmentConfig(noise_hu=0.0)


def _crops(n: int = 4, size=(12, 20, 20), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *size, generator=g) * 1000 - 500


def _centre(x: torch.Tensor, crop=CROP) -> torch.Tensor:
    s = [(have - want) // 2 for have, want in zip(x.shape[2:], crop)]
    return x[:, :, s[0]:s[0] + crop[0], s[1]:s[1] + crop[1], s[2]:s[2] + crop[2]]


def test_crop_identity_gives_the_source_centre():
    x = _crops()
    out = apply_crop_affine(x, identity_transforms_3d(4), CROP)
    torch.testing.assert_close(out, _centre(x), rtol=1e-5, atol=1e-3)
    off = CropAugmentation(CropAugmentConfig.off(), CROP, seed=0)
    assert off.source_irc == CROP
    assert torch.equal(off(x)[0], _centre(x))


@pytest.mark.parametrize("row, dim", [(0, -1), (1, -2), (2, -3)])
def test_crop_flip_theta_flips_that_axis(row, dim):
    x = _crops()
    theta = identity_transforms_3d(4)
    theta[:, row, row] = -1.0  # rows x, y, z = col, row, index
    out = apply_crop_affine(x, theta, CROP)
    torch.testing.assert_close(out, torch.flip(_centre(x), dims=[dim]), rtol=1e-5, atol=1e-3)


def test_crop_offset_moves_the_image_by_whole_voxels():
    x = _crops()
    theta = identity_transforms_3d(4)
    theta[:, 0, 3] = 2.0 / CROP[2]  # one voxel of the output crop, along the columns
    theta[:, 2, 3] = -2.0 / CROP[0]  # and one slice back
    out = apply_crop_affine(x, theta, CROP)
    # Output (i, r, c) samples source centre (i - 1, r, c + 1): the margin supplies the edges.
    s = [(have - want) // 2 for have, want in zip(x.shape[2:], CROP)]
    shifted = x[:, :, s[0] - 1:s[0] - 1 + CROP[0], s[1]:s[1] + CROP[1], s[2] + 1:s[2] + 1 + CROP[2]]
    torch.testing.assert_close(out, shifted, rtol=1e-5, atol=1e-3)

    augment = CropAugmentation(CropAugmentConfig(flip=False, offset=0.25, scale=0.0,
                                                 rotate=False, noise_hu=0.0), CROP, seed=0)
    theta = augment.draw_transforms(64)
    assert torch.all(theta[:, :, 3].abs() <= 0.25) and torch.all(theta[:, :, 3] != 0)
    torch.testing.assert_close(theta[:, :, :3], identity_transforms_3d(64)[:, :, :3])
    moved, _ = augment(x[:1].expand(8, -1, -1, -1, -1)[:, :, :augment.source_irc[0],
                                                        :augment.source_irc[1],
                                                        :augment.source_irc[2]])
    assert not torch.allclose(moved[0], moved[1], atol=1.0)


def test_crop_rotation_turns_rows_into_columns_about_the_index_axis():
    x = _crops(size=(8, 12, 12))
    theta = identity_transforms_3d(4)
    theta[:, 0, :2] = torch.tensor([0.0, -1.0])  # 90 degrees in the row-col plane
    theta[:, 1, :2] = torch.tensor([1.0, 0.0])
    out = apply_crop_affine(x, theta, CROP)
    # Each slice turns as a whole; slices stay where they are.
    candidates = [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 3)]
    assert any(torch.allclose(out, c, atol=1e-3) for c in candidates)


def test_crop_transforms_differ_per_sample_and_labels_pass_through():
    augment = CropAugmentation(CropAugmentConfig(), CROP, seed=1)
    theta = augment.draw_transforms(8)
    assert theta.shape == (8, 3, 4)
    assert len({tuple(t.flatten().tolist()) for t in theta}) == 8
    x = _crops(n=1, size=augment.source_irc).expand(2, -1, -1, -1, -1).contiguous()
    label = torch.tensor([True, False])
    out, out_label = augment(x, label)
    assert out.shape == (2, 1, *CROP)
    assert not torch.allclose(out[0], out[1], atol=1.0)  # one batch, two transforms
    assert out_label is label


def test_crop_replay_of_a_recorded_draw_gives_the_same_output():
    augment = CropAugmentation(BOOK_3D_SPATIAL, CROP, seed=4)
    x = _crops(size=augment.source_irc)
    theta = augment.draw_transforms(4)
    first, _ = augment(x, theta=theta)
    again = augment.apply_crop_affine(x, theta, CROP)
    assert torch.equal(first, again)
    # The same seed replays a whole forward pass, noise included.
    noisy = CropAugmentConfig()
    a, b = (CropAugmentation(noisy, CROP, seed=9) for _ in range(2))
    assert torch.equal(a(x)[0], b(x)[0])
    a.reseed(3)
    b.reseed(3)
    assert torch.equal(a(x)[0], b(x)[0])
    assert not torch.equal(a(x)[0], CropAugmentation(noisy, CROP, seed=10)(x)[0])


def test_crop_noise_is_gaussian_in_hu():
    augment = CropAugmentation(CropAugmentConfig(flip=False, offset=0.0, scale=0.0, rotate=False,
                                                 noise_hu=25.0), CROP, seed=0)
    x = torch.zeros(16, 1, *CROP)
    out, _ = augment(x)
    assert out.std().item() == pytest.approx(25.0, rel=0.05)
    assert abs(out.mean().item()) < 1.0


@pytest.mark.parametrize("crop", [(32, 48, 48), (8, 12, 12), (7, 11, 13)])
def test_source_crop_holds_every_sample_any_draw_can_ask_for(crop):
    """With the source of source_crop_irc, no sample position falls beyond its outermost
    voxel centres, so border padding is never pulled in (the book cut 32x48x48 only)."""
    config = CropAugmentConfig()
    source = source_crop_irc(crop, config)
    assert all((s - c) % 2 == 0 and s > c for s, c in zip(source, crop))
    augment = CropAugmentation(config, crop, seed=0)
    theta = augment.draw_transforms(20000)
    # An affine map's extremes over the crop lie at its corner voxels' centres.
    size_xyz = torch.tensor([crop[2], crop[1], crop[0]], dtype=torch.float32)
    signs = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)],
                         dtype=torch.float32)
    corners = signs * (1 - 1 / size_xyz)  # normalised, align_corners=False
    reach = theta[:, None, :, :3] @ corners[None, :, :, None]
    reach = reach[..., 0] + theta[:, None, :, 3]  # (N, 8, 3), output half-size units
    source_xyz = torch.tensor([source[2], source[1], source[0]], dtype=torch.float32)
    in_source = reach * size_xyz / source_xyz  # the source's normalised units
    assert torch.all(in_source.abs() <= 1 - 1 / source_xyz + 1e-6)
    # And the plain crop is not enough: the same draws reach beyond its outer voxels.
    assert torch.any(reach.abs() > 1)


def test_crop_options_are_checked():
    with pytest.raises(ConfigError, match="classifier augment.scale"):
        CropAugmentation(CropAugmentConfig(scale=1.0))
    with pytest.raises(ValueError, match="even number"):
        CropAugmentation(CropAugmentConfig.off(), CROP)(torch.zeros(1, 1, 9, 12, 12))


def test_noise_leaves_its_input_alone_and_lets_gradients_through():
    noise_only = AugmentConfig(flip=False, offset=0.0, scale=0.0, rotate=False, noise_hu=25.0)
    augment = SegmentationAugmentation(noise_only, seed=0)
    input = torch.zeros(4, 7, 16, 16)
    out, _ = augment(input)
    assert torch.count_nonzero(input) == 0 and 20 < out.std().item() < 30
    leaf = torch.zeros(4, 7, 16, 16, requires_grad=True)
    out, _ = augment(leaf)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(leaf))
