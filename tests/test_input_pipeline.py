"""The input pipeline: decoding, the loader's batches and their normalisation.

decode_rgb: every image a folder may hold becomes uint8 [3, H, W] with PIL's
pixels, or one readable ValueError. Batches: ImageNet-normalised float32 in
the model's memory format, whether the workers normalise them (training on
the CPU) or the device does (a GPU).
"""
import os

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import (
    IMAGENET_MEAN, IMAGENET_STD, BatchPreparer, SeededImageFolder, SeededSampler, ValTransform, build_loader, decode_rgb,
    list_samples,
)
from engine.distributed import DistContext

HEIGHT, WIDTH = 37, 53


def picture() -> Image.Image:
    # Smooth gradients: JPEG keeps them close, so decoders can be compared pixel by pixel.
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    channels = [rows * 255 // HEIGHT, cols * 255 // WIDTH, (rows + cols) * 255 // (HEIGHT + WIDTH)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def sixteen_bit_grey() -> Image.Image:
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    return Image.fromarray((rows * 1000 + cols * 100).astype(np.uint16))


FILES = {
    "jpeg": lambda: encoded(picture(), "JPEG", quality=95),
    "greyscale jpeg": lambda: encoded(picture().convert("L"), "JPEG", quality=95),
    "cmyk jpeg": lambda: encoded(picture().convert("CMYK"), "JPEG", quality=95),
    "png": lambda: encoded(picture(), "PNG"),
    "png with alpha": lambda: encoded(picture().convert("RGBA"), "PNG"),
    "palette png": lambda: encoded(picture().convert("P"), "PNG"),
    "16-bit png": lambda: encoded(sixteen_bit_grey(), "PNG"),
    "lossless webp": lambda: encoded(picture(), "WEBP", lossless=True),
    "bmp": lambda: encoded(picture(), "BMP"),
    "tiff": lambda: encoded(picture(), "TIFF"),
    "ppm": lambda: encoded(picture(), "PPM"),
}
LOSSY = {"jpeg", "greyscale jpeg", "cmyk jpeg"}


def pil_pixels(path) -> torch.Tensor:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("kind", FILES)
def test_every_format_gives_rgb_uint8_with_pils_pixels(tmp_path, kind):
    path = tmp_path / "image"
    path.write_bytes(FILES[kind]())
    image = decode_rgb(str(path))
    assert image.dtype == torch.uint8 and image.shape == (3, HEIGHT, WIDTH)
    expected = pil_pixels(path)
    if kind == "16-bit png":
        # PIL keeps the 16 bits and clips them in its conversion; decoders scale them to 8 bits.
        expected = (torch.from_numpy(np.asarray(sixteen_bit_grey()).astype(np.int64)) * 255 // 65535).expand(3, -1, -1)
    difference = (image.int() - expected.int()).abs()
    if kind in LOSSY:
        # Two builds of libjpeg may round the inverse DCT and colour conversion differently.
        assert difference.float().mean() < 1.0 and difference.max() <= 8
    else:
        assert difference.max() <= 1


def test_an_animated_image_gives_its_first_frame(tmp_path):
    first, second = picture(), picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    path = tmp_path / "animated.webp"
    path.write_bytes(encoded(first, "WEBP", lossless=True, save_all=True, append_images=[second]))
    image = decode_rgb(str(path))
    assert image.shape == (3, HEIGHT, WIDTH)
    assert (image.int() - pil_pixels(path).int()).abs().max() <= 1


@pytest.mark.parametrize(
    "content", [b"", b"<html>404 Not Found</html>\n", b"\xff\xd8\xff\xe0 a JPEG header and nothing else"],
    ids=["empty", "text", "header only"],
)
def test_an_unreadable_file_is_one_readable_value_error(tmp_path, content):
    path = tmp_path / "broken.JPEG"
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        decode_rgb(str(path))
    message = str(caught.value)
    assert message and ".cpp:" not in message  # no decoder source paths in what the user reads
    assert "decode_" not in message  # nor a decoder's advice to call its own functions


def test_decoding_uses_no_deprecated_decoder(tmp_path):
    path = tmp_path / "image.jpg"
    path.write_bytes(FILES["jpeg"]())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        decode_rgb(str(path))


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_a_prepared_batch_is_the_normalised_images_in_the_models_memory_format(channels_last):
    images = torch.randint(0, 256, (4, 3, 9, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prepared = BatchPreparer(torch.device("cpu"), channels_last=channels_last).images(images)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean) / std
    assert prepared.dtype == torch.float32
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert prepared.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(prepared.double(), expected, rtol=0, atol=1e-6)


def loader_batches(data, workers, prepare, unreadable=()):
    split = os.path.join(data, "val")
    classes = sorted(os.listdir(split))
    samples = list_samples(split, classes) + [(path, 0) for path in unreadable]
    dataset = SeededImageFolder(samples, ValTransform(36, 32))
    ctx = DistContext()
    sampler = SeededSampler(len(dataset), ctx, 0, shuffle=False)
    return list(build_loader(dataset, sampler, batch_size=5, workers=workers, ctx=ctx, drop_last=False, prepare=prepare))


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_batches_the_cpu_workers_normalise_equal_the_uint8_batches_normalised_in_place(tiny_data, tmp_path,
                                                                                    channels_last):
    unreadable = tmp_path / "empty.JPEG"
    unreadable.write_bytes(b"")
    prepare = BatchPreparer(torch.device("cpu"), channels_last=channels_last)
    assert prepare.worker_normalise is not None
    uint8 = loader_batches(tiny_data, 0, None, [str(unreadable)])  # without a preparer: batches as decoded
    normalised = loader_batches(tiny_data, 2, prepare, [str(unreadable)])
    assert [len(b) for b in normalised] == [len(b) for b in uint8] and sum(map(len, uint8)) == 12
    assert [b.unreadable for b in normalised] == [b.unreadable for b in uint8]
    for workers_batch, plain_batch in zip(normalised, uint8):
        assert plain_batch.images.dtype == torch.uint8 and workers_batch.images.dtype == torch.float32
        images, targets = prepare(workers_batch)
        assert images is workers_batch.images  # passed through, not normalised twice
        expected, expected_targets = prepare(plain_batch)
        assert torch.equal(images, expected) and torch.equal(targets, expected_targets)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=memory_format)
