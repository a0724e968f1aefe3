"""The image classifier recipe on the CPU: parameters, the image decoder and the sample generator,
training on both dataset formats, determinism, exact resumption, evaluation and batch inference."""

import json
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator

from jobs.recipes.base import (
    RecipeContext,
    RecipeInputError,
    RecipeParameterError,
    load_checkpoint,
    validate_parameters,
)
from jobs.recipes.image_decode import ImageDecodeError, decode_image
from jobs.recipes.images import ImageClassifier, _augment, _to_model_pixels
from jobs.samples.images import CLASSES, encode_png, write_image_sample
from registry.formats import inspect_dataset
from tests.jobs.recipe_helpers import (
    StopAfterStep,
    assert_same_weights,
    events,
    one_torch_thread,
    read_csv,
    recipe_context,
    weights,
)

REPO = Path(__file__).resolve().parents[2]
FAST = {"image_size": 16, "epochs": 5, "batch_size": 32, "width": 8, "learning_rate": 0.01}
# 3 classes x 60 images: 36 for validation, 144 for training in batches of 32.
PER_CLASS = 60
BATCHES = 5
FORMATS = {".zip": "image_folder_zip", ".npz": "npz"}
NOISE = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)


def make_context(
    workdir: Path, dataset: Path, parameters: dict, cls: type = RecipeContext, **overrides
) -> RecipeContext:
    settings = {"seed": 11, "dataset_format": FORMATS[dataset.suffix]} | overrides
    return recipe_context(ImageClassifier, workdir, dataset, parameters, cls, **settings)


def read_predictions(ctx: RecipeContext) -> list[dict]:
    return read_csv(ctx.output_dir / "predictions.csv")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: more threads only contend for a shared machine's cores."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def zip_dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shapes.zip"
    write_image_sample(path, per_class=PER_CLASS)
    return path


@pytest.fixture(scope="module")
def npz_dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shapes.npz"
    write_image_sample(path, per_class=PER_CLASS, fmt="npz", seed=1)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, zip_dataset):
    """One uninterrupted run on the zip, shared by the tests that only read its outcome."""
    ctx = make_context(tmp_path_factory.mktemp("trained"), zip_dataset, FAST)
    return ctx, ImageClassifier().train(ctx)


# Parameters


def test_validation_fills_every_default():
    assert validate_parameters(ImageClassifier, {"epochs": 3}) == {
        "image_size": 32,
        "epochs": 3,
        "batch_size": 64,
        "learning_rate": 0.001,
        "validation_fraction": 0.2,
        "early_stopping_patience": 3,
        "augment": True,
        "width": 16,
    }


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"image_size": 4}, "parameters.image_size", "Must be at least 8."),
        ({"image_size": 32.0}, "parameters.image_size", "Must be a whole number."),
        ({"augment": "yes"}, "parameters.augment", "Must be true or false."),
        ({"width": 1000}, "parameters.width", "Must be at most 256."),
        ({"learning_rate": 0}, "parameters.learning_rate", "Must be greater than 0."),
        ({"validation_fraction": 0.9}, "parameters.validation_fraction", "Must be at most 0.5."),
    ],
)
def test_wrong_values_name_the_field_and_the_rule(parameters, field, message):
    with pytest.raises(RecipeParameterError) as caught:
        validate_parameters(ImageClassifier, parameters)
    assert caught.value.fields == {field: [message]}


def test_schema_is_valid_and_documents_the_npz_arrays():
    schema = ImageClassifier.parameter_schema
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for name, spec in schema["properties"].items():
        assert spec["title"] and spec["description"], name
        assert Draft202012Validator(spec).is_valid(spec["default"]), name
    assert "named x" in schema["description"] and "named y" in schema["description"]
    assert ImageClassifier.dataset_formats == ("image_folder_zip", "npz")


