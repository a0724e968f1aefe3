import io
import zipfile

import numpy as np
import pytest
from django.test import override_settings
from safetensors.numpy import save as save_safetensors

from registry.storage import get_storage


@pytest.fixture
def local_store(tmp_path, settings):
    """Local-directory storage under a fresh folder; returns that folder."""
    root = tmp_path / "storage"
    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(root)):
        get_storage()  # built from the overridden settings
        yield root


def stored_files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def csv_bytes():
    return b"age,city,score\n31,Paris,0.5\n45,Lyon,0.75\n27,Paris,\n"


@pytest.fixture
def weights_bytes():
    return save_safetensors({"linear.weight": np.arange(6, dtype=np.float32).reshape(2, 3)})


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()
