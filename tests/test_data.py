"""Real text: the IMDB download path against an archive served on 127.0.0.1, bring-your-own
directories and tables, the cache, and every bad input the issue lists."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fp8exp.config import ConfigError, validate
from fp8exp.data import imdb, load
from tests.conftest import compose_config

POSITIVE = "a wonderful film with great acting and a moving story, loved it".split()
NEGATIVE = "an awful film with terrible acting and a boring story, hated it".split()


def review(words: list[str], rng: np.random.Generator) -> str:
    return " ".join(rng.choice(words, size=12))


def write_text_tree(root: Path, per_class: int = 20, splits=("train", "test"), unsup: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for name, words in (("neg", NEGATIVE), ("pos", POSITIVE)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}_1.txt").write_text(review(words, rng), encoding="utf-8")
    if unsup:
        (root / "train" / "unsup").mkdir()
        (root / "train" / "unsup" / "0_0.txt").write_text("unlabelled", encoding="utf-8")
    return root


def make_archive(tmp: Path, extra_member: tuple[str, bytes] | None = None, name: str = imdb.ARCHIVE,
                 per_class: int = 20) -> Path:
    tree = write_text_tree(tmp / "src" / name / "aclImdb", per_class=per_class, unsup=True)
    archive = tmp / "served" / name
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="aclImdb")
        if extra_member:
            info = tarfile.TarInfo(extra_member[0])
            info.size = len(extra_member[1])
            tar.addfile(info, io.BytesIO(extra_member[1]))
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = (Path(self.directory) / imdb.ARCHIVE).read_bytes()
        if self.path.endswith("/cut-short.tar.gz"):  # promises the whole archive, sends half
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
        elif self.path.startswith("/slow/"):  # the archive in 8 parts over ~0.4 s: downloads overlap
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = len(body) // 8 + 1
            for start in range(0, len(body), step):
                self.wfile.write(body[start:start + step])
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path.startswith("/no-length/"):  # the archive, without a Content-Length
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()


@pytest.fixture
def served(tmp_path):
    """An aclImdb-like archive on a local HTTP server: (base url, archive path)."""
    archive = make_archive(tmp_path)
    handler = functools.partial(_Handler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", archive
    server.shutdown()
    server.server_close()


def imdb_config(tmp_path, url, digest, *overrides):
    cfg = compose_config("data=imdb", f"data.url={url}", f"data.sha256={digest}",
                         f"data.cache_dir={tmp_path / 'cache'}", "data.vocabulary_size=200",
                         "data.sequence_length=16", *overrides)
    validate(cfg)
    return cfg


def leftovers(cache: Path) -> list[str]:
    """What a failed download left in the cache, but for the lock file (kept on purpose)."""
    return sorted(p.name for p in cache.iterdir() if p.name != imdb.LOCK)


# ------------------------------------------------------------------- IMDB download path

def test_imdb_downloads_verifies_extracts_and_splits(tmp_path, served):
    url, archive = served
    cfg = imdb_config(tmp_path, f"{url}/{imdb.ARCHIVE}", sha256(archive))
    splits = load(cfg.data)
    extracted = imdb.dataset_dir(cfg.data)
    assert (extracted / "train" / "pos").is_dir()
    assert not (extracted / "train" / "unsup").exists()
    assert not list((tmp_path / "cache").glob("*.part"))
    assert splits.class_names == ["neg", "pos"]
    # The example's split: validation_split=0.2 of train, seed 42; test is the test folder.
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (32, 8, 40)
    assert splits.vocabulary[:2] == ["[PAD]", "[UNK]"]
    assert splits.x_train.shape == (32, 16) and splits.x_train.dtype == np.int32
    assert splits.x_train.max() < splits.vocabulary_size
    assert not splits.cache_hit


def test_imdb_second_load_hits_the_cache_without_the_network(tmp_path, served):
    url, archive = served
    first = load(imdb_config(tmp_path, f"{url}/{imdb.ARCHIVE}", sha256(archive)).data)
    second = load(imdb_config(tmp_path, "http://127.0.0.1:9/unreachable.tar.gz", sha256(archive)).data)
    assert second.cache_hit
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)


def test_changing_a_tokenizer_setting_misses_the_cache(tmp_path, served):
    url, archive = served
    load(imdb_config(tmp_path, f"{url}/{imdb.ARCHIVE}", sha256(archive)).data)
    other = load(imdb_config(tmp_path, f"{url}/{imdb.ARCHIVE}", sha256(archive), "data.sequence_length=8").data)
    assert not other.cache_hit and other.x_train.shape[1] == 8


def test_checksum_mismatch_deletes_the_download(tmp_path, served):
    url, _ = served
    with pytest.raises(ConfigError) as error:
        load(imdb_config(tmp_path, f"{url}/{imdb.ARCHIVE}", "0" * 64).data)
    assert error.value.key == "data.sha256" and "deleted" in str(error.value)
    assert leftovers(tmp_path / "cache") == []


def test_download_cut_short_leaves_nothing(tmp_path, served):
    url, archive = served
    with pytest.raises(ConfigError) as error:
        load(imdb_config(tmp_path, f"{url}/cut-short.tar.gz", sha256(archive)).data)
    assert error.value.key == "data.url"
    assert leftovers(tmp_path / "cache") == []


def run_together(*jobs) -> list:
    """Each job in its own thread, the second starting while the first downloads; results or errors."""
    results = [None] * len(jobs)

    def run(i):
        try:
            results[i] = jobs[i]()
        except Exception as error:  # noqa: BLE001  (reported by the assertion)
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    return results


def test_parallel_downloads_of_one_archive_both_succeed(tmp_path, served):
    url, archive = served
    target = tmp_path / "cache" / imdb.ARCHIVE
    target.parent.mkdir()
    download = functools.partial(imdb.download, f"{url}/slow/{imdb.ARCHIVE}", target, sha256(archive))
    assert run_together(download, download) == [None, None]
    assert sha256(target) == sha256(archive)
    assert leftovers(tmp_path / "cache") == [imdb.ARCHIVE]


def test_parallel_jobs_on_a_cold_cache_download_once_and_share_the_extraction(tmp_path, served, caplog):
    url, archive = served
    data = imdb_config(tmp_path, f"{url}/slow/{imdb.ARCHIVE}", sha256(archive)).data
    caplog.set_level("INFO", logger=imdb.__name__)
    first, second = run_together(lambda: imdb.dataset_dir(data), lambda: imdb.dataset_dir(data))
    assert first == second and (first / "train" / "pos").is_dir()
    assert [r.message for r in caplog.records].count(f"Downloading IMDB from {data.url} into {tmp_path / 'cache'}") == 1
    assert sha256(tmp_path / "cache" / imdb.ARCHIVE) == sha256(archive)


def test_a_new_archive_sha_is_extracted_afresh_not_served_from_the_old_extraction(tmp_path, served):
    url, archive = served
    load(imdb_config(tmp_path, f"{url}/{imdb.ARCHIVE}", sha256(archive)).data)
    smaller = make_archive(tmp_path, name="aclImdb_v2.tar.gz", per_class=10)
    splits = load(imdb_config(tmp_path, f"{url}/aclImdb_v2.tar.gz", sha256(smaller)).data)
    assert not splits.cache_hit and len(splits.y_test) == 20


@pytest.mark.parametrize("path,message", [(imdb.ARCHIVE, "announces"), (f"no-length/{imdb.ARCHIVE}", "so far")])
def test_a_download_over_max_download_bytes_stops_and_leaves_nothing(tmp_path, served, path, message):
    url, archive = served
    with pytest.raises(ConfigError) as error:
        load(imdb_config(tmp_path, f"{url}/{path}", sha256(archive), "data.max_download_bytes=100").data)
    assert error.value.key == "data.max_download_bytes" and message in str(error.value)
    assert leftovers(tmp_path / "cache") == []


def test_an_archive_unpacking_past_the_limit_is_not_extracted(tmp_path):
    archive = make_archive(tmp_path, extra_member=("aclImdb/zeros.bin", bytes(2 << 20)))  # 2 MiB, compresses to KBs
    limit = 200_000
    assert archive.stat().st_size < limit < (2 << 20) / imdb.UNPACK_FACTOR
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError) as error:
        imdb.extract(archive, tmp_path / "out" / "aclImdb", limit)
    assert error.value.key == "data.max_download_bytes" and "unpacks to" in str(error.value)
    assert list((tmp_path / "out").iterdir()) == [] and archive.is_file()


@pytest.mark.parametrize("value,ok", [("null", True), ("1", True), ("0", False), ("-5", False)])
def test_max_download_bytes_must_be_positive_or_null(tmp_path, value, ok):
    cfg = compose_config("data=imdb", f"data.max_download_bytes={value}")
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match="^data.max_download_bytes: "):
            validate(cfg)


def test_unreachable_url_offers_alternatives(tmp_path):
    with pytest.raises(ConfigError) as error:
        load(imdb_config(tmp_path, "http://127.0.0.1:9/aclImdb_v1.tar.gz", "0" * 64).data)
    message = str(error.value)
    assert error.value.key == "data.url"
    assert "data.path" in message and "data=table" in message


def test_truncated_archive_is_reported_and_deleted(tmp_path):
    archive = make_archive(tmp_path)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        imdb.extract(truncated, tmp_path / "out" / "aclImdb")
    assert not truncated.exists() and list((tmp_path / "out").iterdir()) == []


def test_archive_members_cannot_escape_the_target(tmp_path):
    archive = make_archive(tmp_path, extra_member=("../escaped.txt", b"gotcha"))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError):
        imdb.extract(archive, tmp_path / "out" / "aclImdb")
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_data_path_skips_the_download(tmp_path):
    tree = write_text_tree(tmp_path / "aclImdb", unsup=True)
    cfg = compose_config("data=imdb", f"data.path={tree}", "data.url=http://127.0.0.1:9/none",
                         f"data.cache_dir={tmp_path / 'cache'}", "data.vocabulary_size=200", "data.sequence_length=16")
    splits = load(cfg.data)
    assert splits.class_names == ["neg", "pos"]  # unsup is not a class
    assert len(splits.y_test) == 40


# ------------------------------------------------------------------- text_dir

def text_dir_config(tmp_path, path, *overrides):
    cfg = compose_config("data=text_dir", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}",
                         "data.vocabulary_size=200", "data.sequence_length=16", *overrides)
    validate(cfg)
    return cfg


def test_text_dir_without_test_split_carves_one(tmp_path):
    tree = write_text_tree(tmp_path / "reviews", per_class=25, splits=("train",))
    splits = load(text_dir_config(tmp_path, tree, "data.test_fraction=0.2", "data.validation_fraction=0.2").data)
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (30, 10, 10)


def test_the_cache_key_covers_every_file_the_reader_reads(tmp_path):
    tree = write_text_tree(tmp_path / "reviews")
    assert len(load(text_dir_config(tmp_path, tree).data).y_train) == 32
    (tree / "train" / "pos" / "more").mkdir()
    (tree / "train" / "pos" / "more" / "nested.txt").write_text("a wonderful film", encoding="utf-8")
    (tree / "train" / "neg" / "UPPER.TXT").write_text("an awful film", encoding="utf-8")
    splits = load(text_dir_config(tmp_path, tree).data)
    assert not splits.cache_hit and len(splits.y_train) + len(splits.y_val) == 42


def test_non_utf8_files_are_decoded_with_replacement_and_counted(tmp_path):
    tree = write_text_tree(tmp_path / "reviews")
    (tree / "train" / "pos" / "latin1.txt").write_bytes("caf\xe9 great".encode("latin-1"))
    splits = load(text_dir_config(tmp_path, tree).data)
    assert splits.notes == {"undecodable_files": 1}
    assert splits.metrics()["data/undecodable_files"] == 1


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"),
    ("no_classes", "needs at least two class folders, found none"),
    ("one_class", "needs at least two class folders, found only 'pos'"),
    ("empty_class", "has no .txt files"),
])
def test_text_dir_bad_layouts(tmp_path, layout, message):
    root = tmp_path / "reviews"
    if layout != "missing":
        (root / "train").mkdir(parents=True)
    if layout in ("one_class", "empty_class"):
        write_text_tree(tmp_path / "tmp")
        (tmp_path / "tmp" / "train" / "pos").rename(root / "train" / "pos")
    if layout == "empty_class":
        (root / "train" / "neg").mkdir()
    with pytest.raises(ConfigError) as error:
        load(text_dir_config(tmp_path, root).data)
    assert error.value.key == "data.path" and message in str(error.value)
    assert not (tmp_path / "cache" / "prepared").exists() or not any((tmp_path / "cache" / "prepared").iterdir())


# ------------------------------------------------------------------- tables

def write_table(path: Path, rows: int = 60, classes=("neg", "pos", "mixed")) -> Path:
    rng = np.random.default_rng(1)
    words = {"neg": NEGATIVE, "pos": POSITIVE, "mixed": POSITIVE + NEGATIVE}
    labels = [classes[i % len(classes)] for i in range(rows)]
    frame = pd.DataFrame({"body": [review(words[label], rng) for label in labels], "sentiment": labels})
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    return path


def table_config(tmp_path, path, *overrides):
    cfg = compose_config("data=table", f"data.path={path}", "data.text_column=body", "data.label_column=sentiment",
                         f"data.cache_dir={tmp_path / 'cache'}", "data.vocabulary_size=200",
                         "data.sequence_length=16", *overrides)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_table_formats_and_multiclass(tmp_path, suffix):
    path = write_table(tmp_path / f"reviews{suffix}")
    splits = load(table_config(tmp_path, path).data)
    assert splits.class_names == ["mixed", "neg", "pos"]
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (48, 6, 6)


def test_table_classes_select_and_order_and_count_dropped_rows(tmp_path):
    path = write_table(tmp_path / "reviews.csv")
    splits = load(table_config(tmp_path, path, "data.classes=[pos,neg]").data)
    assert splits.class_names == ["pos", "neg"]
    assert splits.notes == {"dropped_rows_other_labels": 20}
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 40


def test_table_split_column(tmp_path):
    path = tmp_path / "reviews.csv"
    frame = pd.read_csv(write_table(path))
    frame["part"] = ["train"] * 40 + ["validation"] * 10 + ["test"] * 10
    frame.to_csv(path, index=False)
    splits = load(table_config(tmp_path, path, "data.split_column=part").data)
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (40, 10, 10)


@pytest.mark.parametrize("overrides,key,message", [
    (["data.text_column=review"], "data.text_column", "no column 'review' in reviews.csv; columns: body, sentiment"),
    (["data.classes=[pos,great]"], "data.classes", "great never occur(s)"),
    (["data.classes=[pos]"], "data.label_column", "single class"),
    (["data.path=/nonexistent/reviews.csv"], "data.path", "does not exist"),
    (["data.path=/etc/hostname"], "data.path", "unsupported format"),
])
def test_table_bad_inputs(tmp_path, overrides, key, message):
    path = write_table(tmp_path / "reviews.csv")
    with pytest.raises(ConfigError) as error:
        load(table_config(tmp_path, path, *overrides).data)
    assert error.value.key == key and message in str(error.value)


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = write_table(tmp_path / "reviews.csv")
    with pytest.raises(ConfigError) as error:
        load(table_config(tmp_path, path, f"data.cache_dir={blocker / 'cache'}").data)
    assert error.value.key == "data.cache_dir"


def test_cache_entries_are_complete_or_absent(tmp_path):
    path = write_table(tmp_path / "reviews.csv")
    load(table_config(tmp_path, path).data)
    [entry] = (tmp_path / "cache" / "prepared").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "splits.npz", "vocabulary.txt"]
    assert json.loads((entry / "meta.json").read_text())["class_names"] == ["mixed", "neg", "pos"]
