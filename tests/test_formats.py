"""Loaders of published formats, on fixtures written here (plus the real files when available)."""

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedrec.data import formats
from fedrec.data.formats import (
    DATASETS, data_roots, load_amazon, load_dataset, load_delimited, load_filmtrust, load_gowalla,
    load_interactions, load_ml100k, load_ml1m, resolve_dataset,
)
from fedrec.data.types import SPLIT_TEST, SPLIT_TRAIN
from fedrec.errors import DataFormatError

SHARED = Path(os.environ.get("FEDREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="no shared real data")

ML1M = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n10::3::1::978300000\n"


def write(path, text, gz=False, crlf=False):
    data = text.replace("\n", "\r\n") if crlf else text
    data = data.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def eq(a, b):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("gz,crlf", [(False, False), (True, False), (False, True)])
def test_ml1m(tmp_path, gz, crlf):
    d = load_ml1m(write(tmp_path / ("ratings.dat.gz" if gz else "ratings.dat"), ML1M, gz, crlf))
    eq(d.users, [1, 1, 2, 10])
    eq(d.items, [1193, 661, 1193, 3])
    eq(d.order, [978300760, 978302109, 978298413, 978300000])
    eq(d.extra["ratings"], [5, 3, 4, 1])
    assert d.order_kind == "timestamp" and d.name == "ml-1m" and d.fixed_split is None
    assert d.users.dtype == np.int64


def test_ml1m_min_rating_and_no_trailing_newline(tmp_path):
    d = load_ml1m(write(tmp_path / "ratings.dat", ML1M.rstrip("\n")), min_rating=4)
    eq(d.users, [1, 2])
    eq(d.order, [978300760, 978298413])
    eq(d.extra["ratings"], [5, 4])


def test_ml1m_wrong_field_count(tmp_path):
    lines = ML1M.splitlines() * 4 + ["7::8::9"] + ML1M.splitlines()
    p = write(tmp_path / "ratings.dat", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as e:
        load_ml1m(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:17: expected 4 fields separated by '::', got 3")
    assert "(expected: UserID::MovieID::Rating::Timestamp)" in msg
    assert e.value.line == 17 and e.value.path == str(p)


def test_ml1m_non_integer_id(tmp_path):
    p = write(tmp_path / "ratings.dat", ML1M + "3::x12::4::978300000\n", gz=True)
    with pytest.raises(DataFormatError, match=r"ratings\.dat:5: item id 'x12' is not an integer"):
        load_ml1m(p)
    p = write(tmp_path / "r2.dat", "1::2::3::4\n-1::2::3::4\n")
    with pytest.raises(DataFormatError, match=r"r2\.dat:2: user id -1 is negative"):
        load_ml1m(p)
    p = write(tmp_path / "r3.dat", "1::2::3::4\n1::2::3::4.5\n")
    with pytest.raises(DataFormatError, match=r"r3\.dat:2: timestamp '4.5' is not an integer"):
        load_ml1m(p)


def test_missing_and_empty_files(tmp_path):
    for loader in (load_ml1m, load_ml100k, load_amazon, load_filmtrust, load_delimited, load_gowalla):
        with pytest.raises(DataFormatError, match="not found"):
            loader(tmp_path / "nope.txt")
    with pytest.raises(DataFormatError, match="no data rows"):
        load_ml1m(write(tmp_path / "empty.dat", "\n"))


def test_ml100k(tmp_path):
    text = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
    for p in (write(tmp_path / "u.data", text), write(tmp_path / "u.data.gz", text, gz=True)):
        d = load_ml100k(p)
        eq(d.users, [196, 186, 22])
        eq(d.items, [242, 302, 377])
        eq(d.order, [881250949, 891717742, 878887116])
        assert d.order_kind == "timestamp"
    with pytest.raises(DataFormatError, match=r"u\.data:2: expected 4 fields separated by whitespace, got 5"):
        load_ml100k(write(tmp_path / "u.data", "1\t2\t3\t4\n1\t2\t3\t4\t5\n"))


def gowalla_dir(tmp_path, gz=False):
    d = tmp_path / "gowalla"
    d.mkdir()
    suffix = ".gz" if gz else ""
    write(d / f"train.txt{suffix}", "0 10 11 12\n1 13\n2\n3 10 14\n", gz)
    write(d / f"test.txt{suffix}", "0 13\n1 10 11\n3 12\n", gz)
    return d


@pytest.mark.parametrize("gz", [False, True])
def test_gowalla(tmp_path, gz):
    root = gowalla_dir(tmp_path, gz)
    for arg in (root, root / ("train.txt.gz" if gz else "train.txt")):
        d = load_gowalla(arg)
        eq(d.users, [0, 0, 0, 1, 3, 3, 0, 1, 1, 3])
        eq(d.items, [10, 11, 12, 13, 10, 14, 13, 10, 11, 12])
        eq(d.fixed_split, [SPLIT_TRAIN] * 6 + [SPLIT_TEST] * 4)
        assert d.order is None and d.order_kind == "none" and d.fixed_split.dtype == np.int8
        assert d.extra["train_rows"] == 6 and d.extra["test_rows"] == 4


def test_gowalla_errors(tmp_path):
    root = gowalla_dir(tmp_path)
    (root / "test.txt").unlink()
    with pytest.raises(DataFormatError, match=r"test\.txt: file not found"):
        load_gowalla(root)
    write(root / "test.txt", "0 1\n1 2 x3\n")
    with pytest.raises(DataFormatError, match=r"test\.txt:2: id 'x3' is not an integer"):
        load_gowalla(root)


def test_amazon_ordered_crlf_and_blank_lines(tmp_path):
    p = write(tmp_path / "Beauty.txt", "1 5 3 9\n\n2 3 4\n  3   7 1 \n", crlf=True)
    d = load_amazon(p)
    eq(d.users, [1, 1, 1, 2, 2, 3, 3])
    eq(d.items, [5, 3, 9, 3, 4, 7, 1])
    eq(d.order, [0, 1, 2, 0, 1, 0, 1])
    assert d.order_kind == "sequence" and d.name == "beauty"
    d = load_amazon(p, ordered=False)
    assert d.order is None and d.order_kind == "none"
    eq(d.items, [5, 3, 9, 3, 4, 7, 1])
    # line numbers survive the blank-line clean-up
    with pytest.raises(DataFormatError, match=r"Beauty2\.txt:4: id '1.5' is not an integer"):
        load_amazon(write(tmp_path / "Beauty2.txt", "1 5\n\n2 3\n3 1.5\n"))


def test_filmtrust_duplicates(tmp_path):
    text = "1 1 2\n1 2 4\n308 12 4\n308 12 4\n2 1 3.5\n308 207 3.5\n308 207 3\n"
    for p in (write(tmp_path / "ratings.txt", text), write(tmp_path / "ratings.txt.gz", text, gz=True)):
        d = load_filmtrust(p)
        eq(d.users, [1, 1, 308, 2, 308])
        eq(d.items, [1, 2, 12, 1, 207])
        eq(d.extra["ratings"], [2.0, 4.0, 4.0, 3.5, 3.5])
        assert d.extra["duplicates_dropped"] == 2 and d.order is None
    assert len(load_filmtrust(p, min_rating=3.6)) == 2


CHRONO = ("user_id\tmovie_id\trating\tseq_idx\ttimestamp\tin_sasrec\n"
          "1\t3186\t4\t0\t978300019\t1\n1\t1270\t5\t1\t978300055\t1\n"
          "3000\t2990\t3\t0\t\t1\n3000\t737\t3\t1\t\t0\n")


@pytest.mark.parametrize("gz", [False, True])
def test_delimited_header_tsv_with_empty_fields(tmp_path, gz):
    p = write(tmp_path / ("r.tsv.gz" if gz else "r.tsv"), CHRONO, gz)
    d = load_delimited(p, user_col="user_id", item_col="movie_id", order_col="seq_idx", rating_col="rating")
    eq(d.users, [1, 1, 3000, 3000])
    eq(d.items, [3186, 1270, 2990, 737])
    eq(d.order, [0, 1, 0, 1])
    eq(d.extra["ratings"], [4, 5, 3, 3])
    assert d.order_kind == "sequence" and d.extra["columns"][3] == "seq_idx"
    with pytest.raises(DataFormatError, match=r"r\.tsv(\.gz)?:4: order value '' is not a number"):
        load_delimited(p, user_col="user_id", item_col="movie_id", order_col="timestamp")
    with pytest.raises(DataFormatError, match="no column 'user'"):
        load_delimited(p, user_col="user", item_col="movie_id")
    d = load_delimited(p, user_col=0, item_col=1, rating_col=2, min_rating=4)
    eq(d.items, [3186, 1270])


def test_delimited_csv_variants(tmp_path):
    p = write(tmp_path / "inter.csv", "user,item,ts\n5,7,1600000000\n6,8,1600000001\n", crlf=True)
    d = load_delimited(p, user_col="user", item_col="item", order_col="ts")
    eq(d.users, [5, 6])
    eq(d.order, [1600000000, 1600000001])
    assert d.order_kind == "timestamp"
    # no header, index columns, file order
    p = write(tmp_path / "seq.txt", "1 1\n1 2\n2 3\n")
    d = load_delimited(p, order_col="line")
    eq(d.users, [1, 1, 2])
    eq(d.items, [1, 2, 3])
    eq(d.order, [0, 1, 2])
    with pytest.raises(DataFormatError, match="has no header"):
        load_delimited(p, user_col="user_id")
    # '::' auto-detected, column 1 -> user, 0 -> item
    d = load_delimited(write(tmp_path / "x.dat", "3::4::5\n6::7::8\n"), user_col=1, item_col=0)
    eq(d.users, [4, 7])
    eq(d.items, [3, 6])
    # ragged row: line number counts the header
    p = write(tmp_path / "bad.csv", "user,item\n1,2\n3\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:3: expected 2 fields separated by ',', got 1"):
        load_delimited(p)


def test_load_interactions_auto(tmp_path):
    assert load_interactions(write(tmp_path / "ratings.dat", ML1M)).order_kind == "timestamp"
    d = load_interactions(write(tmp_path / "u.data", "1\t2\t3\t4\n"))
    assert d.name == "ml-100k" and len(d) == 1
    assert load_interactions(gowalla_dir(tmp_path)).fixed_split is not None
    d = load_interactions(write(tmp_path / "seqs.txt", "1 2 3 4 5 6\n2 3 4\n"))
    assert d.extra["format"] == "amazon" and d.order_kind == "sequence"
    d = load_interactions(write(tmp_path / "seqs2.txt.gz", "1 2 3 4 5 6\n2 3 4\n", gz=True))
    assert d.extra["format"] == "amazon" and len(d) == 7
    d = load_interactions(write(tmp_path / "x.csv", "u,i\n1,2\n"))
    eq(d.items, [2])
    d = load_interactions(write(tmp_path / "Cell_Phones_and_Accessories.txt", "1 2 3\n"))
    assert d.order is None
    with pytest.raises(DataFormatError, match="unknown format"):
        load_interactions(tmp_path / "x.csv", format="parquet")


def test_named_datasets_and_roots(tmp_path, monkeypatch):
    assert set(DATASETS) >= {"ml-1m", "ml-1m-sas", "ml-100k", "gowalla", "beauty", "cellphones", "filmtrust"}
    root = tmp_path / "root"
    (root / "ml-1m").mkdir(parents=True)
    write(root / "ml-1m" / "ratings.dat", ML1M)  # official layout: the fallback
    monkeypatch.setenv("FEDREC_DATA", os.pathsep.join([str(tmp_path / "none"), str(root)]))
    roots = data_roots()
    assert roots[:2] == [tmp_path / "none", root]
    assert roots[-1] == Path.home() / ".cache" / "fedrec" / "data"
    path, fmt, opts = resolve_dataset("ml-1m")
    assert path == root / "ml-1m" / "ratings.dat" and fmt == "ml-1m" and opts == {"name": "ml-1m"}
    assert load_interactions(path, fmt, **opts).name == "ml-1m"
    d = load_dataset("ml-1m", min_rating=4)
    assert d.name == "ml-1m" and len(d) == 2
    write(root / "ml-1m" / "ratings_chrono.tsv.gz", CHRONO, gz=True)
    d = load_dataset("ml-1m")
    assert resolve_dataset("ml-1m")[1] == "csv" and len(d) == 4 and d.order_kind == "sequence"
    assert len(load_dataset(str(root / "ml-1m" / "ratings.dat"))) == 4
    monkeypatch.setattr(formats, "data_roots", lambda: [tmp_path / "none"])
    with pytest.raises(DataFormatError, match="fedrec data fetch ml-1m"):
        resolve_dataset("ml-1m")
    with pytest.raises(DataFormatError, match="not a known dataset"):
        load_dataset("no-such-thing")


# ---- real files (not shipped; read from ../shared/data when present) ----

def counts(d):
    return d.n_users, d.n_items, len(d)


@needs_shared
def test_real_ml1m_chrono_fast():
    opts = DATASETS["ml-1m"][2]
    elapsed = []
    for _ in range(2):  # a second try only when the first was slow (a busy machine)
        t = time.perf_counter()
        d = load_interactions(SHARED / "ml-1m" / "ratings_chrono.tsv.gz", "csv", **opts)
        elapsed.append(time.perf_counter() - t)
        if elapsed[-1] < 2.0:
            break
    assert counts(d) == (6040, 3706, 1_000_209)
    assert min(elapsed) < 2.0, f"ML-1M took {min(elapsed):.2f}s"
    first = d.users == 1
    eq(d.order[first][:3], [0, 1, 2])


@needs_shared
def test_real_files():
    d = load_ml1m(SHARED / "ml-1m" / "ratings_users1-2999.dat.gz")
    assert counts(d) == (2999, 3615, 487_650)
    assert (d.users[0], d.items[0], d.order[0]) == (1, 1193, 978300760)
    d = load_interactions(SHARED / "ml-1m" / "ml-1m_sas.txt.gz", "csv", **DATASETS["ml-1m-sas"][2])
    assert counts(d) == (6040, 3416, 999_611)
    assert counts(load_ml100k(SHARED / "ml-100k" / "u.data")) == (943, 1682, 100_000)
    d = load_gowalla(SHARED / "gowalla")
    assert counts(d) == (29858, 40981, 1_027_370)
    assert int((d.fixed_split == SPLIT_TEST).sum()) == 217_242
    d = load_amazon(SHARED / "amazon-beauty" / "Beauty.txt")
    assert counts(d) == (22363, 12101, 198_502)
    d = load_amazon(SHARED / "amazon-cellphones" / "Cell_Phones_and_Accessories.txt", ordered=False)
    assert counts(d) == (27879, 10429, 194_439)
    d = load_filmtrust(SHARED / "filmtrust" / "ratings.txt")
    assert counts(d) == (1508, 2071, 35_494) and d.extra["duplicates_dropped"] == 3