@pytest.mark.slow
def test_importing_the_recipe_loads_neither_torch_nor_numpy():
    probe = textwrap.dedent(
        """
        import sys
        from jobs.recipes.base import validate_parameters
        from jobs.recipes.images import ImageClassifier
        validate_parameters(ImageClassifier, {"epochs": 2})
        heavy = sorted(name for name in ("torch", "numpy", "safetensors") if name in sys.modules)
        print(",".join(heavy))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == ""


# Decoding


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("filter_type", [None, 0, 1, 2, 3, 4])
def test_png_decoder_round_trips_the_encoder(channels, filter_type):
    image = np.random.default_rng(channels).integers(0, 256, (9, 7, channels), dtype=np.uint8)
    decoded = decode_image(encode_png(image, filter_type=filter_type))
    assert decoded.dtype == np.uint8
    assert np.array_equal(decoded, image)


def png(
    width: int,
    height: int,
    color_type: int,
    depth: int,
    rows: bytes,
    *,
    interlace: int = 0,
    filter_type: int = 0,
    **chunks: bytes,
) -> bytes:
    """A PNG of `rows` (the scanlines without their filter bytes, all of one length), each row
    marked with `filter_type`, and any extra chunks before the image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    stride = len(rows) // height
    scanlines = b"".join(
        bytes([filter_type]) + rows[i * stride : (i + 1) * stride] for i in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace)
    extra = b"".join(chunk(kind.encode(), body) for kind, body in chunks.items())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(scanlines))
        + chunk(b"IEND", b"")
    )


