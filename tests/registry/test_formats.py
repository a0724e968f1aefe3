"""Dataset format detection, limits, schema inference and profiles, on files generated here."""

from __future__ import annotations

import stat
import statistics
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from registry.formats import (
    DatasetFormatError,
    DatasetLimits,
    compare_profiles,
    inspect_dataset,
    sniff_format,
)
from registry.formats.archives import ExpansionMeter

# --- fixture builders -------------------------------------------------------------------------


def write_text(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(tmp_path: Path, table: pa.Table, name: str = "data.parquet", **options) -> Path:
    path = tmp_path / name
    pq.write_table(table, path, **options)
    return path


def write_zip(
    tmp_path: Path, entries: dict[str, bytes], name: str = "images.zip", **options
) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, **options) as archive:
        for entry_name, data in entries.items():
            archive.writestr(entry_name, data)
    return path


def png_bytes(width: int, height: int) -> bytes:
    """A complete, valid greyscale PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * width for _ in range(height)))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def jpeg_bytes(width: int, height: int) -> bytes:
    """A JPEG's marker chain up to its frame header: JFIF and EXIF-like segments, then SOF0."""
    jfif = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    app0 = b"\xff\xe0" + struct.pack(">H", len(jfif) + 2) + jfif
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 1000) + b"E" * 1000
    components = b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    frame = struct.pack(">BHHB", 8, height, width, 3) + components
    sof0 = b"\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame
    return b"\xff\xd8" + app0 + app1 + sof0 + b"\xff\xd9"


