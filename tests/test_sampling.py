"""Generation at scale: pixels are functions of seeds, shards resume, outputs have the EDM layouts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from emdctl.commands.sample import sample_command
from emdctl.errors import UserError

from .conftest import make_generator

IMAGE = {"kind": "image", "range": [-1.0, 1.0]}


@pytest.fixture(scope="module")
def image_generator(tmp_path_factory):
    return make_generator(tmp_path_factory.mktemp("gen") / "generator", label_dim=3)


def sample(src, out, seeds, batch=8, fmt="both", cls=None, steps=1):
    return sample_command(
        source=src,
        teacher_recipe=None,
        seeds=seeds,
        out_dir=out,
        batch=batch,
        steps=steps,
        fmt=fmt,
        class_label=cls,
        use_ema=True,
        sampler="auto",
        device_name="cpu",
        show_progress=False,
    )


def test_pixels_do_not_depend_on_batch_size(image_generator, tmp_path):
    seeds = list(range(20, 33))
    sample(image_generator, tmp_path / "a", seeds, batch=1, fmt="npz")
    sample(image_generator, tmp_path / "b", seeds, batch=13, fmt="npz")
    sample(image_generator, tmp_path / "c", seeds[5:], batch=4, fmt="npz")
    a = np.load(tmp_path / "a" / "samples.npz")
    b = np.load(tmp_path / "b" / "samples.npz")
    c = np.load(tmp_path / "c" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert np.array_equal(a["arr_0"][5:], c["arr_0"])  # a seed's image does not depend on its neighbours
    assert a["arr_0"].shape == (13, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    assert set(a["arr_1"].tolist()) <= {0, 1, 2}


def test_png_layout_and_npz_agree(image_generator, tmp_path):
    sample(image_generator, tmp_path / "s", [998, 999, 1000, 1001], fmt="both")
    png = np.array(Image.open(tmp_path / "s" / "001000" / "001001.png"))
    npz = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert np.array_equal(png, npz[3]) and (tmp_path / "s" / "000000" / "000998.png").is_file()
    assert (tmp_path / "s" / ".preview" / "grid.png").is_file()


def test_fixed_class(image_generator, tmp_path):
    sample(image_generator, tmp_path / "s", list(range(6)), fmt="npz", cls=2)
    assert np.load(tmp_path / "s" / "samples.npz")["arr_1"].tolist() == [2] * 6
    with pytest.raises(UserError, match="class label 7"):
        sample(image_generator, tmp_path / "t", [0], cls=7)


def test_interrupted_sampling_resumes_only_what_is_missing(image_generator, tmp_path):
    seeds = list(range(1100))
    out = tmp_path / "s"
    first = sample(image_generator, out, seeds, batch=300, fmt="npz")
    assert first["generated_now"] == 1100
    full = np.load(out / "samples.npz")["arr_0"]
    # as if killed: the second block never recorded, and no final npz
    (out / ".shards" / "block-000000001000.done").unlink()
    (out / ".shards" / "block-000000001000.npz").unlink()
    (out / "samples.npz").unlink()
    again = sample(image_generator, out, seeds, batch=128, fmt="npz")  # another --batch on resume is fine
    assert again["generated_now"] == 100
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], full)
    with pytest.raises(UserError, match=r"holds other samples \(n, seeds differ\)"):
        sample(image_generator, out, list(range(5, 10)), fmt="npz")


def test_keep_float_stores_the_unclipped_images_and_shifted_evaluation_uses_them(image_generator, tmp_path):
    import torch

    from emdctl.evaluation.stats import images_of, shift_background
    from emdctl.plots import to_uint8
    from emdctl.rng import PerSeedRandom
    from emdctl.sampling import open_generator

    seeds = [3, 4, 5, 6, 7]
    sample_command(source=image_generator, teacher_recipe=None, seeds=seeds, out_dir=tmp_path / "s", batch=2,
                   steps=1, fmt="npz", class_label=None, use_ema=True, sampler="auto", device_name="cpu",
                   show_progress=False, keep_float=True)  # fmt: skip
    z = np.load(tmp_path / "s" / "samples.npz")
    gen, _ = open_generator(image_generator, True)
    rng = PerSeedRandom(seeds, "cpu")
    z_in = rng.randn(gen.img_shape)
    labels = torch.nn.functional.one_hot(rng.randint(gen.label_dim), gen.label_dim).float()
    with torch.no_grad():
        want = gen(z_in, labels).permute(0, 2, 3, 1).numpy()
    assert z["arr_float"].dtype == np.float32 and np.allclose(z["arr_float"], want, atol=1e-6)
    assert np.array_equal(to_uint8(torch.from_numpy(z["arr_float"])).numpy(), z["arr_0"])
    offset = torch.from_numpy(z["arr_float"]).permute(0, 3, 1, 2) + 3.0  # what a DC-blind teacher could emit
    np.savez(tmp_path / "off.npz", arr_0=to_uint8(offset).permute(0, 2, 3, 1).numpy(),
             arr_float=offset.permute(0, 2, 3, 1).numpy())  # fmt: skip
    shifted = images_of(tmp_path / "off.npz", 5, shift=True)
    assert to_uint8(offset).eq(255).all()  # clipped, the offset images are flat white
    assert torch.equal(shifted, to_uint8(shift_background(offset - 3.0)))
    assert torch.equal(images_of(image_generator, 5, seeds=seeds, shift=True), shifted)
    sample(image_generator, tmp_path / "q", seeds, fmt="npz")  # a re-run asking for floats it lacks
    with pytest.raises(UserError, match=r"holds other samples \(keep_float differ\)"):
        sample_command(source=image_generator, teacher_recipe=None, seeds=seeds, out_dir=tmp_path / "q", batch=2,
                       steps=1, fmt="npz", class_label=None, use_ema=True, sampler="auto", device_name="cpu",
                       show_progress=False, keep_float=True)  # fmt: skip
    with pytest.raises(UserError, match="keeping float images needs images and the npz or both format"):
        sample_command(source=image_generator, teacher_recipe=None, seeds=seeds, out_dir=tmp_path / "p", batch=2,
                       steps=1, fmt="png", class_label=None, use_ema=True, sampler="auto", device_name="cpu",
                       show_progress=False, keep_float=True)  # fmt: skip


def test_multistep_sampling_is_per_seed(image_generator, tmp_path):
    sample(image_generator, tmp_path / "a", [5, 6, 7], batch=3, fmt="npz", steps=3)
    sample(image_generator, tmp_path / "b", [7], batch=1, fmt="npz", steps=3)
    a = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    assert np.array_equal(a[2], np.load(tmp_path / "b" / "samples.npz")["arr_0"][0])


def test_teacher_sampling_from_a_recipe(tmp_path):
    import yaml

    from .conftest import tiny_mixture_recipe

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(tiny_mixture_recipe()))
    sample_command(
        source=None,
        teacher_recipe=f,
        seeds=list(range(300)),
        out_dir=tmp_path / "t",
        batch=100,
        steps=30,
        fmt="npz",
        class_label=None,
        use_ema=True,
        sampler="heun",
        device_name="cpu",
        show_progress=False,
    )
    x = np.load(tmp_path / "t" / "samples.npz")["arr_0"]
    assert x.shape == (300, 2) and x.dtype == np.float32
    assert np.abs(np.linalg.norm(x, axis=1) - 2.0).mean() < 0.2  # the ring of radius 2
    assert (tmp_path / "t" / ".preview" / "scatter.png").is_file()