def test_png_decoder_reads_low_bit_depths_palettes_and_16_bits():
    one_bit = decode_image(png(10, 1, 0, 1, bytes([0b10110000, 0b01000000])))
    assert one_bit[0, :, 0].tolist() == [255, 0, 255, 255, 0, 0, 0, 0, 0, 255]

    palette = bytes([10, 20, 30, 40, 50, 60, 70, 80, 90])
    indexed = decode_image(png(3, 1, 3, 4, bytes([0x21, 0x00]), PLTE=palette))
    assert indexed.tolist() == [[[70, 80, 90], [40, 50, 60], [10, 20, 30]]]

    sixteen = decode_image(png(1, 1, 2, 16, bytes([0x12, 0x34, 0xAB, 0xCD, 0xFF, 0x00])))
    assert sixteen.tolist() == [[[0x12, 0xAB, 0xFF]]]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xd8\xff\xe0" + bytes(40), "not a readable PNG, JPEG, GIF, BMP or WebP"),
        (b"II*\x00" + bytes(40), "not a readable PNG, JPEG, GIF, BMP or WebP image"),
        (b"not an image at all, just text", "not a readable PNG, JPEG, GIF, BMP or WebP image"),
        (encode_png(NOISE)[:-200], "damaged or truncated"),
        (png(8_000, 6_000, 0, 8, b""), "8000 x 6000 pixels, over our limit of 40,000,000"),
        (png(100_000, 100_000, 0, 8, b""), "too many pixels"),
        (png(2, 1, 0, 8, bytes(2), filter_type=7), "damaged or truncated"),
    ],
    ids=["jpeg-no-data", "tiff", "text", "truncated-png", "over-our-limit", "bomb", "bad-filter"],
)
def test_decoder_rejects_what_it_cannot_read_in_words(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_pixels_are_brought_to_the_model_size_and_channels():
    rgba = np.zeros((2, 20, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    resized = _to_model_pixels(rgba, channels=3, size=8)
    assert resized.shape == (2, 3, 8, 8) and resized.dtype == torch.uint8
    assert resized[:, 0].unique().tolist() == [200] and resized[:, 1:].unique().tolist() == [0]
    gray = _to_model_pixels(rgba, channels=1, size=8)
    assert gray.unique().tolist() == [60]  # 0.299 * 200, rounded
    floats = _to_model_pixels(np.full((1, 8, 8, 1), 0.25, np.float32), channels=3, size=8)
    assert floats.dtype == torch.float32 and floats.shape == (1, 3, 8, 8)
    assert floats.unique().tolist() == [0.25]


# The sample


def test_sample_zip_passes_the_registry_and_npz_holds_x_and_y(zip_dataset, npz_dataset):
    inspection = inspect_dataset(zip_dataset, declared_format="zip")
    assert inspection.format == "image_folder_zip"
    assert inspection.profile["classes"] == dict.fromkeys(sorted(CLASSES), PER_CLASS)
    assert inspection.profile["image_sizes"]["formats"] == {"png": 3 * PER_CLASS}
    arrays = inspect_dataset(npz_dataset, declared_format="npz")
    assert [(c["name"], c["dtype"], c["shape"]) for c in arrays.schema] == [
        ("x", "uint8", [3 * PER_CLASS, 16, 16]),
        ("y", "int64", [3 * PER_CLASS]),
    ]


# Training


def test_training_on_the_zip_reaches_high_validation_accuracy(trained):
    ctx, result = trained
    assert result.metrics["val_accuracy"] > 0.9
    assert set(result.metrics) == {
        "val_loss",
        "val_accuracy",
        "train_loss",
        "best_epoch",
        "epochs_trained",
    }
    names = {(metric["split"], metric["name"]) for metric in events(ctx, "metric")}
    assert names == {("train", "loss"), ("val", "loss"), ("val", "accuracy")}
    assert events(ctx, "progress")[0] == {"step": 1, "total": 5 * BATCHES, "epoch": 1}
    assert result.input_signature == {"image_size": 16, "channels": 3, "classes": sorted(CLASSES)}


def test_artifacts_are_safetensors_and_a_config_that_describes_the_input(trained):
    ctx, result = trained
    assert result.artifacts == {
        "model.safetensors": "out/model.safetensors",
        "config.json": "out/config.json",
    }
    assert weights(ctx)["0.weight"].shape == (8, 3, 3, 3)  # the stem: width 8, RGB
    config = json.loads((ctx.workdir / result.artifacts["config.json"]).read_text())
    assert config["architecture"] == {
        "type": "resnet",
        "channels": 3,
        "width": 8,
        "blocks_per_stage": [1, 1, 1],
        "classes": 3,
    }
    assert (config["image_size"], config["channels"]) == (16, 3)
    assert config["classes"] == sorted(CLASSES)
    assert len(config["normalisation"]["mean"]) == len(config["normalisation"]["std"]) == 3


def test_training_on_the_npz_reaches_high_validation_accuracy(tmp_path, npz_dataset):
    ctx = make_context(tmp_path, npz_dataset, FAST | {"image_size": 12})
    result = ImageClassifier().train(ctx)
    assert result.metrics["val_accuracy"] > 0.9
    assert result.input_signature == {"image_size": 12, "channels": 1, "classes": [0, 1, 2]}


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, zip_dataset):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        ctx = make_context(tmp_path / name, zip_dataset, FAST | {"epochs": 1}, seed=seed)
        ImageClassifier().train(ctx)
        runs[name] = weights(ctx)
    assert_same_weights(runs["a"], runs["b"])
    assert not torch.equal(runs["a"]["0.weight"], runs["c"]["0.weight"])


@pytest.mark.parametrize(
    "stops",
    [pytest.param([7], id="mid-epoch"), pytest.param([2, BATCHES, 13], id="three-interruptions")],
)
def test_interrupted_and_resumed_run_ends_with_identical_weights(
    tmp_path, zip_dataset, trained, stops
):
    uninterrupted, expected = trained
    resume_state = None
    for stop_at in stops:
        ctx = make_context(
            tmp_path, zip_dataset, FAST, StopAfterStep, resume_state=resume_state, stop_at=stop_at
        )
        assert ImageClassifier().train(ctx) is None
        [checkpoint] = events(ctx, "checkpoint")
        assert checkpoint["step"] == stop_at
        resume_state = load_checkpoint(tmp_path / checkpoint["path"])  # weights_only=True
    ctx = make_context(tmp_path, zip_dataset, FAST, resume_state=resume_state)
    result = ImageClassifier().train(ctx)

    assert_same_weights(weights(uninterrupted), weights(ctx))
    assert result.metrics == expected.metrics
    assert events(ctx, "progress")[0]["step"] == stops[-1] + 1


def test_augmented_batches_keep_the_models_memory_layout():
    """Cropping lays a batch out channels-last, on which torch's CPU training corrupts the heap
    with several threads (the child aborts): augmentation hands back the usual layout."""
    inputs = torch.randn(5, 3, 16, 16)
    augmented = _augment(inputs, torch.Generator().manual_seed(0))
    assert augmented.shape == inputs.shape and augmented.is_contiguous()


def test_checkpoint_of_another_run_is_refused(tmp_path, zip_dataset):
    ctx = make_context(tmp_path, zip_dataset, FAST, StopAfterStep, stop_at=1)
    ImageClassifier().train(ctx)
    state = load_checkpoint(tmp_path / events(ctx, "checkpoint")[-1]["path"])
    other = make_context(tmp_path, zip_dataset, FAST | {"augment": False}, resume_state=state)
    with pytest.raises(RecipeInputError, match="checkpoint belongs to a run with other"):
        ImageClassifier().train(other)


# Evaluation and inference


def test_evaluate_scores_the_model_on_a_labelled_dataset(tmp_path, trained, zip_dataset):
    model, _ = trained
    metrics = ImageClassifier().evaluate(
        make_context(tmp_path, zip_dataset, FAST, model_dir=model.output_dir)
    )
    assert metrics["accuracy"] > 0.9
    assert (metrics["rows"], metrics["rows_with_unknown_class"]) == (3 * PER_CLASS, 0)


def test_the_gate_scores_exactly_the_images_the_training_run_held_out(tmp_path, npz_dataset):
    """Same seed, same split: the gate's accuracy on the held-out images is the run's own
    validation accuracy (of a model weak enough for that to say something), each sliced by its
    true class as text; another seed holds out other images."""
    ctx = make_context(tmp_path, npz_dataset, FAST | {"image_size": 12, "epochs": 1})
    result = ImageClassifier().train(ctx)
    assert result.metrics["val_accuracy"] < 0.9
    outcomes, slices = ImageClassifier().validation_outcomes(
        ctx, model_dirs={"challenger": ctx.output_dir}, split_seed=ctx.seed, slice_column="class"
    )
    correct = outcomes["challenger"]
    assert len(correct) == len(slices) == 3 * PER_CLASS // 5
    assert sum(correct) / len(correct) == pytest.approx(result.metrics["val_accuracy"])
    assert set(slices) == {"0", "1", "2"}
    other, unsliced = ImageClassifier().validation_outcomes(
        ctx, model_dirs={"x": ctx.output_dir}, split_seed=ctx.seed + 1, slice_column=""
    )
    assert other["x"] != correct and set(unsliced) == {None}


def test_the_gate_counts_a_class_the_champion_never_learned_as_wrong(tmp_path, trained):
    """The challenger's data has a class the champion's had not: the champion cannot be right
    on it, and the slice shows that."""
    model, _ = trained
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as archive:
        for index in range(10):
            archive.writestr(f"dots/dots-{index}.png", encode_png(NOISE[:16, :16]))
            for name in CLASSES:
                archive.writestr(f"{name}/{name}-{index}.png", encode_png(NOISE[:16, :16]))
    ctx = make_context(tmp_path, tmp_path / "more.zip", FAST | {"validation_fraction": 0.5})
    outcomes, slices = ImageClassifier().validation_outcomes(
        ctx, model_dirs={"champion": model.output_dir}, split_seed=3, slice_column="class"
    )
    assert "dots" in slices and len(slices) == 20
    assert not any(
        right for right, value in zip(outcomes["champion"], slices, strict=True) if value == "dots"
    )


def test_predict_writes_one_row_per_image_with_its_path(tmp_path, trained, zip_dataset):
    model, _ = trained
    ctx = make_context(tmp_path, zip_dataset, FAST, model_dir=model.output_dir)
    result = ImageClassifier().predict(ctx)
    assert result.metrics == {"rows": 3 * PER_CLASS}
    assert result.artifacts == {"predictions.csv": "out/predictions.csv"}
    rows = read_predictions(ctx)
    assert list(rows[0]) == ["path", "prediction", "probability"]
    with zipfile.ZipFile(zip_dataset) as archive:
        assert [row["path"] for row in rows] == sorted(archive.namelist())
    correct = sum(row["prediction"] == row["path"].split("/")[0] for row in rows)
    assert correct / len(rows) > 0.9
    assert all(1 / 3 <= float(row["probability"]) <= 1 for row in rows)
    assert events(ctx, "progress")[-1] == {"step": 180, "total": 180, "epoch": 1}


def test_predict_on_an_npz_uses_the_index_and_converts_channels(tmp_path, trained, npz_dataset):
    model, _ = trained
    ctx = make_context(tmp_path, npz_dataset, FAST, model_dir=model.output_dir)
    ImageClassifier().predict(ctx)
    rows = read_predictions(ctx)
    assert [row["index"] for row in rows] == [str(i) for i in range(3 * PER_CLASS)]
    assert {row["prediction"] for row in rows} <= set(CLASSES)


def test_predict_stops_when_asked(tmp_path, trained, zip_dataset):
    model, _ = trained
    ctx = make_context(tmp_path, zip_dataset, FAST, model_dir=model.output_dir)
    ctx.stop_event.set()
    assert ImageClassifier().predict(ctx) is None


# Data problems


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_a_file_that_is_no_image_fails_fast_naming_the_file(tmp_path):
    image = encode_png(np.zeros((8, 8), np.uint8))
    path = write_zip(
        tmp_path / "mixed.zip",
        {"cats/a.png": image, "dogs/b.png": image, "dogs/c.tif": b"II*\x00" + bytes(40)},
    )
    with pytest.raises(RecipeInputError, match=r"'dogs/c.tif'.*not a readable PNG, JPEG, GIF"):
        ImageClassifier().train(make_context(tmp_path, path, FAST))


def test_a_zip_with_one_class_is_refused(tmp_path):
    image = encode_png(np.zeros((8, 8), np.uint8))
    path = write_zip(tmp_path / "one.zip", {"cats/a.png": image, "cats/b.png": image})
    with pytest.raises(RecipeInputError, match="needs at least two"):
        ImageClassifier().train(make_context(tmp_path, path, FAST))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 8, 8), np.uint8)}, "no array named x"),
        ({"x": np.zeros((4, 8, 8), np.uint8)}, "no array named y"),
        ({"x": np.zeros((4, 8, 8), np.int64), "y": np.arange(4)}, r"astype\(numpy.uint8\)"),
        ({"x": np.zeros((4, 8), np.uint8), "y": np.arange(4)}, "it must be \\(images, height"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.arange(3)}, "one integer or text label"),
        (
            {"x": np.full((4, 8, 8), np.nan, np.float32), "y": np.arange(4) % 2},
            r"x\[0\] holds NaN",
        ),
    ],
)
def test_npz_problems_are_input_errors_in_words(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(RecipeInputError, match=message):
        ImageClassifier().train(make_context(tmp_path, path, FAST))


def test_images_in_fortran_order_train_like_the_same_images_in_c_order(tmp_path, npz_dataset):
    with np.load(npz_dataset) as arrays:
        x, y = arrays["x"], arrays["y"]
    fortran = tmp_path / "fortran.npz"
    np.savez(fortran, x=np.asfortranarray(x), y=y)
    trained = []
    for path in (npz_dataset, fortran):
        ctx = make_context(tmp_path / path.stem, path, FAST | {"epochs": 1})
        ImageClassifier().train(ctx)
        trained.append(weights(ctx))
    assert_same_weights(*trained)
