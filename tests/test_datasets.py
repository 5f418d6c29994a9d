import grain
import pytest

from data import DataError, datasets


def load_error(name, split="train", **kwargs) -> str:
    with pytest.raises(DataError) as info:
        datasets.load(name, split, **kwargs)
    message = str(info.value)
    assert "\n" not in message and info.value.__cause__ is None
    return message


def test_load_gives_text_pairs(tfds_data_dir):
    pairs = datasets.load("dates/tiny", "validation", data_dir=tfds_data_dir)
    assert len(pairs) == 200 and pairs.keys == ("source", "target")
    source, target = pairs[7]
    assert isinstance(source, str) and isinstance(target, str) and len(target) == 10
    assert pairs.__getitems__([7, 3]) == [pairs[7], pairs[3]]
    sources, targets = pairs.columns()
    assert list(zip(sources, targets, strict=True)) == [pairs[i] for i in range(len(pairs))]


def test_text_pairs_is_a_grain_source(tfds_data_dir):
    pairs = datasets.load("dates/tiny", "test", data_dir=tfds_data_dir)
    ds = grain.MapDataset.source(pairs).map(lambda pair: pair[1])
    assert [ds[i] for i in range(3)] == [pairs[i][1] for i in range(3)]


def test_tfds_translation_dataset_resolves_by_name(tmp_path):
    """The same code path serves TFDS datasets (preparing WMT needs the network, naming doesn't)."""
    builder = datasets.builder("wmt14_translate/de-en", data_dir=tmp_path)
    assert builder.info.supervised_keys == ("de", "en")


def test_unknown_dataset(tmp_path):
    message = load_error("no_such_dataset", data_dir=tmp_path)
    assert "unknown dataset 'no_such_dataset'" in message and "multi30k/en-de" in message


def test_unknown_language_pair(tmp_path):
    message = load_error("multi30k/en-xx", data_dir=tmp_path)
    assert "unknown language pair in 'multi30k/en-xx'" in message
    assert "en-de, en-fr, de-en, fr-en" in message


def test_unknown_config(tmp_path):
    message = load_error("dates/huge", data_dir=tmp_path)
    assert "unknown config or version in 'dates/huge'" in message and "default, tiny" in message


def test_unknown_split(tfds_data_dir):
    message = load_error("dates/tiny", "dev", data_dir=tfds_data_dir)
    assert "has no split 'dev'" in message and "validation" in message


def test_not_a_translation_dataset(tmp_path):
    message = load_error("mnist", data_dir=tmp_path)
    assert "'mnist' is not a translation dataset" in message


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a directory cannot be made below a file, even by root
    message = load_error("dates/tiny", data_dir=blocker / "tfds")
    assert f"data_dir {blocker / 'tfds'} is not writable" in message
    assert "pass a writable data_dir" in message


def test_prepared_data_dir_needs_no_writing(tfds_data_dir, monkeypatch):
    monkeypatch.setattr(datasets, "_check_writable", lambda _: pytest.fail("checked writable"))
    assert len(datasets.load("dates/tiny", "test", data_dir=tfds_data_dir)) == 200
