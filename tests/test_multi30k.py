import functools
import gzip
import http.server
import threading

import pytest

from data import DataError, datasets, multi30k


def write_raw(directory, languages=("en", "de"), lines=3):
    """Fake raw files: `lines` sentences per split, tagged with the directory's name."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem in multi30k.SPLIT_FILES.values():
        for lang in languages:
            text = "".join(f"{directory.name} {stem} {lang} {i}\n" for i in range(lines))
            (directory / f"{stem}.{lang}.gz").write_bytes(gzip.compress(text.encode()))
    return directory


@pytest.fixture
def no_default_dirs(monkeypatch, tmp_path):
    """No env var, no shared directory, and a download URL that fails at once."""
    monkeypatch.delenv(multi30k.ENV_VAR, raising=False)
    monkeypatch.setattr(multi30k, "SHARED_DIR", tmp_path / "no-shared")
    monkeypatch.setattr(multi30k, "DOWNLOAD_URL", "http://127.0.0.1:9/{file}")


def first_source(data_dir, **kwargs) -> str:
    return datasets.load("multi30k/en-de", "validation", data_dir=data_dir, **kwargs)[0][0]


def load_error(data_dir, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        datasets.load("multi30k/en-de", "train", data_dir=data_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message and info.value.__cause__ is None
    return message


# Real data.


def test_split_sizes(multi30k_data_dir):
    sizes = {
        split: len(datasets.load("multi30k/en-de", split, data_dir=multi30k_data_dir))
        for split in ("train", "validation", "test")
    }
    assert sizes == {"train": 29_000, "validation": 1_014, "test": 1_000}


def test_pairs_are_the_raw_lines_in_order(multi30k_data_dir, multi30k_dir):
    for split, stem in (("validation", "val"), ("test", "test_2016_flickr")):
        pairs = datasets.load("multi30k/en-de", split, data_dir=multi30k_data_dir)
        sources, targets = pairs.columns()
        assert sources == multi30k.read_lines(multi30k_dir / f"{stem}.en.gz")
        assert targets == multi30k.read_lines(multi30k_dir / f"{stem}.de.gz")
    assert pairs[0] == (sources[0], targets[0])
    assert sources[0] == "A man in an orange hat starring at something."


# Configs and where the raw files come from (fake files: fast, no real data needed).


@pytest.mark.parametrize("pair", multi30k.PAIRS)
def test_language_pair_is_the_config(pair, tmp_path):
    builder = datasets.builder(f"multi30k/{pair}", data_dir=tmp_path)
    assert builder.info.supervised_keys == tuple(pair.split("-"))


def test_explicit_dir_comes_before_env_var(no_default_dirs, monkeypatch, tmp_path):
    monkeypatch.setenv(multi30k.ENV_VAR, str(write_raw(tmp_path / "env")))
    explicit = write_raw(tmp_path / "explicit")
    assert first_source(tmp_path / "a", manual_dir=explicit) == "explicit val en 0"
    assert first_source(tmp_path / "b") == "env val en 0"


def test_tfds_manual_dir_then_shared_dir(no_default_dirs, monkeypatch, tmp_path):
    write_raw(tmp_path / "a" / "downloads" / "manual")
    assert first_source(tmp_path / "a") == "manual val en 0"
    monkeypatch.setattr(multi30k, "SHARED_DIR", write_raw(tmp_path / "shared"))
    assert first_source(tmp_path / "b") == "shared val en 0"


def test_other_pair_reads_its_languages(no_default_dirs, tmp_path):
    raw = write_raw(tmp_path / "raw", languages=("fr", "en"))
    pairs = datasets.load("multi30k/fr-en", "test", data_dir=tmp_path / "d", manual_dir=raw)
    assert pairs[2] == ("raw test_2016_flickr fr 2", "raw test_2016_flickr en 2")
    assert len(pairs) == 3


def test_downloads_when_not_found_locally(no_default_dirs, monkeypatch, tmp_path):
    """Against a local HTTP server standing in for the public repository."""
    served = write_raw(tmp_path / "served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=served)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/{{file}}"
        monkeypatch.setattr(multi30k, "DOWNLOAD_URL", url)
        try:
            assert first_source(tmp_path / "d") == "served val en 0"
        finally:
            server.shutdown()
    downloaded = sorted(p.name for p in (tmp_path / "d" / "downloads" / "multi30k").iterdir())
    assert downloaded == sorted(multi30k.file_names(("en", "de")))


# Bad input: one-line errors naming the path and the fix.


def test_missing_explicit_dir(tmp_path):
    message = load_error(tmp_path / "d", manual_dir=tmp_path / "nowhere")
    assert f"manual_dir {tmp_path / 'nowhere'} does not exist" in message


def test_env_var_to_missing_dir(no_default_dirs, monkeypatch, tmp_path):
    monkeypatch.setenv(multi30k.ENV_VAR, str(tmp_path / "nowhere"))
    message = load_error(tmp_path / "d")
    assert f"{multi30k.ENV_VAR} {tmp_path / 'nowhere'} does not exist" in message


def test_dir_without_the_pairs_files(no_default_dirs, tmp_path):
    raw = write_raw(tmp_path / "raw", languages=("en", "fr"))
    message = load_error(tmp_path / "d", manual_dir=raw)
    assert f"{raw} lacks train.de.gz, val.de.gz, test_2016_flickr.de.gz" in message


def test_nothing_found_and_download_fails(no_default_dirs, tmp_path):
    message = load_error(tmp_path / "d")
    assert "downloading http://127.0.0.1:9/train.en.gz failed" in message
    assert multi30k.ENV_VAR in message and "github.com/multi30k/dataset" in message


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "is empty"),
        (b"not gzip at all", "is corrupt"),
        (gzip.compress(b"a sentence\n" * 100, mtime=0)[:-12], "is corrupt"),  # truncated
        (gzip.compress(b"\xff\xfe not utf-8\n", mtime=0), "is corrupt"),
        (gzip.compress(b"", mtime=0), "holds no sentences"),
    ],
)
def test_bad_raw_file(no_default_dirs, tmp_path, content, problem):
    raw = write_raw(tmp_path / "raw")
    (raw / "val.de.gz").write_bytes(content)
    message = load_error(tmp_path / "d", manual_dir=raw)
    assert f"{raw / 'val.de.gz'} {problem}" in message


def test_misaligned_files(no_default_dirs, tmp_path):
    raw = write_raw(tmp_path / "raw")
    (raw / "test_2016_flickr.de.gz").write_bytes(gzip.compress(b"only one line\n"))
    message = load_error(tmp_path / "d", manual_dir=raw)
    assert "test_2016_flickr.en.gz has 3 lines but" in message
    assert "test_2016_flickr.de.gz has 1" in message
