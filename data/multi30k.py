"""`multi30k`: Multi30k Task 1 (en/de/fr image descriptions) as a TFDS builder, one config per pair.

Splits: `train` (29,000), `validation` (1,014; the files `val.*`) and `test` (1,000; the files
`test_2016_flickr.*`), in the order of the raw files. The raw files are the nine gzip files
`{train,val,test_2016_flickr}.{en,de,fr}.gz` of the public Multi30k repository; the builder reads the
two languages of its pair from the first of:

1. the `raw_dir` builder argument (`datasets.load(..., manual_dir=...)`, `config.manual_dir`);
2. the directory in the environment variable `SEQZOO_MULTI30K_DIR`;
3. the TFDS manual directory (`<data_dir>/downloads/manual`, or `DownloadConfig(manual_dir=...)`);
4. `<repo>/../shared/data/multi30k`;
5. a download from the public repository (`DOWNLOAD_URL`) into `<data_dir>/downloads/multi30k`.

1 and 2 must hold the files when given; 3 and 4 are used when they hold them; if 5 fails too, the
error says where to put the files.
"""

import dataclasses
import gzip
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path

import tensorflow_datasets as tfds

from data import DataError

LANGUAGES = ("en", "de", "fr")
PAIRS = ("en-de", "en-fr", "de-en", "fr-en")
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
ENV_VAR = "SEQZOO_MULTI30K_DIR"
DOWNLOAD_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{file}"
DOWNLOAD_TIMEOUT_S = 30
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
HOW_TO_GET = (
    f"put the Multi30k Task 1 files {{train,val,test_2016_flickr}}.{{en,de,fr}}.gz in a directory "
    f"and set {ENV_VAR} to it (or pass manual_dir); they are at {DOWNLOAD_URL.format(file='')}"
)


def file_names(languages: tuple[str, ...]) -> list[str]:
    """The raw file names a pair needs, e.g. `train.en.gz`."""
    return [f"{stem}.{lang}.gz" for stem in SPLIT_FILES.values() for lang in languages]


def missing_files(directory: Path, languages: tuple[str, ...]) -> list[str]:
    """The raw files of `languages` absent from `directory`."""
    return [name for name in file_names(languages) if not (directory / name).is_file()]


def read_lines(path: Path) -> list[str]:
    """The sentences of one gzip file, one per line, without line ends.

    Raises:
      DataError: the file is empty, not gzip, truncated or not UTF-8.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty: replace it with the original file ({HOW_TO_GET})")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataError(
            f"{path} is corrupt ({type(e).__name__}: {e}): replace it with the original file "
            f"({HOW_TO_GET})"
        ) from None
    if not lines:
        raise DataError(f"{path} holds no sentences: replace it with the original file")
    return lines


def download(languages: tuple[str, str], directory: Path) -> Path:
    """Downloads the raw files of `languages` into `directory` (skipping those present).

    Uses a plain HTTP client with a timeout: TFDS's downloader retries for minutes when offline.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in missing_files(directory, languages):
        url = DOWNLOAD_URL.format(file=name)
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                with tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
                    shutil.copyfileobj(response, tmp)
            os.replace(tmp.name, directory / name)
        except OSError as e:
            raise DataError(
                f"Multi30k files not found locally and downloading {url} failed ({e}): {HOW_TO_GET}"
            ) from None
    return directory


def tfds_manual_dir(dl_manager: tfds.download.DownloadManager) -> Path | None:
    """The TFDS manual directory if it exists and is not empty, else None."""
    try:
        return Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS's way of saying "missing or empty"
        return None


@dataclasses.dataclass(eq=False)
class Multi30kConfig(tfds.core.BuilderConfig):
    """A translation direction: `source` and `target` language codes."""

    source: str = "en"
    target: str = "de"


class Multi30k(tfds.core.GeneratorBasedBuilder):
    """Multi30k Task 1: image descriptions in English with German and French translations."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train, validation (val), test (test_2016_flickr)."}
    BUILDER_CONFIGS = [
        Multi30kConfig(name=pair, source=pair[:2], target=pair[3:], description=f"{pair} pairs")
        for pair in PAIRS
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

    def __init__(self, *, raw_dir: str | os.PathLike | None = None, **kwargs):
        """`raw_dir`: directory holding the raw gzip files (first place looked in, see module doc)."""
        super().__init__(**kwargs)
        self.raw_dir = raw_dir

    @property
    def languages(self) -> tuple[str, str]:
        return self.builder_config.source, self.builder_config.target

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.Translation(languages=self.languages),
            supervised_keys=self.languages,
            disable_shuffling=True,  # keep the files' order: eval output lines up with them
            homepage="https://github.com/multi30k/dataset",
            citation="Elliott et al. 2016, Multi30K: Multilingual English-German Image "
            "Descriptions; Elliott et al. 2017 (French).",
        )

    def _split_generators(self, dl_manager):
        directory = self._find_raw_dir(dl_manager)
        return {
            split: self._generate_examples(directory, stem) for split, stem in SPLIT_FILES.items()
        }

    def _generate_examples(self, directory: Path, stem: str):
        columns = [read_lines(directory / f"{stem}.{lang}.gz") for lang in self.languages]
        if len(columns[0]) != len(columns[1]):
            paths = [str(directory / f"{stem}.{lang}.gz") for lang in self.languages]
            raise DataError(
                f"{paths[0]} has {len(columns[0])} lines but {paths[1]} has {len(columns[1])}: "
                "they must be line-aligned translations; replace them with the original files"
            )
        for index, texts in enumerate(zip(*columns, strict=True)):
            yield index, dict(zip(self.languages, texts, strict=True))

    def _find_raw_dir(self, dl_manager) -> Path:
        """The directory to read the raw files from (see the module docstring for the order)."""
        for origin, value in (("manual_dir", self.raw_dir), (ENV_VAR, os.environ.get(ENV_VAR))):
            if not value:
                continue
            directory = Path(value)
            if not directory.is_dir():
                raise DataError(f"{origin} {directory} does not exist: {HOW_TO_GET}")
            if missing := missing_files(directory, self.languages):
                raise DataError(f"{origin} {directory} lacks {', '.join(missing)}: {HOW_TO_GET}")
            return directory
        for directory in (tfds_manual_dir(dl_manager), SHARED_DIR):
            if directory and directory.is_dir() and not missing_files(directory, self.languages):
                return directory
        return download(self.languages, Path(dl_manager.download_dir) / "multi30k")
