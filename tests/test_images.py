"""stablefused.images: loading, conversion to RGB, resize policies, size limit, pixels as diffusers makes them."""

import numpy as np
import pytest
import torch
from PIL import Image

from stablefused import images
from stablefused.errors import ConfigError


def _rgb(w=40, h=24, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_conversions_to_rgb(tmp_path):
    base = np.zeros((8, 8, 3), np.uint8)
    base[:4] = (200, 30, 30)
    rgba = np.concatenate([base, np.full((8, 8, 1), 255, np.uint8)], -1)
    rgba[4:, :, 3] = 0  # bottom half transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a_rgba.png")
    Image.fromarray(base).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "b_palette.png")
    grey16 = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "c_grey16.png")
    Image.fromarray(base[..., 0]).save(tmp_path / "d_grey.png")
    Image.fromarray(base).save(tmp_path / "e.jpg", quality=95)
    loaded = images.load(str(tmp_path))  # a folder: sorted by name
    assert [p.spec.split("/")[-1] for p in loaded] == ["a_rgba.png", "b_palette.png", "c_grey16.png", "d_grey.png", "e.jpg"]
    assert all(p.image.mode == "RGB" and p.image.size == (8, 8) for p in loaded)
    a = np.asarray(loaded[0].image)
    assert (a[:4] == (200, 30, 30)).all() and (a[4:] == 255).all() and "RGBA" in loaded[0].converted
    assert (np.asarray(loaded[1].image)[:4] == (200, 30, 30)).all() and "P" in loaded[1].converted
    g = np.asarray(loaded[2].image)[..., 0].astype(int)  # 16-bit scaled, not clipped to white
    assert g[0, 0] == 0 and g[-1, -1] == round(63000 / 65535 * 255) and "16" in loaded[2].converted
    assert loaded[3].converted == "L -> RGB" and loaded[4].converted is None


@pytest.mark.parametrize("policy,size,expect", [
    ("crop", (40, 26), (24, 40)), ("pad", (40, 26), (32, 40)), ("stretch", (41, 26), (24, 40)),
])
def test_target_size_rounds_to_the_multiple(policy, size, expect):
    assert images.target_size(size, policy, 8) == expect
    assert images.target_size(size, policy, 8, height=16, width=16) == (16, 16)


def test_fit_policies():
    img = _rgb(40, 26)
    # crop without a target: an integer centre crop, no resampling
    out = images.fit(img, "crop", 24, 40)
    assert np.array_equal(np.asarray(out), np.asarray(img)[1:25])
    # pad: black bands, the image unchanged in the middle
    out = np.asarray(images.fit(img, "pad", 32, 40))
    assert (out[:3] == 0).all() and (out[-3:] == 0).all() and np.array_equal(out[3:29], np.asarray(img))
    # crop to another aspect then resize; stretch just resizes
    assert images.fit(img, "crop", 16, 16).size == (16, 16)
    assert images.fit(img, "stretch", 16, 48).size == (48, 16)
    with pytest.raises(ConfigError, match="resize='fill'"):
        images.fit(img, "fill", 16, 16)


def test_check_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"^init_image=.*missing.png: no such file"):
        images.check(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ConfigError, match=r"^init_image=.*bad.png: cannot read it as an image.*valid PNG"):
        images.check(str(tmp_path / "bad.png"))
    good = tmp_path / "good.png"
    _rgb().save(good)
    data = bytearray(good.read_bytes())
    data[60] ^= 0xFF  # a flipped byte inside the image data: CRC mismatch
    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="corrupt.png: cannot read"):
        images.check(str(tmp_path / "corrupt.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="folder holds no"):
        images.check(str(tmp_path / "empty"))
    assert images.check(str(good)) == [(str(good), (40, 24))]
    with pytest.raises(ConfigError, match="must name a colour and a shape"):
        images.check("shapes:a black background")


def test_shapes_source_is_rendered_and_described():
    (src,) = images.load("shapes:a blue square on white")
    assert src.image.size == (32, 32) and src.description == "a blue square on white"
    from stablefused.shapes.classify import classify_image

    assert classify_image(src.image) == {"color": "blue", "shape": "square", "size": "large", "background": "white"}


def test_size_limit():
    class M:
        name, height, width = "shapes", 32, 32

    images.check_size("x.png", (128, 100), (96, 128), M, 4.0)
    with pytest.raises(ConfigError, match=r"init_image=x.png: a 200x100 image gives 200x96 .*height=32 width=32.*max_size"):
        images.check_size("x.png", (200, 100), (96, 200), M, 4.0)


def test_pixels_are_diffusers_preprocess():
    img = _rgb(16, 8)
    px = images.to_pixels([img], 4)
    assert px.shape == (1, 3, 8, 16)
    expect = torch.from_numpy(np.asarray(img).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(px[0], expect, atol=1e-6)
