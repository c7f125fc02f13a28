"""scripts/reference_inputs.py: the reference code's inputs and the parse of its logs."""

from __future__ import annotations

import gzip
import json

from conftest import load_file_module


def _script():
    return load_file_module("scripts/reference_inputs.py")


def test_ratings_keep_file_order_and_fill_missing_timestamps(tmp_path):
    src = tmp_path / "r.tsv.gz"
    with gzip.open(src, "wt") as f:
        f.write("user_id\tmovie_id\trating\tseq_idx\ttimestamp\tin_sasrec\n")
        f.write("7\t10\t4\t0\t900\t1\n7\t11\t5\t1\t950\t1\n")
        f.write("3\t12\t3\t0\t\t0\n3\t10\t2\t1\t\t0\n7\t13\t1\t2\t990\t1\n")
    dst = tmp_path / "Data" / "ratings.dat"
    remap = _script().write_ratings(src, dst)
    assert remap == {"7": 0, "3": 1}  # the reference's ids: order of first appearance
    assert dst.read_text().splitlines() == [
        "7::10::4::900", "7::11::5::950", "3::12::3::0", "3::10::2::1", "7::13::1::990"]


def test_read_gives_the_drop_per_round_and_the_k_changes(tmp_path, capsys):
    train = tmp_path / "train.log"
    train.write_text(
        "  2%|| 99/6000 [01:25<1:40:12,  1.02s/it]Round: 100, train_loss: 0.68716, acc: 0.69 K: 2 "
        "attackers_this_round: 1 attacker_loss: 24.2\n"
        "Round: 200, train_loss: 0.6, acc: 0.7 K: 2 attackers_this_round: 0 attacker_loss: None\n"
        "Round: 300, train_loss: 0.6, acc: 0.7 K: 9 attackers_this_round: 1 attacker_loss: 3.0\n")
    test = tmp_path / "test.log"
    test.write_text("[Test] Round: 1000, HR@5: 0.02000, nDCG@5: 0.01000, HR@10: 0.1\n"
                    "[Test] Round: 2000, HR@5: 0.03000, nDCG@5: 0.01500, HR@10: 0.1\n")
    clean = tmp_path / "clean.log"
    clean.write_text("[Test] Round: 1000, HR@5: 0.04000, nDCG@5: 0.02000, HR@10: 0.1\n"
                     "[Test] Round: 2000, HR@5: 0.04000, nDCG@5: 0.02000, HR@10: 0.1\n")
    _script().main(["read", str(train), str(test), "--clean", str(clean)])
    out = json.loads(capsys.readouterr().out)
    assert out["K_changes"] == [[100, 2], [300, 9]]
    assert abs(out["drop_pct"]["1000"]["hr@5"] - 50.0) < 1e-9
    assert abs(out["drop_pct"]["2000"]["ndcg@5"] - 25.0) < 1e-9
