"""Code packages, uploaded as an attacker would: hostile archives and manifests are refused with a
400 naming what is wrong and leave no row and no object behind; other tenants and keys without
`code:write` get nothing. Plus the happy path for a zip and a tar.gz."""

import gzip
import hashlib
import io
import stat
import tarfile
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from django.urls import reverse

from registry.formats.code_packages import parse_manifest
from registry.models import CodePackage, CodePackageVersion, StorageAccount
from tenants.models import AuditEvent
from tests.registry.conftest import stored_files

pytestmark = pytest.mark.django_db

MANIFEST = b"""
[package]
name = "tiny-cnn"
version = "0.1.0"

[entry]
train = "trainer.main:run"
predict = "trainer.serve:predict"

[runtime]
name = "torch-2.13-py311"

[outputs]
model = true

[parameters]
type = "object"
required = ["epochs"]
additionalProperties = false

[parameters.properties.epochs]
type = "integer"
minimum = 1
default = 10

[parameters.properties.lr]
type = "number"
exclusiveMinimum = 0
"""
CODE = {"trainer/__init__.py": b"", "trainer/main.py": b"def run(ctx):\n    pass\n"}


def make_zip(entries: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def make_tar_gz(entries: dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info)
    return buffer.getvalue()


def package(manifest: bytes = MANIFEST, **more: bytes) -> dict[str, bytes]:
    return {"factory.toml": manifest, **CODE, **more}


@pytest.fixture
def dev_client(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


def _upload(client, org, content: bytes, filename="pkg.zip", **extra):
    return client.post(
        f"/api/v1/orgs/{org.slug}/code-packages/",
        {"file": SimpleUploadedFile(filename, content), **extra},
        format="multipart",
    )


def _nothing_stored(org, local_store):
    assert not CodePackageVersion.objects.filter(organization=org).exists()
    assert not CodePackage.objects.filter(organization=org).exists()
    assert stored_files(local_store) == []
    used = StorageAccount.objects.filter(organization=org).values_list("used_bytes", flat=True)
    assert list(used) in ([], [0])


# The happy path.


@pytest.mark.parametrize(
    ("build", "filename", "archive_format"),
    [(make_zip, "pkg.zip", "zip"), (make_tar_gz, "pkg.tar.gz", "tar.gz")],
    ids=["zip", "tar.gz"],
)
def test_upload_records_versions_with_the_parsed_manifest(
    org, dev_client, local_store, build, filename, archive_format
):
    content = build(package())
    first = _upload(dev_client, org, content, filename, sha256=hashlib.sha256(content).hexdigest())
    assert first.status_code == 201, first.content
    body = first.json()
    assert (body["package"], body["number"], body["archive_format"]) == (
        "tiny-cnn",
        1,
        archive_format,
    )
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["size_bytes"] == len(content)
    manifest = body["manifest"]
    assert manifest["entry"] == {"train": "trainer.main:run", "predict": "trainer.serve:predict"}
    assert manifest["runtime"] == {"name": "torch-2.13-py311"}
    assert manifest["outputs"] == {"model": True, "dataset": False}
    assert manifest["parameters"]["properties"]["epochs"] == {
        "type": "integer",
        "minimum": 1,
        "default": 10,
    }
    assert _upload(dev_client, org, content, filename).json()["number"] == 2

    version = CodePackageVersion.objects.get(package__name="tiny-cnn", number=1)
    assert version.storage_key.startswith(f"orgs/{org.pk}/code/")
    assert (local_store / version.storage_key).read_bytes() == content
    assert StorageAccount.objects.get(organization=org).used_bytes == 2 * len(content)
    assert AuditEvent.objects.filter(organization=org, action="code_package.create").count() == 1
    assert (
        AuditEvent.objects.filter(organization=org, action="code_package.version_create").count()
        == 2
    )

    api = f"/api/v1/orgs/{org.slug}/code-packages/"
    listed = dev_client.get(api).json()["results"]
    assert [(p["name"], p["version_count"], p["latest_version"]) for p in listed] == [
        ("tiny-cnn", 2, 2)
    ]
    assert len(dev_client.get(f"{api}tiny-cnn/versions/").json()["results"]) == 2
    detail = dev_client.get(f"{api}tiny-cnn/versions/1/").json()
    assert detail["manifest"] == manifest
    download = dev_client.get(f"{api}tiny-cnn/versions/1/download/").json()
    assert download["sha256"] == body["sha256"]


def test_a_tar_made_from_inside_the_folder_has_its_manifest_at_the_root(
    org, dev_client, local_store
):
    """`tar czf pkg.tar.gz .` writes "./factory.toml"; that is the root too."""
    content = make_tar_gz({f"./{name}": data for name, data in package().items()})
    assert _upload(dev_client, org, content, "pkg.tar.gz").status_code == 201


def test_no_parameters_table_means_no_parameters():
    manifest = parse_manifest(MANIFEST.split(b"[parameters]")[0])
    assert manifest["parameters"] == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    assert manifest["package"]["version"] == "0.1.0"


def test_a_train_entry_naming_any_module_is_stored_since_it_only_runs_sandboxed(
    org, dev_client, local_store
):
    manifest = MANIFEST.replace(b'"trainer.main:run"', b'"os:system"')
    response = _upload(dev_client, org, make_zip(package(manifest)))
    assert response.status_code == 201, response.content
    assert response.json()["manifest"]["entry"]["train"] == "os:system"


# Hostile archives.


def _bomb_zip() -> bytes:
    """Deflated zeros: a few kilobytes that declare (truthfully) 50 MB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("factory.toml", MANIFEST)
        archive.writestr("weights.bin", b"\0" * (50 * 1024 * 1024))
    return buffer.getvalue()


def _lying_zip() -> bytes:
    """A bomb whose headers claim its entry is tiny: zipfile reads no further than the claim,
    and the entry's CRC then tells the lie."""
    content = bytearray(_bomb_zip())
    real = (50 * 1024 * 1024).to_bytes(4, "little")
    # The uncompressed size appears in the local header and in the central directory; say 1000.
    while (at := content.find(real)) >= 0:
        content[at : at + 4] = (1000).to_bytes(4, "little")
    return bytes(content)


def _bomb_tar_gz() -> bytes:
    return make_tar_gz(package(**{"weights.bin": b"\0" * (50 * 1024 * 1024)}))


def _tar_with(info_type: bytes, name: str, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = info_type
    info.linkname = linkname
    return make_tar_gz(package(), extra=[info])


def _zip_twice() -> bytes:
    """Two manifests: we would check one, an extractor would keep the other."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("factory.toml", MANIFEST.replace(b"trainer.main:run", b"safe:run"))
        with pytest.warns(UserWarning, match="Duplicate"):
            archive.writestr("factory.toml", MANIFEST)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (make_zip(package(**{"../../evil.py": b"x"})), "'..'"),
        (make_zip(package(**{"/etc/cron.d/evil": b"x"})), "absolute path"),
        (make_zip(package(), links={"passwd": "/etc/passwd"}), "symbolic link"),
        (_bomb_zip(), "bomb"),
        (_lying_zip(), "cannot be read"),
        (_zip_twice(), "twice"),
        (make_tar_gz(package(**{"../evil.py": b"x"})), "'..'"),
        (make_tar_gz(package(**{"/usr/lib/python3/evil.py": b"x"})), "absolute path"),
        (_tar_with(tarfile.SYMTYPE, "passwd", "/etc/passwd"), "link"),
        (_tar_with(tarfile.LNKTYPE, "shadow", "/etc/shadow"), "link"),
        (_tar_with(tarfile.CHRTYPE, "dev-null"), "not a regular file"),
        (_tar_with(tarfile.BLKTYPE, "sda"), "not a regular file"),
        (_tar_with(tarfile.FIFOTYPE, "pipe"), "not a regular file"),
        (_bomb_tar_gz(), "bomb"),
        (make_zip(CODE), "no factory.toml"),
        (make_zip({"wrapped/factory.toml": MANIFEST, **CODE}), "no factory.toml"),
        (b"#!/bin/sh\nrm -rf /\n", "neither a zip nor a tar.gz"),
        (b"\x1f\x8b\x08\x00 truncated gzip", "cannot be read"),
    ],
    ids=[
        "zip-traversal",
        "zip-absolute",
        "zip-symlink",
        "zip-bomb",
        "zip-lying-sizes",
        "zip-duplicate-entry",
        "tar-traversal",
        "tar-absolute",
        "tar-symlink",
        "tar-hardlink",
        "tar-char-device",
        "tar-block-device",
        "tar-fifo",
        "tar-gz-bomb",
        "no-manifest",
        "manifest-not-at-root",
        "not-an-archive",
        "broken-gzip",
    ],
)
def test_hostile_archives_are_400_and_leave_nothing_behind(
    org, dev_client, local_store, content, message
):
    response = _upload(dev_client, org, content)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid_code_package"
    assert message in response.json()["detail"]
    _nothing_stored(org, local_store)


# Hostile or mistaken manifests: each names the field at fault.


def _with(old: bytes, new: bytes) -> bytes:
    assert old in MANIFEST
    return MANIFEST.replace(old, new)


@pytest.mark.parametrize(
    ("manifest", "field", "message"),
    [
        (_with(b'"trainer.main:run"', b'"../../x:y"'), "entry.train", '"module:function"'),
        (_with(b'"trainer.main:run"', b'"a b:c"'), "entry.train", '"module:function"'),
        (_with(b'"trainer.main:run"', b'"trainer/main.py:run"'), "entry.train", "module"),
        (_with(b'"trainer.main:run"', b'"trainer.main"'), "entry.train", "module:function"),
        (_with(b'"trainer.main:run"', b'"trainer.main:run:x"'), "entry.train", "module"),
        (_with(b'"trainer.main:run"', b'"import:run"'), "entry.train", "module"),
        (_with(b'"trainer.main:run"', b'"tr\\u0430iner:run"'), "entry.train", "module"),
        (_with(b'train = "trainer.main:run"\n', b""), "entry.train", "is required"),
        (_with(b'"trainer.serve:predict"', b"42"), "entry.predict", "module:function"),
        (_with(b'name = "tiny-cnn"', b'name = "../Tiny CNN"'), "package.name", "lowercase"),
        (_with(b'name = "tiny-cnn"\n', b""), "package.name", "is required"),
        (_with(b'version = "0.1.0"', b"version = 1"), "package.version", "string"),
        (_with(b'name = "torch-2.13-py311"', b'name = "/usr/bin/python"'), "runtime.name", ""),
        (_with(b"model = true", b"model = false"), "outputs", "model = true"),
        (_with(b"model = true", b'model = "yes"'), "outputs.model", "true or false"),
        (_with(b"[outputs]", b"[outputs]\nweights = true"), "outputs.weights", "unknown key"),
        (_with(b"[runtime]", b"[scripts]\npost = 1\n[runtime]"), "scripts", "unknown table"),
        (_with(b'type = "object"', b'type = "array"'), "parameters.type", '"object"'),
        (_with(b"minimum = 1", b'minimum = "one"'), "parameters.properties.epochs.minimum", ""),
        (_with(b"minimum = 1", b"minimum = nan"), "parameters.properties.epochs.minimum", "finite"),
        (
            _with(b"default = 10", b"default = 2026-01-01"),
            "parameters.properties.epochs.default",
            "",
        ),
        (
            _with(b"minimum = 1", b'"$ref" = "https://attacker.example/schema.json"'),
            "parameters.properties.epochs.$ref",
            "inside the schema",
        ),
        (b"[package\nname = ", "factory.toml", "not valid TOML"),
        (b"\xff\xfe[package]", "factory.toml", "UTF-8"),
        (b"x = " + b"[" * 5000 + b"]" * 5000, "factory.toml", ""),
    ],
    ids=[
        "train-path-traversal",
        "train-space",
        "train-file-path",
        "train-no-function",
        "train-two-colons",
        "train-keyword",
        "train-non-ascii",
        "train-missing",
        "predict-not-string",
        "bad-package-name",
        "no-package-name",
        "version-not-string",
        "runtime-path",
        "no-outputs",
        "outputs-not-bool",
        "unknown-output",
        "unknown-table",
        "parameters-not-object",
        "schema-invalid",
        "schema-nan",
        "schema-date",
        "schema-remote-ref",
        "not-toml",
        "not-utf8",
        "toml-nesting",
    ],
)
def test_bad_manifests_are_400_naming_the_field_and_store_nothing(
    org, dev_client, local_store, manifest, field, message
):
    response = _upload(dev_client, org, make_zip(package(manifest)))
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid_code_package"
    assert field in body["fields"], body
    assert message in body["fields"][field][0], body
    assert body["detail"].startswith(f"factory.toml: {field}"), body
    _nothing_stored(org, local_store)


def test_a_deeply_nested_parameters_schema_is_refused():
    deep = b"[parameters]\ntype = 'object'\n[parameters" + b".a" * 40 + b"]\nx = 1\n"
    manifest = MANIFEST.split(b"[parameters]")[0] + deep
    with pytest.raises(Exception, match="nests deeper"):
        parse_manifest(manifest)


# Upload integrity and limits.


def test_a_sha256_mismatch_is_refused_and_stores_nothing(org, dev_client, local_store):
    content = make_zip(package())
    response = _upload(dev_client, org, content, sha256=hashlib.sha256(b"other").hexdigest())
    assert response.status_code == 400, response.content
    assert "sha256" in response.json()["fields"]
    _nothing_stored(org, local_store)


def test_an_oversize_package_is_refused_and_stores_nothing(org, dev_client, local_store):
    content = make_zip(package(**{"big.bin": bytes(range(256)) * 64}))
    with override_settings(CODE_PACKAGE_MAX_UPLOAD_BYTES=len(content) - 1):
        response = _upload(dev_client, org, content)
    assert response.status_code == 400, response.content
    assert "limit" in response.json()["detail"]
    _nothing_stored(org, local_store)


def test_a_package_over_the_storage_quota_is_refused(org, dev_client, local_store):
    StorageAccount.objects.create(organization=org, quota_bytes=100)
    response = _upload(dev_client, org, make_zip(package()))
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "storage_quota_exceeded"
    _nothing_stored(org, local_store)


# Who may see and upload.


def test_another_tenants_package_is_404(
    org, other_org, member_factory, client_for, dev_client, local_store
):
    assert _upload(dev_client, org, make_zip(package())).status_code == 201
    outsider = client_for(member_factory(other_org, "owner"))
    for path in [
        "tiny-cnn/",
        "tiny-cnn/versions/",
        "tiny-cnn/versions/1/",
        "tiny-cnn/versions/1/download/",
    ]:
        assert (
            outsider.get(f"/api/v1/orgs/{other_org.slug}/code-packages/{path}").status_code == 404
        )
    assert outsider.get(f"/api/v1/orgs/{other_org.slug}/code-packages/").json()["results"] == []
    # The same name in the outsider's own organization is its own package, not a new version.
    assert _upload(outsider, other_org, make_zip(package())).json()["number"] == 1
    assert CodePackageVersion.objects.filter(organization=org).count() == 1


def test_a_key_without_code_write_cannot_upload(org, owner, key_client_for, local_store):
    reader = key_client_for(owner, org, scopes=["code:read"])
    response = _upload(reader, org, make_zip(package()))
    assert response.status_code == 403, response.content
    _nothing_stored(org, local_store)
    writer = key_client_for(owner, org, scopes=["code:write"])
    assert _upload(writer, org, make_zip(package())).status_code == 201


def test_viewers_read_packages_but_cannot_upload(org, member_factory, client_for, local_store):
    viewer = client_for(member_factory(org, "viewer"))
    assert viewer.get(f"/api/v1/orgs/{org.slug}/code-packages/").status_code == 200
    assert _upload(viewer, org, make_zip(package())).status_code == 403
    _nothing_stored(org, local_store)


# The dashboard.


def test_upload_from_the_page_then_see_the_manifest_and_parameters(
    org, member_factory, client, local_store
):
    client.force_login(member_factory(org, "developer"))
    listing = reverse("registry:code_packages", args=[org.slug])
    assert b'enctype="multipart/form-data"' in client.get(listing).content
    response = client.post(listing, {"file": SimpleUploadedFile("pkg.zip", make_zip(package()))})
    version_url = reverse("registry:code_package_version", args=[org.slug, "tiny-cnn", 1])
    assert response.status_code == 302, response.content
    assert response["Location"] == version_url
    page = client.get(version_url).content.decode()
    assert "<code>trainer.main:run</code>" in page
    assert "<code>torch-2.13-py311</code>" in page
    assert "<code>epochs</code>" in page and "<code>10</code>" in page
    assert "&quot;exclusiveMinimum&quot;: 0" in page  # the schema in full
    assert "tiny-cnn" in client.get(listing).content.decode()
    package_page = client.get(reverse("registry:code_package", args=[org.slug, "tiny-cnn"]))
    assert "v1" in package_page.content.decode()


def test_a_bad_manifest_from_the_page_is_explained_and_stores_nothing(
    org, member_factory, client, local_store
):
    client.force_login(member_factory(org, "developer"))
    manifest = MANIFEST.replace(b'"trainer.main:run"', b'"../../x:y"')
    response = client.post(
        reverse("registry:code_packages", args=[org.slug]),
        {"file": SimpleUploadedFile("pkg.zip", make_zip(package(manifest)))},
    )
    assert response.status_code == 400
    assert "entry.train" in response.content.decode()
    _nothing_stored(org, local_store)


def test_a_viewer_sees_the_code_page_without_the_upload_form(
    org, member_factory, client, local_store
):
    client.force_login(member_factory(org, "viewer"))
    page = client.get(reverse("registry:code_packages", args=[org.slug]))
    assert page.status_code == 200
    assert b'enctype="multipart/form-data"' not in page.content


# The security review's attacks (each was a 201, a 500 or a gigabyte before).


def _hidden_behind_garbage() -> bytes:
    """A valid package, one garbage block, then a link and a traversal: Python's tarfile stops
    at the garbage by default, GNU tar skips it and unpacks the rest."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in package().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        archive.fileobj.write(b"\xde\xad" * 256)  # one 512-byte block no header reads
        link = tarfile.TarInfo("evil-link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        archive.addfile(link)
    return gzip.compress(buffer.getvalue())


def _long_pax_header() -> bytes:
    """A PAX header of 5 MB of one repeated byte: a few kilobytes compressed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("factory.toml")
        info.size = len(MANIFEST)
        info.pax_headers = {"comment": "x" * 5_000_000}
        archive.addfile(info, io.BytesIO(MANIFEST))
    return gzip.compress(buffer.getvalue())


def _case_twin() -> bytes:
    return make_zip({**package(), "FACTORY.TOML": MANIFEST})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_hidden_behind_garbage(), "link"),
        (_long_pax_header(), "extended header"),
        (_case_twin(), "twice"),
    ],
    ids=["tar-entries-behind-garbage", "tar-huge-pax-header", "zip-case-twin"],
)
def test_archives_that_hide_or_swell_are_400(org, dev_client, local_store, content, message):
    response = _upload(dev_client, org, content, filename="pkg.tar.gz")
    assert response.status_code == 400, response.content
    assert message in response.json()["detail"]
    _nothing_stored(org, local_store)


@pytest.mark.parametrize(
    ("new", "field"),
    [
        (b"minimum = " + b"1" * 5000, "manifest"),
        (b"minimum = 0x" + b"f" * 5000, "parameters.properties.epochs.minimum"),
        (b'description = "a\\u0000b"', "parameters.properties.epochs.description"),
        (b'pattern = "a{4294967296}"', "parameters.properties.epochs.pattern"),
        (b'pattern = "^(a+)+$"', "parameters.properties.epochs.pattern"),
        (b'"$dynamicRef" = "http://127.0.0.1:9/x"', "parameters.properties.epochs.$dynamicRef"),
        (b'"$schema" = "http://127.0.0.1:9/x"', "parameters.properties.epochs.$schema"),
    ],
    ids=["huge-int", "huge-hex", "nul", "regex-overflow", "redos", "dynamic-ref", "schema-uri"],
)
def test_manifest_values_that_crashed_or_fetched_are_400(org, dev_client, local_store, new, field):
    manifest = MANIFEST.replace(b"minimum = 1\n", new + b"\n")
    response = _upload(dev_client, org, make_zip(package(manifest)))
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid_code_package"
    if field == "manifest":
        assert "factory.toml" in body["fields"], body
    else:
        assert field in body["fields"], body
    _nothing_stored(org, local_store)


def test_the_upload_page_counts_in_the_upload_bucket(
    org, member_factory, client_for, local_store, settings, monkeypatch
):
    from tenants.api import throttles

    monkeypatch.setattr(throttles, "clock", lambda: 86_400 * 20_834 + 30)
    settings.API_RATE_LIMITS = {**settings.API_RATE_LIMITS, "upload": "1/min"}
    client = client_for(member_factory(org, "developer"))
    url = reverse("registry:code_packages", args=[org.slug])
    first = client.post(url, {"file": SimpleUploadedFile("pkg.zip", make_zip(package()))})
    assert first.status_code in (200, 302)
    second = client.post(url, {"file": SimpleUploadedFile("pkg.zip", make_zip(package()))})
    assert second.status_code == 429