def gif_bytes(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x3b"


def bmp_bytes(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, -height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 54) + info


def webp_bytes(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + bits.to_bytes(4, "little") + b"\x00" * 8
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def image_entries() -> dict[str, bytes]:
    return {
        "cat/001.png": png_bytes(32, 24),
        "cat/002.jpg": jpeg_bytes(640, 480),
        "dog/001.gif": gif_bytes(10, 20),
        "dog/002.bmp": bmp_bytes(8, 6),
        "dog/003.webp": webp_bytes(100, 50),
    }


def reject(path: Path, match: str, **kwargs) -> DatasetFormatError:
    with pytest.raises(DatasetFormatError, match=match) as caught:
        inspect_dataset(path, **kwargs)
    assert caught.value.code == "invalid_dataset"
    assert caught.value.status == 400
    return caught.value


@pytest.mark.slow
def test_importing_the_package_loads_neither_pyarrow_nor_numpy():
    """The web process imports the package; the heavy readers load only for their format."""
    code = "import sys, registry.formats; print('pyarrow' in sys.modules, 'numpy' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.split() == ["False", "False"]


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_schema_and_numeric_profile_are_exact(tmp_path):
    path = write_text(
        tmp_path,
        "age,score,city\n10,0.5,Paris\n20,1.5,Lyon\n30,,Paris\n,2.5,Nice\n40,3.5,Paris\n",
    )

    inspection = inspect_dataset(path)

    assert inspection.format == "csv"
    assert inspection.row_count == 5
    assert inspection.schema == [
        {"name": "age", "dtype": "int64", "nullable": True},
        {"name": "score", "dtype": "float64", "nullable": True},
        {"name": "city", "dtype": "string", "nullable": False},
    ]
    age = inspection.profile["age"]
    assert (age["count"], age["nulls"], age["min"], age["max"]) == (4, 1, 10, 40)
    assert age["mean"] == 25.0
    assert age["std"] == pytest.approx(statistics.stdev([10, 20, 30, 40]))
    score = inspection.profile["score"]
    assert (score["count"], score["nulls"], score["min"], score["max"]) == (4, 1, 0.5, 3.5)
    assert score["mean"] == pytest.approx(2.0)
    assert inspection.profile["city"] == {
        "count": 5,
        "nulls": 0,
        "distinct": 3,
        "distinct_is_lower_bound": False,
        "top": [["Paris", 3], ["Lyon", 1], ["Nice", 1]],
    }


def test_csv_preview_is_the_first_20_rows_typed_and_json_safe(tmp_path):
    rows = "".join(f"{index},{index / 2},{'yes' if index % 2 else ''}\n" for index in range(30))
    path = write_text(tmp_path, "n,half,flag\n" + rows)

    preview = inspect_dataset(path).preview

    assert len(preview) == 20
    assert preview[0] == {"n": 0, "half": 0.0, "flag": None}
    assert preview[19] == {"n": 19, "half": 9.5, "flag": "yes"}


def test_csv_types_widen_int_to_float_to_string(tmp_path):
    path = write_text(tmp_path, "a,b,c\n1,1,1\n2,2.5,x\n3,3,2.5\n")

    schema = {column["name"]: column["dtype"] for column in inspect_dataset(path).schema}

    assert schema == {"a": "int64", "b": "float64", "c": "string"}


def test_csv_column_that_widens_to_string_keeps_counts_from_its_first_row(tmp_path):
    path = write_text(tmp_path, "code\n7\n7\n7\nA12\n")

    profile = inspect_dataset(path).profile["code"]

    assert profile["top"] == [["7", 3], ["A12", 1]]
    assert "mean" not in profile


def test_csv_bool_and_datetime_columns(tmp_path):
    path = write_text(
        tmp_path,
        "active,seen\ntrue,2024-03-01\nFalse,2024-01-15T08:30:00\nTRUE,\ntrue,2024-02-01 12:00\n",
    )

    inspection = inspect_dataset(path)

    assert [column["dtype"] for column in inspection.schema] == ["bool", "datetime"]
    assert inspection.profile["active"]["top"] == [[True, 3], [False, 1]]
    assert inspection.profile["seen"] == {
        "count": 3,
        "nulls": 1,
        "min": "2024-01-15T08:30:00",
        "max": "2024-03-01T00:00:00",
    }
    assert inspection.preview[1] == {"active": False, "seen": "2024-01-15T08:30:00"}


def test_csv_cells_are_typed_as_python_reads_each_one(tmp_path):
    """Blocks are typed with Arrow, but each cell gets the type `int()`, `float()` and
    `datetime.fromisoformat` give it; blocks Arrow cannot decide exactly (an integer past
    int64, a date that does not exist) fall back to typing cell by cell."""
    path = write_text(
        tmp_path,
        "signed,big,edge,sci,when,zoned,nonsense,nan\n"
        "+5,1,9223372036854775807,1e3,2024-01-01,2024-01-01T10:00:05+05:30,2024-02-01,NAN\n"
        "007,99999999999999999999,-9223372036854775808,-Infinity,2024-01-01 10:00,"
        "2024-01-01T00:00:05Z,2024-02-30,nan\n",
    )

    inspection = inspect_dataset(path)

    dtypes = {column["name"]: column["dtype"] for column in inspection.schema}
    assert dtypes == {
        "signed": "int64",
        "big": "float64",
        "edge": "int64",
        "sci": "float64",
        "when": "datetime",
        "zoned": "datetime",
        "nonsense": "string",
        "nan": "string",
    }
    profile = inspection.profile
    assert (profile["signed"]["min"], profile["signed"]["max"]) == (5, 7)
    assert (profile["edge"]["min"], profile["edge"]["max"]) == (-(2**63), 2**63 - 1)
    assert profile["big"]["max"] == 1e20
    assert (profile["sci"]["non_finite"], profile["sci"]["max"]) == (1, 1000.0)
    assert (profile["zoned"]["min"], profile["zoned"]["max"]) == (
        "2024-01-01T00:00:05",
        "2024-01-01T04:30:05",
    )
    assert profile["nonsense"]["top"] == [["2024-02-01", 1], ["2024-02-30", 1]]
    # "nan" is a missing value; "NAN" is not one, nor a number.
    assert (profile["nan"]["count"], profile["nan"]["nulls"]) == (1, 1)


def test_csv_histogram_counts_sum_to_the_sample_size(tmp_path):
    values = np.random.default_rng(7).normal(50, 10, size=25_000)
    lines = "".join(f"{value:.4f}\n" for value in values)
    path = write_text(tmp_path, "value\n" + lines)

    histogram = inspect_dataset(path).profile["value"]["histogram"]

    assert histogram["sample_size"] == 10_000
    assert sum(histogram["counts"]) == 10_000
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1


def test_csv_distinct_count_past_the_cap_is_marked_a_lower_bound(tmp_path):
    lines = "".join(f"user-{index}\n" for index in range(12_000))
    path = write_text(tmp_path, "user\n" + lines + "user-1\n")

    profile = inspect_dataset(path).profile["user"]

    assert profile["distinct"] == 10_000
    assert profile["distinct_is_lower_bound"] is True
    assert profile["top"][0] == ["user-1", 2]


def test_csv_semicolons_and_a_byte_order_mark_are_understood(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffname;price\nTea;2,5\nCoffee;3\n".encode())

    inspection = inspect_dataset(path)

    assert [column["name"] for column in inspection.schema] == ["name", "price"]
    assert inspection.row_count == 2


def test_single_column_csv_is_accepted(tmp_path):
    path = write_text(tmp_path, "label\ncat\ndog\ncat\n")

    assert inspect_dataset(path).profile["label"]["top"] == [["cat", 2], ["dog", 1]]


def test_csv_quoted_fields_may_hold_delimiters_and_line_breaks(tmp_path):
    path = write_text(tmp_path, 'id,comment\n1,"fine, thanks"\n2,"two\nlines"\n3,plain\n')

    inspection = inspect_dataset(path)

    assert inspection.row_count == 3
    assert inspection.preview[1] == {"id": 2, "comment": "two\nlines"}


def test_csv_row_with_a_wrong_column_count_is_named(tmp_path):
    path = write_text(tmp_path, "a,b,c\n1,2,3\n1,2,3\n1,2,3\n1,2,3\n1,2,3\n1,2,3,4\n")

    reject(path, r"Row 7 has 4 columns but the header has 3; fix the row")


def test_csv_row_over_the_cell_limit_is_refused(tmp_path):
    path = write_text(tmp_path, "id,text\n1,short\n2," + "y" * (4 * 1024**2 + 10) + "\n")

    reject(path, r"Row 3 of the CSV has a value of 4,194,314 bytes in column 'text'")
    path = write_text(tmp_path, "id,text\n1,short\n2," + "y" * (20 * 1024**2) + "\n")
    reject(path, r"A row after row 2 of the CSV is longer than 8 MiB")


def test_csv_invalid_utf8_after_the_sniffed_head_is_rejected(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"id\n" + b"1\n" * 40_000 + b"caf\xe9\n")

    reject(path, r"not valid UTF-8 on line 40002; re-export it as UTF-8")


@pytest.mark.parametrize("text", ["", "\n\n", "a,b,c\n"], ids=["empty", "blank", "header-only"])
def test_csv_without_data_rows_is_rejected(tmp_path, text):
    reject(write_text(tmp_path, text), r"(empty|no data rows)")


def test_csv_header_must_name_every_column_once(tmp_path):
    reject(write_text(tmp_path, "a,b,a\n1,2,3\n"), r"names 'a' more than once")
    reject(write_text(tmp_path, "a,,c\n1,2,3\n"), r"Column 2 has no name")
    reject(write_text(tmp_path, "1,2,3\n4,5,6\n"), r"looks like data rather than a header")


def test_csv_over_the_row_limit_is_rejected(tmp_path):
    path = write_text(tmp_path, "n\n" + "1\n" * 11)

    reject(path, r"more than 10 rows", limits=DatasetLimits(max_rows=10))


def test_csv_over_the_column_limit_is_rejected(tmp_path):
    header = ",".join(f"c{index}" for index in range(6))
    path = write_text(tmp_path, f"{header}\n" + ",".join("1" * 6) + "\n")

    reject(path, r"6 columns; we accept at most 5", limits=DatasetLimits(max_columns=5))


def test_csv_inspection_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.csv"
    padding = "x" * 400
    with path.open("w", encoding="utf-8") as file:
        file.write("id,value,category,note\n")
        for index in range(150_000):
            file.write(f"{index},{index * 0.5:.3f},c{index % 7},note {index % 50_000} {padding}\n")
    assert path.stat().st_size > 60 * 1024**2

    tracemalloc.start()
    try:
        inspection = inspect_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert inspection.row_count == 150_000
    assert inspection.profile["id"]["max"] == 149_999
    assert inspection.profile["note"]["distinct_is_lower_bound"] is True
    assert peak < 30 * 1024**2, f"peak traced memory {peak / 1024**2:.1f} MiB"


# --- sniffing and declared formats ---------------------------------------------------------------


def test_sniff_format_reads_the_content_not_the_name(tmp_path):
    table = pa.table({"x": [1, 2]})
    np.savez(tmp_path / "arrays.npz", x=np.arange(3))
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.bin")

    assert sniff_format(write_text(tmp_path, "a,b\n1,2\n", name="data.parquet")) == "csv"
    assert sniff_format(write_parquet(tmp_path, table, name="data.csv")) == "parquet"
    assert sniff_format(tmp_path / "arrays.bin") == "npz"
    assert sniff_format(write_zip(tmp_path, image_entries(), name="x.npz")) == "image_folder_zip"


def test_csv_named_file_holding_parquet_is_rejected(tmp_path):
    path = write_parquet(tmp_path, pa.table({"x": [1, 2]}), name="data.csv")

    reject(path, r"says \.csv but its content is Parquet", declared_format="csv")


def test_parquet_named_file_holding_csv_is_rejected(tmp_path):
    path = write_text(tmp_path, "a,b\n1,2\n", name="data.parquet")

    reject(path, r"says \.parquet but its content is CSV", declared_format="parquet")


def test_declared_format_that_matches_is_accepted(tmp_path):
    path = write_zip(tmp_path, image_entries())

    assert inspect_dataset(path, declared_format=".zip").format == "image_folder_zip"
    assert inspect_dataset(path, declared_format="image_folder_zip").row_count == 5


def test_unknown_declared_format_is_rejected(tmp_path):
    reject(
        write_text(tmp_path, "a\n1\n"), r"'xlsx' is not a dataset format", declared_format="xlsx"
    )


def test_binary_garbage_is_rejected(tmp_path):
    path = tmp_path / "noise.csv"
    path.write_bytes(np.random.default_rng(1).bytes(4096))

    reject(path, r"not a CSV, Parquet, \.npz or zip of images")


def test_text_with_control_characters_is_rejected(tmp_path):
    path = tmp_path / "dump.csv"
    path.write_bytes(b"a,b\n1,2\x00\x01\n")

    reject(path, r"not a CSV, Parquet")


def test_file_over_the_byte_limit_is_rejected_before_reading(tmp_path):
    path = write_text(tmp_path, "a\n" + "1\n" * 100)

    reject(path, r"over our limit of 100", limits=DatasetLimits(max_bytes=100))


# --- Parquet -------------------------------------------------------------------------------------


def test_parquet_schema_profile_and_preview(tmp_path):
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int32()),
            "score": pa.array([0.5, None, 1.5, 2.5], pa.float64()),
            "city": pa.array(["Paris", "Lyon", "Paris", None]),
            "active": pa.array([True, False, True, True]),
            "seen": pa.array([1_000_000_001, 2, 3, 4], pa.timestamp("ns", tz="UTC")),
            "tags": pa.array([["a"], [], ["b", "c"], None]),
        }
    )
    path = write_parquet(tmp_path, table)

    inspection = inspect_dataset(path)

    assert inspection.row_count == 4
    assert [(column["name"], column["dtype"]) for column in inspection.schema] == [
        ("id", "int64"),
        ("score", "float64"),
        ("city", "string"),
        ("active", "bool"),
        ("seen", "datetime"),
        ("tags", "list"),
    ]
    assert [column["nullable"] for column in inspection.schema] == [
        False,
        True,
        True,
        False,
        False,
        True,
    ]
    profile = inspection.profile
    assert (profile["id"]["mean"], profile["id"]["min"], profile["id"]["max"]) == (2.5, 1, 4)
    assert profile["score"]["count"] == 3 and profile["score"]["nulls"] == 1
    assert profile["score"]["mean"] == pytest.approx(1.5)
    assert profile["city"]["top"] == [["Paris", 2], ["Lyon", 1]]
    assert profile["active"]["top"] == [[True, 3], [False, 1]]
    assert profile["seen"]["max"] == "1970-01-01T00:00:01"
    assert profile["tags"] == {"count": 3, "nulls": 1}
    assert inspection.preview[0] == {
        "id": 1,
        "score": 0.5,
        "city": "Paris",
        "active": True,
        "seen": "1970-01-01T00:00:01+00:00",
        "tags": ["a"],
    }


