"""Uploads built to make the platform inspect far more than was sent: .npz zip bombs, zip
members whose headers lie about their sizes, a Parquet footer that understates its pages, a
Parquet file with one enormous cell. Each goes through the upload API as an attacker sends it
and must be refused with a clear reason, quickly, in bounded memory, leaving nothing behind:
at once with a 400 where the file's ends give it away, else by the background check the
upload owes (run here in this process, as a worker runs it), which rejects the version.

Memory is the process's peak resident set, reset before the upload (Linux `clear_refs`), so it
counts what Arrow, zlib and bz2 allocate outside Python's heap too; it spans the request and
the check."""

import bz2
import io
import re
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from numpy.lib import format as npy_format

from registry.models import DatasetVersion, StorageAccount
from tests.registry import conftest as registry_fixtures
from tests.registry.conftest import check_uploads, stored_files

pytestmark = pytest.mark.django_db

MIB = 1024**2
# Refusing must cost a fraction of what the bomb asks for: no decompression, no decoding.
MAX_SECONDS = 10.0
MAX_PEAK_GROWTH = 128 * MIB

local_store = registry_fixtures.local_store


@pytest.fixture
def dev_client(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


class Peak:
    growth = 0


@contextmanager
def peak_memory_growth():
    """How far the process's peak resident set rose above where it stood when entered."""

    def status(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from now
    before = status("VmRSS")
    peak = Peak()
    yield peak
    peak.growth = status("VmHWM") - before


def attack(client, org, content: bytes, filename: str):
    """Upload `content` as a new dataset's first version and run the check it owes; the
    response, and the time and memory of the request and the check together."""
    created = client.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": "loot"}, format="json")
    assert created.status_code == 201
    upload = SimpleUploadedFile(filename, content)
    started = time.monotonic()
    with peak_memory_growth() as peak:
        response = client.post(
            f"/api/v1/orgs/{org.slug}/datasets/loot/versions/",
            {"file": upload},
            format="multipart",
        )
        check_uploads()
    return response, time.monotonic() - started, peak.growth


def assert_refused(response, seconds, growth, local_store, org, message: str):
    assert seconds < MAX_SECONDS, f"answering and checking took {seconds:.1f} s"
    assert growth < MAX_PEAK_GROWTH, f"peak memory grew {growth / MIB:.0f} MiB"
    if response.status_code == 400:
        body = response.json()
        assert body["code"] == "invalid_dataset"
        reason = body["detail"]
        assert not DatasetVersion.objects.exists()
    else:
        assert response.status_code == 201, response.content[:300]
        version = DatasetVersion.objects.get()
        assert (version.state, version.storage_key) == ("rejected", None)
        reason = version.rejection_reason
    assert re.search(message, reason), reason
    assert stored_files(local_store) == []
    account = StorageAccount.objects.filter(organization=org).first()
    assert account is None or account.used_bytes == 0


# Hand-made zips: a member's bytes, method and sizes exactly as the attacker writes them.


def raw_zip(members: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip of (name, method, stored bytes, crc, declared uncompressed size) members."""
    out, directory = io.BytesIO(), io.BytesIO()
    for name, method, data, crc, declared in members:
        offset = out.tell()
        encoded = name.encode()
        out.write(
            struct.pack(
                "<4s5H3L2H",
                b"PK\x03\x04",
                20,
                0,
                method,
                0,
                0x21,
                crc,
                len(data),
                declared,
                len(encoded),
                0,
            )
            + encoded
            + data
        )
        directory.write(
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0,
                method,
                0,
                0x21,
                crc,
                len(data),
                declared,
                len(encoded),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + encoded
        )
    start, size = out.tell(), directory.tell()
    out.write(directory.getvalue())
    out.write(
        struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), size, start, 0)
    )
    return out.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def test_an_npz_that_inflates_to_gigabytes_is_refused_before_inflating(
    org, dev_client, local_store
):
    """2.5 GiB of zeros in 2.6 MB (2,560 rows of 1 MiB): every header tells the truth, and the
    limits on rows and on uncompressed bytes (20 GiB) let it through to be decompressed and
    profiled inside the request."""
    mebibytes = 2_560
    header = npy_header((mebibytes, MIB))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = deflater.compress(header) + deflater.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the deflater starts afresh, so one MiB of zeros always compresses to
    # the same bytes, which can be repeated.
    block = deflater.compress(bytes(MIB)) + deflater.flush(zlib.Z_FULL_FLUSH)
    stream = start + block * mebibytes + deflater.flush()
    crc = zlib.crc32(header)
    zeros = bytes(MIB)
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    content = raw_zip([("x.npy", 8, stream, crc, len(header) + mebibytes * MIB)])
    assert len(content) < 3 * MIB

    response, seconds, growth = attack(dev_client, org, content, "arrays.npz")

    assert_refused(response, seconds, growth, local_store, org, r"compresses more than 200:1")


@pytest.fixture(scope="module")
def bzip2_bomb() -> tuple[bytes, int]:
    """A bzip2 stream of about 540 MB of zeros in a few hundred bytes: one full block of zeros,
    compressed once, then repeated bit for bit (blocks are independent; only the stream's
    combined checksum has to be recomputed). Returns (stream, uncompressed size)."""
    block_zeros = 45_000_000
    single = bz2.compress(bytes(block_zeros), 9)
    bits = "".join(f"{byte:08b}" for byte in single)
    end_magic = f"{0x177245385090:048b}"
    end = bits.rindex(end_magic)
    block = bits[32:end]
    block_crc = int(block[48:80], 2)
    copies = 12
    combined = 0
    for _ in range(copies):
        combined = (((combined << 1) | (combined >> 31)) & 0xFFFFFFFF) ^ block_crc
    stream = bits[:32] + block * copies + end_magic + f"{combined:032b}"
    stream += "0" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big")
    assert bz2.BZ2Decompressor().decompress(data, 1) == b"\x00"
    return data, block_zeros * copies


def test_an_npz_whose_member_lies_about_its_size_is_refused_before_reading_it(
    org, dev_client, local_store, bzip2_bomb
):
    """The zip's headers declare a 1 MiB array; the member is bzip2 that expands to 540 MB, and
    zipfile inflates a bzip2 read whole before cutting it to the declared size."""
    stream, _ = bzip2_bomb
    header = npy_header((MIB,))
    declared = len(header) + MIB
    crc = zlib.crc32(header + bytes(MIB))
    content = raw_zip([("x.npy", 12, stream, crc, declared)])

    response, seconds, growth = attack(dev_client, org, content, "arrays.npz")

    assert_refused(response, seconds, growth, local_store, org, r"compression method")


def test_an_image_zip_whose_member_lies_about_its_size_is_refused_before_reading_it(
    org, dev_client, local_store, bzip2_bomb
):
    stream, _ = bzip2_bomb
    content = raw_zip([("cats/a.png", 12, stream, 0, 4_096), ("dogs/b.png", 12, stream, 0, 4_096)])

    response, seconds, growth = attack(dev_client, org, content, "pets.zip")

    assert_refused(response, seconds, growth, local_store, org, r"compression method")


# Parquet


def overlong_varint(value: int, length: int) -> bytes:
    """`value` as a Thrift varint padded to `length` bytes (readers accept the extra zeros)."""
    out = bytearray()
    for _ in range(length - 1):
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value & 0x7F)
    return bytes(out)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        if value < 0x80:
            out.append(value)
            return bytes(out)
        out.append((value & 0x7F) | 0x80)
        value >>= 7


def understate_footer(path: Path, real: int, claimed: int) -> bytes:
    """The file with every footer field equal to `real` (the row group's and the column
    chunk's uncompressed sizes) rewritten as `claimed`, in the same number of bytes."""
    data = path.read_bytes()
    footer_length = struct.unpack("<I", data[-8:-4])[0]
    footer = data[-8 - footer_length : -8]
    encoded = varint(real * 2)  # Thrift i64 fields are zigzag varints
    assert footer.count(encoded) >= 2
    footer = footer.replace(encoded, overlong_varint(claimed * 2, len(encoded)))
    return data[: -8 - footer_length] + footer + data[-8:]


def test_a_parquet_footer_that_understates_its_pages_is_refused_before_decoding(
    org, dev_client, local_store, tmp_path
):
    """One page of 256 MiB of text, zstd-compressed to a few KB; the footer says the whole
    file expands to 1,000 bytes, so a check of the footer alone lets it through."""
    rows = 256
    path = tmp_path / "text.parquet"
    table = pa.table({"text": pa.array(["a" * MIB] * rows, pa.large_string())})
    pq.write_table(table, path, compression="zstd", use_dictionary=False, data_page_size=1024**3)
    real = pq.ParquetFile(path).metadata.row_group(0).total_byte_size
    assert real > rows * MIB
    content = understate_footer(path, real, 1_000)
    del table
    lying = tmp_path / "lying.parquet"
    lying.write_bytes(content)
    assert pq.ParquetFile(lying).metadata.row_group(0).total_byte_size == 1_000

    response, seconds, growth = attack(dev_client, org, content, "text.parquet")

    assert_refused(response, seconds, growth, local_store, org, r"page of column 'text'")


def test_a_parquet_file_with_one_enormous_cell_is_refused(org, dev_client, local_store, tmp_path):
    """An 8 MiB string among ordinary ones: today it is profiled, previewed and stored whole
    in the version's preview, served with every read of the version."""
    rng = np.random.default_rng(3)
    huge = "".join(map(chr, rng.integers(97, 123, 8 * MIB, dtype=np.int32).tolist()))
    path = tmp_path / "cells.parquet"
    table = pa.table({"id": list(range(50)), "note": ["short"] * 10 + [huge] + ["short"] * 39})
    pq.write_table(table, path, compression="none", use_dictionary=False)
    content = path.read_bytes()
    del table, huge

    response, seconds, growth = attack(dev_client, org, content, "cells.parquet")

    assert_refused(
        response, seconds, growth, local_store, org, r"column 'note' holds a value of 8,388,608"
    )


def test_a_parquet_value_repeated_on_every_row_is_refused_as_it_is_read(
    org, dev_client, local_store, tmp_path
):
    """A dictionary bomb: one 1 MiB value, and 24,000 rows that each point at it. The file is
    1 MiB and every page is small and honest; decoded, the column is 24 GiB. (Not run against
    the old code: it decodes the dictionary, which would take those 24 GiB at once.)"""
    rng = np.random.default_rng(5)
    value = "".join(map(chr, rng.integers(97, 123, MIB, dtype=np.int32).tolist()))
    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(24_000, np.int32)), [value])
    path = tmp_path / "repeated.parquet"
    pq.write_table(pa.table({"note": column}), path, compression="none")
    content = path.read_bytes()
    assert len(content) < 2 * MIB

    response, seconds, growth = attack(dev_client, org, content, "repeated.parquet")

    assert_refused(
        response, seconds, growth, local_store, org, r"values take more than [\d,]+ bytes as they"
    )
