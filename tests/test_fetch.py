"""fetch: checksum, extraction and the whole flow, offline on a zip fixture built here."""

import hashlib
import io
import shutil
import zipfile

import numpy as np
import pytest

from fedrec.data import fetch as fetch_mod
from fedrec.data.fetch import extract, fetch, md5sum, verify_checksum
from fedrec.data.formats import load_dataset
from fedrec.errors import FedRecError

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr("urllib.request.urlopen", refuse)


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


@pytest.fixture
def ml100k_zip(tmp_path, monkeypatch):
    z = make_zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": U_DATA, "ml-100k/README": "readme\n",
                                            "ml-100k/sub/u1.base": "1\t2\t3\t4\n"})
    md5 = hashlib.md5(z.read_bytes()).hexdigest()
    calls = []

    def fake_download(url, path, progress=True, **kw):
        calls.append(url)
        shutil.copyfile(z, path)
        return path

    monkeypatch.setattr(fetch_mod, "download", fake_download)
    src = dict(fetch_mod.SOURCES["ml-100k"], md5=md5, rows=3)
    monkeypatch.setitem(fetch_mod.SOURCES, "ml-100k", src)
    return z, md5, calls


def test_md5_and_verify_checksum(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    assert md5sum(p) == "5d41402abc4b2a76b9719d911017c592"
    verify_checksum(p, "5D41402ABC4B2A76B9719D911017C592")
    assert p.exists()
    with pytest.raises(FedRecError) as e:
        verify_checksum(p, "0" * 32)
    assert "expected md5 " + "0" * 32 in str(e.value) and "5d41402abc4b2a76b9719d911017c592" in str(e.value)
    assert not p.exists()


def test_extract_strips_top_folder(tmp_path):
    z = make_zip(tmp_path / "a.zip", {"ml-1m/ratings.dat": "1::2::3::4\n", "ml-1m/movies.dat": "x\n",
                                      "__MACOSX/ml-1m/._ratings.dat": "junk"})
    written = extract(z, tmp_path / "out")
    assert sorted(p.name for p in written) == ["movies.dat", "ratings.dat"]
    assert (tmp_path / "out" / "ratings.dat").read_text() == "1::2::3::4\n"
    flat = make_zip(tmp_path / "b.zip", {"u.data": "1\t2\t3\t4\n", "u.item": "a\n"})
    extract(flat, tmp_path / "flat")
    assert (tmp_path / "flat" / "u.data").exists()


def test_extract_refuses_unsafe_paths(tmp_path):
    z = make_zip(tmp_path / "evil.zip", {"a/../../evil.txt": "x", "b/ok.txt": "y"})
    with pytest.raises(FedRecError, match="unsafe"):
        extract(z, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FedRecError, match="not a valid zip"):
        extract(bad, tmp_path / "out2")


def test_fetch_offline(tmp_path, ml100k_zip, monkeypatch):
    _, _, calls = ml100k_zip
    dest = fetch("ml-100k", dest=tmp_path / "data" / "ml-100k")
    assert dest == tmp_path / "data" / "ml-100k"
    assert (dest / "u.data").read_text() == U_DATA and (dest / "sub" / "u1.base").exists()
    assert calls == [fetch_mod.SOURCES["ml-100k"]["url"]]
    assert not list(dest.glob("*.zip"))  # the temporary archive is gone
    # found again without a download; --url override is used when downloading
    assert fetch("ml-100k", dest=dest) == dest and len(calls) == 1
    fetch("ml-100k", dest=dest, url="file:///mirror/ml-100k.zip", force=True)
    assert calls[-1] == "file:///mirror/ml-100k.zip"
    # the extracted file is found as a named dataset under the data root
    monkeypatch.setenv("FEDREC_DATA", str(tmp_path / "data"))
    d = load_dataset("ml-100k")
    assert d.source == str(dest / "u.data")
    np.testing.assert_array_equal(d.users, [196, 186, 22])


def test_fetch_default_dest(tmp_path, monkeypatch, ml100k_zip):
    monkeypatch.setenv("HOME", str(tmp_path))
    dest = fetch("ml-100k", progress=False)
    assert dest == tmp_path / ".cache" / "fedrec" / "data" / "ml-100k"
    assert (dest / "u.data").exists()


def test_fetch_bad_checksum_and_counts(tmp_path, ml100k_zip, monkeypatch):
    monkeypatch.setitem(fetch_mod.SOURCES["ml-100k"], "md5", "f" * 32)
    with pytest.raises(FedRecError, match="checksum mismatch.*expected md5 f{32}"):
        fetch("ml-100k", dest=tmp_path / "x")
    assert not (tmp_path / "x" / "u.data").exists() and not list((tmp_path / "x").glob("*.zip"))
    monkeypatch.setitem(fetch_mod.SOURCES["ml-100k"], "md5", ml100k_zip[1])
    monkeypatch.setitem(fetch_mod.SOURCES["ml-100k"], "rows", 5)
    with pytest.raises(FedRecError, match="3 interactions, expected 5"):
        fetch("ml-100k", dest=tmp_path / "y")


def test_fetch_unknown():
    with pytest.raises(FedRecError, match="cannot fetch 'gowalla'"):
        fetch("gowalla")


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@pytest.mark.parametrize("progress", [True, False])
def test_download_streams_to_file(tmp_path, monkeypatch, progress):
    payload = bytes(range(256)) * 10_000  # > one 1 MiB chunk
    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    out = fetch_mod.download("https://example.invalid/x.zip", tmp_path / "x.zip", progress=progress)
    assert out.read_bytes() == payload and seen == ["https://example.invalid/x.zip"]


def test_download_reports_oserror(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("no route to host")

    monkeypatch.setattr("urllib.request.urlopen", fail)
    with pytest.raises(FedRecError, match="download of .* failed: no route to host"):
        fetch_mod.download("https://example.invalid/x.zip", tmp_path / "x.zip", progress=False)
    assert not (tmp_path / "x.zip").exists()