@pytest.mark.parametrize(
    "options",
    [
        {"data_page_version": "2.0", "compression": "gzip"},
        {"compression": "zstd", "data_page_size": 1024, "write_statistics": True},
        {"compression": "snappy", "use_dictionary": False, "row_group_size": 700},
    ],
    ids=["v2-pages", "many-small-pages", "plain-row-groups"],
)
def test_parquet_pages_of_every_common_layout_pass_the_page_walk(tmp_path, options):
    """The page headers are read before decoding; every layout writers produce must pass."""
    rows = 3_000
    table = pa.table(
        {
            "n": list(range(rows)),
            "text": [f"value {index % 97} " * 3 for index in range(rows)],
            "tags": [[f"t{index % 5}", "x"] for index in range(rows)],
            "point": [{"x": float(index), "label": "p"} for index in range(rows)],
        }
    )
    inspection = inspect_dataset(write_parquet(tmp_path, table, **options))
    assert inspection.row_count == rows
    assert inspection.profile["text"]["distinct"] == 97
    assert inspection.preview[1]["tags"] == ["t1", "x"]


def test_parquet_text_preview_is_cut_and_cells_over_the_limit_are_refused(tmp_path):
    long = "word " * 1_000
    path = write_parquet(tmp_path, pa.table({"text": [long, "short"]}))
    assert inspect_dataset(path).preview[0]["text"] == long[:1_000] + "…"

    huge = write_parquet(tmp_path, pa.table({"text": ["x" * (4 * 1024**2 + 1)]}), "huge.parquet")
    reject(huge, r"column 'text' holds a value of 4,194,305 bytes")


