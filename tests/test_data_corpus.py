"""Corpora: built-in selection, user data and its errors, fingerprints, the split by document."""

import json
import warnings

import pytest

from data import builtin_finetune_corpus, builtin_pretrain_corpus, load_corpus, split_corpus

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _folder(tmp_path, n=40):
    root = tmp_path / "docs"
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod_{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # é λ\n", encoding="utf-8")
    return root


def test_builtin_corpora_tiny_cut():
    c = builtin_pretrain_corpus(max_bytes=200_000)
    names = [n for n, _ in c.docs]
    assert names == sorted(names) and len(names) > 3 and c.n_bytes <= 200_000
    assert not any(part in ("test", "tests", "site-packages") for n in names for part in n.split("/")[:-1])
    assert all(n.endswith(".py") and t.strip() for n, t in c.docs)
    assert builtin_pretrain_corpus(max_bytes=200_000).fingerprint == c.fingerprint
    assert "python" in c.info() and c.info()["docs"] == len(names)
    f = builtin_finetune_corpus(max_bytes=100_000)
    assert f.name == "numpy" and all(n.startswith("numpy/") for n, _ in f.docs) and "numpy" in f.meta


def test_split_deterministic_no_leakage(tmp_path):
    corpus = load_corpus(str(_folder(tmp_path)))
    train, val = split_corpus(corpus, 0.25)
    train2, val2 = split_corpus(load_corpus(str(tmp_path / "docs") + "/"), 0.25)
    assert [n for n, _ in train.docs] == [n for n, _ in train2.docs] and val.docs == val2.docs
    tn, vn = {n for n, _ in train.docs}, {n for n, _ in val.docs}
    assert tn.isdisjoint(vn) and tn | vn == {n for n, _ in corpus.docs} and vn and tn
    assert len({corpus.fingerprint, train.fingerprint, val.fingerprint}) == 3
    # a document's side depends on its name only: adding documents never moves the old ones
    (tmp_path / "docs" / "extra.py").write_text("x = 1\n")
    train3, val3 = split_corpus(load_corpus(str(tmp_path / "docs")), 0.25)
    assert vn <= {n for n, _ in val3.docs} and tn <= {n for n, _ in train3.docs}


def test_split_single_document_by_lines(tmp_path):
    text = "".join(f"line {i} ünïcode\n" for i in range(100))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    with pytest.warns(UserWarning, match="one document"):
        train, val = split_corpus(load_corpus(str(tmp_path / "one.txt")), 0.1)
    assert train.docs[0][1] + val.docs[0][1] == text
    assert val.docs[0][1].startswith("line 90") or val.docs[0][1].startswith("line 89")
    (tmp_path / "flat.txt").write_text("no newline at all")
    with pytest.raises(ValueError, match="single line"):
        split_corpus(load_corpus(str(tmp_path / "flat.txt")), 0.1)


def test_split_never_leaves_validation_empty(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    with pytest.warns(UserWarning, match="validation set empty"):
        train, val = split_corpus(load_corpus(str(tmp_path / "*.txt")), 1e-9)
    assert len(train.docs) == 1 and len(val.docs) == 1


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    root = _folder(tmp_path, n=5)
    fp = load_corpus(str(root)).fingerprint
    assert load_corpus(str(root)).fingerprint == fp
    f = root / "pkg0" / "mod_0.py"
    f.write_text(f.read_text().replace("x * 0", "x + 0"))  # same size, different content
    assert load_corpus(str(root)).fingerprint != fp


def test_jsonl_with_configurable_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"doc {i} ✓", "id": i}) for i in range(5)) + "\n\n")
    c = load_corpus(str(p), text_field="body")
    assert [t for _, t in c.docs] == [f"doc {i} ✓" for i in range(5)] and c.docs[0][0] == "d.jsonl:1"


def test_jsonl_errors_name_line_and_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: no field 'text' \(found \['content'\]\)"):
        load_corpus(str(p))
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        load_corpus(str(p))


def test_user_data_errors_and_counted_skips(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="matches no files"):
        load_corpus(str(tmp_path / "*.nothing"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):  # nothing readable: an error, not an empty dataset
        load_corpus(str(mixed))
    (mixed / "good.txt").write_text("héllo\n", encoding="utf-8")
    (mixed / "blob.bin").write_bytes(b"\x00\x01\x02")
    (mixed / "blank.txt").write_text("  \n")
    with pytest.warns(UserWarning, match="skipped 3 file"):
        c = load_corpus(str(mixed))
    assert c.skipped == 3 and c.docs == [("good.txt", "héllo\n")]


def test_builtin_spec():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the built-in corpora load cleanly
        c = load_corpus("builtin")
    assert c.name == "numpy" and len(c.docs) > 50


def test_split_never_leaves_training_empty(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    with pytest.warns(UserWarning, match="training set empty"):
        train, val = split_corpus(load_corpus(str(tmp_path / "*.txt")), 1 - 1e-12)
    assert len(train.docs) == 1 and len(val.docs) == 2


def test_names_and_fingerprint_do_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    root = _folder(tmp_path, n=4)
    a = load_corpus(str(root))
    monkeypatch.chdir(tmp_path)
    b = load_corpus("./docs/")
    assert a.docs == b.docs and a.fingerprint == b.fingerprint and a.docs[0][0] == "pkg0/mod_0.py"