def test_parquet_statistics_merge_exactly_across_row_groups(tmp_path):
    values = [float(index % 97) for index in range(10_000)]
    path = write_parquet(tmp_path, pa.table({"v": values}), row_group_size=1_000)

    profile = inspect_dataset(path).profile["v"]

    assert pq.ParquetFile(path).metadata.num_row_groups == 10
    assert profile["count"] == 10_000
    assert profile["mean"] == pytest.approx(statistics.fmean(values))
    assert profile["std"] == pytest.approx(statistics.stdev(values))
    assert sum(profile["histogram"]["counts"]) == profile["histogram"]["sample_size"] == 10_000


def test_parquet_nan_is_counted_apart_from_the_statistics(tmp_path):
    path = write_parquet(tmp_path, pa.table({"v": [1.0, float("nan"), 3.0, float("inf")]}))

    profile = inspect_dataset(path).profile["v"]

    assert (profile["count"], profile["non_finite"], profile["mean"]) == (4, 2, 2.0)


def test_truncated_parquet_is_rejected(tmp_path):
    whole = write_parquet(tmp_path, pa.table({"x": list(range(100))})).read_bytes()
    path = tmp_path / "cut.parquet"
    path.write_bytes(whole[: len(whole) // 2])

    reject(path, r"no Parquet footer")


def test_parquet_without_rows_is_rejected(tmp_path):
    path = write_parquet(tmp_path, pa.table({"x": pa.array([], pa.int64())}))

    reject(path, r"has no rows")


def test_parquet_over_the_row_limit_is_rejected_from_its_footer(tmp_path):
    path = write_parquet(tmp_path, pa.table({"x": list(range(11))}))

    reject(path, r"more than 10 rows", limits=DatasetLimits(max_rows=10))


# --- .npz ----------------------------------------------------------------------------------------


def test_npz_schema_profile_and_preview(tmp_path):
    path = tmp_path / "train.npz"
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.savez(
        path, x=features, y=np.array(["a", "b", "a", "a", "c", "b"]), pixels=np.ones((6, 8, 8))
    )

    inspection = inspect_dataset(path)

    assert inspection.format == "npz"
    assert inspection.row_count == 6
    assert inspection.schema == [
        {"name": "x", "dtype": "float32", "shape": [6, 2], "nullable": False},
        {"name": "y", "dtype": "string", "shape": [6], "nullable": False},
        {"name": "pixels", "dtype": "float64", "shape": [6, 8, 8], "nullable": False},
    ]
    x = inspection.profile["x"]
    assert (x["count"], x["mean"], x["min"], x["max"]) == (12, 5.5, 0.0, 11.0)
    assert x["std"] == pytest.approx(float(features.std(ddof=1)))
    assert inspection.profile["y"]["top"] == [["a", 3], ["b", 2], ["c", 1]]
    assert inspection.preview[1] == {"x": [2.0, 3.0], "y": "b", "pixels": "<float64 array 8x8>"}


def test_compressed_npz_with_a_fortran_ordered_array_previews_rows_correctly(tmp_path):
    path = tmp_path / "f.npz"
    matrix = np.asfortranarray(np.arange(60, dtype=np.int64).reshape(30, 2))
    np.savez_compressed(path, m=matrix)

    inspection = inspect_dataset(path)

    assert [row["m"] for row in inspection.preview] == matrix[:20].tolist()
    assert inspection.profile["m"]["mean"] == pytest.approx(29.5)


def test_npz_with_python_objects_is_rejected_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.arange(2), payload=np.array([{"a": 1}, None], dtype=object))

    reject(path, r"holds Python objects, which we never unpickle; save numeric arrays only")


def test_npz_arrays_must_agree_on_row_count(tmp_path):
    path = tmp_path / "ragged.npz"
    np.savez(path, x=np.zeros((5, 3)), y=np.zeros(4))

    reject(path, r"'y' has 4 rows but 'x' has 5")


def test_a_zip_entry_expanding_past_its_declared_size_is_stopped_as_it_is_read():
    """zipfile cuts a deflate entry at its declared size; the meter does not rely on that."""
    info = zipfile.ZipInfo("x.npy")
    info.file_size, info.compress_size = 10, 10
    meter = ExpansionMeter(archive_bytes=100, limits=DatasetLimits())
    meter.count(info, 10, 10)
    with pytest.raises(DatasetFormatError, match=r"expands past the 10 bytes its header"):
        meter.count(info, 11, 1)


def test_a_zip_expanding_past_its_budget_is_stopped_as_it_is_read():
    """Entries may overlap in the file, each within the ratio on its own: the archive's total is
    held to 200 times the real file size as it is read."""
    meter = ExpansionMeter(archive_bytes=10_000, limits=DatasetLimits())
    for index in range(10):
        info = zipfile.ZipInfo(f"{index}.npy")
        info.file_size, info.compress_size = 1_000_000, 10_000
        if index < 2:
            meter.count(info, 1_000_000, 1_000_000)
        else:
            with pytest.raises(DatasetFormatError, match=r"expand to more than 3,000,000"):
                meter.count(info, 1_000_000, 1_000_000)
            break


def test_npz_over_the_uncompressed_limit_is_rejected_from_its_headers(tmp_path):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros(1_000))

    reject(
        path,
        r"expands to 8,128 bytes, over our limit of 4,000",
        limits=DatasetLimits(max_uncompressed_bytes=4_000),
    )


def test_npz_header_that_lies_about_its_shape_is_rejected(tmp_path):
    header = np.lib.format.header_data_from_array_1_0(np.zeros(10))
    header["shape"] = (10**9,)
    entry = tmp_path / "x.npy"
    with entry.open("wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        file.write(np.zeros(10).tobytes())
    path = write_zip(tmp_path, {"x.npy": entry.read_bytes()}, name="forged.npz")

    reject(path, r"truncated or damaged")


def test_npz_entry_escaping_the_archive_is_rejected(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(3))
    path = write_zip(tmp_path, {"../x.npy": (tmp_path / "x.npy").read_bytes()}, name="a.npz")

    reject(path, r"points outside the archive")


# --- zips of images ------------------------------------------------------------------------------


def test_image_zip_classes_sizes_and_preview(tmp_path):
    path = write_zip(tmp_path, image_entries())

    inspection = inspect_dataset(path)

    assert inspection.format == "image_folder_zip"
    assert inspection.row_count == 5
    assert inspection.schema == [
        {"name": "image", "dtype": "image", "nullable": False},
        {"name": "label", "dtype": "string", "nullable": False},
    ]
    assert inspection.profile["classes"] == {"cat": 2, "dog": 3}
    sizes = inspection.profile["image_sizes"]
    assert sizes["width"] == {"min": 8, "max": 640, "mean": (32 + 640 + 10 + 8 + 100) / 5}
    assert sizes["height"] == {"min": 6, "max": 480, "mean": (24 + 480 + 20 + 6 + 50) / 5}
    assert sizes["formats"] == {"bmp": 1, "gif": 1, "jpeg": 1, "png": 1, "webp": 1}
    assert inspection.preview[0] == {"path": "cat/001.png", "label": "cat"}


def test_image_zip_wrapped_in_one_folder_with_mac_clutter(tmp_path):
    entries = {f"pets/{name}": data for name, data in image_entries().items()}
    entries["__MACOSX/pets/._001.png"] = b"resource fork"
    entries["pets/cat/.DS_Store"] = b"finder"
    path = write_zip(tmp_path, entries)

    inspection = inspect_dataset(path)

    assert inspection.profile["classes"] == {"cat": 2, "dog": 3}
    assert inspection.preview[0]["path"] == "cat/001.png"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.png", "points outside the archive"),
        ("cat/../../evil.png", "points outside the archive"),
        ("/abs.png", "has an absolute path"),
        ("C:/abs.png", "has an absolute path"),
        ("cat\\evil.png", "uses backslashes"),
    ],
)
def test_image_zip_with_an_escaping_name_is_rejected(tmp_path, name, message):
    entries = image_entries()
    entries[name] = png_bytes(1, 1)
    path = write_zip(tmp_path, entries)

    reject(path, message)


def test_image_zip_with_a_symlink_entry_is_rejected(tmp_path):
    path = write_zip(tmp_path, image_entries())
    link = zipfile.ZipInfo("cat/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(link, "/etc/passwd")

    reject(path, r"'cat/link.png' is a symbolic link")


def test_image_zip_with_a_bomb_like_entry_is_rejected(tmp_path):
    entries = image_entries()
    entries["cat/bomb.png"] = b"\x89PNG\r\n\x1a\n" + bytes(20 * 1024**2)
    path = write_zip(tmp_path, entries)

    reject(path, r"'cat/bomb.png' compresses more than 200:1")


def test_image_zip_with_an_image_the_worker_would_refuse_is_rejected_at_upload(tmp_path):
    """The worker decodes at most 40 megapixels an image; the registry draws the same line."""
    entries = image_entries()
    entries["cat/huge.jpg"] = jpeg_bytes(8_000, 6_000)

    reject(write_zip(tmp_path, entries), r"'cat/huge.jpg' is 8000 x 6000 pixels, over our limit")


def test_image_zip_with_too_many_entries_is_rejected_before_parsing(tmp_path):
    entries = {f"cat/{index}.png": png_bytes(1, 1) for index in range(6)}
    path = write_zip(tmp_path, entries)

    reject(path, r"more than 5 entries", limits=DatasetLimits(max_archive_entries=5))


def test_image_zip_over_the_image_and_total_size_limits_is_rejected(tmp_path):
    path = write_zip(tmp_path, image_entries())

    total = sum(len(data) for data in image_entries().values())

    reject(path, r"'cat/002.jpg' is 1,045 bytes", limits=DatasetLimits(max_image_bytes=1_000))
    reject(path, f"expands to {total:,} bytes", limits=DatasetLimits(max_uncompressed_bytes=1_000))


def test_image_zip_nested_too_deep_is_rejected(tmp_path):
    entries = image_entries()
    entries["cat/kittens/003.png"] = png_bytes(2, 2)
    path = write_zip(tmp_path, entries)

    reject(path, r"'cat/kittens/003.png' is nested more than one folder deep")


def test_image_zip_with_a_loose_file_is_rejected(tmp_path):
    entries = image_entries()
    entries["readme.png"] = png_bytes(2, 2)

    reject(write_zip(tmp_path, entries), r"'readme.png' is not inside a class folder")


def test_image_zip_with_a_non_image_file_names_it(tmp_path):
    entries = image_entries()
    entries["dog/notes.txt"] = b"good dogs"

    reject(write_zip(tmp_path, entries), r"'dog/notes.txt' is not a PNG, JPEG, GIF, BMP or WebP")


def test_image_zip_needs_two_classes_each_with_images(tmp_path):
    one_class = {"cat/1.png": png_bytes(1, 1), "cat/2.png": png_bytes(1, 1)}
    reject(write_zip(tmp_path, one_class, name="one.zip"), r"only one class folder \('cat'\)")

    path = write_zip(tmp_path, image_entries(), name="empty-class.zip")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(zipfile.ZipInfo("bird/"), b"")
    reject(path, r"class folder 'bird' holds no images")


def test_encrypted_entry_is_rejected(tmp_path):
    entries = image_entries()
    entries["dog/secret.png"] = png_bytes(1, 1)
    path = write_zip(tmp_path, entries)
    data = bytearray(path.read_bytes())
    last_directory_record = data.rfind(b"PK\x01\x02")
    data[last_directory_record + 8] |= 0x1  # the "encrypted" flag bit of the last entry
    path.write_bytes(bytes(data))

    reject(path, r"password-protected")


# --- drift ---------------------------------------------------------------------------------------


def _profile_of(tmp_path: Path, name: str, means: tuple[float, float], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    stable, shifted = rng.normal(means[0], 1, 5_000), rng.normal(means[1], 1, 5_000)
    kinds = rng.choice(list("abc"), 5_000)
    rows = "".join(
        f"{a:.5f},{b:.5f},{kind}\n" for a, b, kind in zip(stable, shifted, kinds, strict=True)
    )
    return inspect_dataset(write_text(tmp_path, "stable,shifted,kind\n" + rows, name)).profile


def test_compare_profiles_flags_a_shifted_column_and_not_a_stable_one(tmp_path):
    old = _profile_of(tmp_path, "old.csv", (0.0, 0.0), seed=1)
    new = _profile_of(tmp_path, "new.csv", (0.0, 2.0), seed=2)

    drift = compare_profiles(old, new)

    assert drift["drifted_columns"] == ["shifted"]
    assert drift["columns"]["shifted"]["mean_shift_std"] == pytest.approx(2.0, abs=0.1)
    assert drift["columns"]["shifted"]["psi"] > 1.0
    assert abs(drift["columns"]["stable"]["mean_shift_std"]) < 0.1
    assert drift["columns"]["stable"]["psi"] < 0.1
    assert drift["columns"]["kind"]["psi"] < 0.1
    assert drift["added_columns"] == drift["removed_columns"] == []


def test_compare_profiles_reports_columns_nulls_and_category_shifts():
    old = {
        "kept": {"count": 90, "nulls": 10, "distinct": 2, "top": [["a", 45], ["b", 45]]},
        "gone": {"count": 1, "nulls": 0},
    }
    new = {
        "kept": {"count": 70, "nulls": 30, "distinct": 2, "top": [["a", 65], ["b", 5]]},
        "fresh": {"count": 1, "nulls": 0},
    }

    drift = compare_profiles(old, new)

    assert drift["added_columns"] == ["fresh"]
    assert drift["removed_columns"] == ["gone"]
    kept = drift["columns"]["kept"]
    assert kept["null_rate_change"] == pytest.approx(0.2)
    assert kept["psi"] > 0.25
    assert drift["drifted_columns"] == ["kept"]


def test_compare_profiles_reads_image_classes_as_a_label_column():
    sizes = {"width": {}, "height": {}, "formats": {}}
    old = {"classes": {"cat": 50, "dog": 50}, "image_sizes": sizes}
    new = {"classes": {"cat": 90, "dog": 10}, "image_sizes": sizes}

    assert compare_profiles(old, new)["drifted_columns"] == ["label"]


def test_quoted_cells_with_quotes_and_line_breaks_are_read_as_standard_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        'text,label\n"He said ""great""\nand left",positive\n"Plain, with a comma",negative\n'
        '"Another ""quoted"" one",neutral\n',
        encoding="utf-8",
    )
    inspection = inspect_dataset(path)
    assert inspection.row_count == 3
    assert inspection.preview[0]["text"] == 'He said "great"\nand left'
