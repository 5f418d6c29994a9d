"""The README stays a user's page and its set-up stays the project's: at most 300 lines and no commit
hashes (history goes to docs/), its two set-up commands are the ones CI runs with the files they
install, its paths, layout and links (and the docs' links) resolve, and what the first command
installs runs train.py, eval.py and convert.py without PyTorch."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 300
# A word of 7-40 hex digits with at least one digit and one letter: what an abbreviated or full
# commit hash looks like (numbers such as 2,349,568 or words such as "deadbeef" are not).
HEX_WORD = re.compile(
    r"(?<![0-9A-Za-z_])(?=[0-9a-fA-F]*[0-9])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,40}(?![0-9A-Za-z_])"
)
# Packages that belong to requirements-dev.txt: tests, lint, and the PyTorch stack.
DEV_ONLY = {"torch", "transformers", "pytest", "pytest-xdist", "hypothesis", "ruff"}
FENCE = re.compile(r"^```")


def git_history(repo: Path) -> bool:
    """Whether `git` can tell commits apart here: git on PATH, `repo` a work tree with its full
    history (in a shallow clone an old hash is unknown, so it cannot be told from other hex)."""
    if shutil.which("git") is None:
        return False
    done = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=repo, capture_output=True, text=True
    )
    return done.returncode == 0 and done.stdout.strip() == "false"


def commit_hashes(text: str, repo: Path = REPO) -> list[str]:
    """The hex words of `text` that name commits: those git resolves to a commit of `repo`
    (ambiguous abbreviations included), or, where git cannot tell (no git, a shallow clone),
    every hex word of 7-40 digits with a digit and a letter."""
    words = sorted(set(HEX_WORD.findall(text)))
    if not words or not git_history(repo):
        return words
    done = subprocess.run(
        ["git", "cat-file", "--batch-check"],
        cwd=repo,
        input="".join(f"{word}^{{commit}}\n" for word in words),
        capture_output=True,
        text=True,
        check=True,
    )
    answers = done.stdout.splitlines()
    assert len(answers) == len(words), done.stdout
    return [w for w, a in zip(words, answers) if not a.endswith(" missing")]


def outside_code(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[list[str]]:
    """The fenced code blocks of a markdown text, each as its lines."""
    blocks, current = [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercased, punctuation other than - and _ dropped, spaces
    as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in outside_code(path.read_text()):
        if match := re.match(r"#{1,6} (.*)", line):
            slug = anchor(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links and image sources of a markdown file (outside code) whose file, or whose
    #anchor in it, does not exist."""
    text = "\n".join(outside_code(path.read_text()))
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


def test_readme_is_at_most_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): the README is for users; move "
        "history, method and details to docs/"
    )


def test_readme_names_no_commit():
    found = commit_hashes(README.read_text())
    assert not found, (
        f"README.md names commits {found}: figures must reproduce at HEAD with the commands shown; "
        "what only an old commit reproduces goes to docs/results.md or docs/benchmarks_*.md"
    )


def test_commit_check_finds_commits_and_nothing_else():
    prose = "2,349,568 params, float32, 1e-5, deadbeef, a [4088, 8000] matmul, decode_pair.py"
    assert commit_hashes(prose) == []
    if git_history(REPO):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert commit_hashes(f"measured at {head[:7]}, then {head}.") == sorted([head[:7], head])
        assert commit_hashes("ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00") == []  # hex, no commit
    else:
        assert commit_hashes("measured at 4cfd7cf.") == ["4cfd7cf"]


def test_setup_commands_are_cis_and_install_the_right_files():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    installs = [line for line in ci if re.match(r"python -m pip install .*-r ", line)]
    tests = [line for line in ci if line.startswith("python -m pytest")]
    assert len(installs) == 1 and len(tests) == 1, (
        ".ci/run: one `pip install -r` and one pytest line"
    )
    requirements = installs[0].split("-r ")[-1].strip()
    assert requirements == "requirements-dev.txt"
    commands = {line.strip() for block in code_blocks(README.read_text()) for line in block}
    test_command = f"pip install -r {requirements} && {tests[0]}"
    assert test_command in commands, (
        f"README.md's set-up must show .ci/run's test command: {test_command}"
    )
    assert "pip install -r requirements.txt && python train.py" in commands


def requirement_names(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-"))
    return names


def test_requirements_split_runtime_from_dev():
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    first = next(line for line in dev if line.strip() and not line.startswith("#"))
    assert first == "-r requirements.txt", "requirements-dev.txt must start from requirements.txt"
    runtime = set(requirement_names(REPO / "requirements.txt"))
    assert not runtime & DEV_ONLY, (
        f"requirements.txt: {sorted(runtime & DEV_ONLY)} belong in requirements-dev.txt"
    )
    assert DEV_ONLY <= set(requirement_names(REPO / "requirements-dev.txt"))


def test_entry_scripts_import_without_torch():
    blocked = "import sys\nfor name in ('torch', 'transformers'):\n    sys.modules[name] = None\n"
    done = subprocess.run(
        [sys.executable, "-c", blocked + "import train, eval, convert"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        "train.py, eval.py or convert.py imports torch or transformers at import time (they belong "
        f"to requirements-dev.txt; import them where a .bin checkpoint is read):\n{done.stderr[-2000:]}"
    )


def repo_files() -> set[str]:
    """Every file and folder of the checkout, relative to it (no git, no virtualenvs, no runs)."""
    skip = {".git", ".venv", "venv", "__pycache__", "runs"}
    paths = (p.relative_to(REPO) for p in REPO.rglob("*"))
    return {str(p) for p in paths if not skip & set(p.parts)}


def layout_paths(block: list[str]) -> list[str]:
    """The paths a layout block names. A line is `<paths>  <what>` (a line that starts with spaces
    goes on with the `<what>` above); after a folder, `<what>` lists its modules, files and
    subfolders as comma- or semicolon-separated names; text in parentheses and chunks of more than
    one word are commentary."""
    paths, folder = [], None
    for line in block:
        items = line.strip()
        if not line.startswith(" "):
            head, *rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            items = rest[0] if rest else ""
            entries = [entry.strip() for entry in head.split(",") if entry.strip()]
            paths += entries
            folder = entries[-1] if entries[-1].endswith("/") else None
        if folder:
            for chunk in re.split(r"[,;]", re.sub(r"\([^)]*\)", "", items)):
                if re.fullmatch(r"\w+(\.\w+)?", chunk.strip()):
                    paths.append(folder + chunk.strip())
    return paths


def test_readme_paths_and_layout_exist():
    text = README.read_text()
    files = repo_files()
    names = {Path(f).name for f in files}
    named = set(re.findall(r"(?<![\w./~-])((?:[\w-]+/)+[\w-]+\.(?:py|cc|txt|md|png))", text))
    missing = sorted(path for path in named if path not in files)
    missing += sorted(
        n for n in set(re.findall(r"(?<![\w./-])([\w-]+\.py)\b", text)) if n not in names
    )
    layout = next(
        block for block in code_blocks(text) if any(line.startswith("models/") for line in block)
    )
    for path in layout_paths(layout):
        stem = path.rstrip("/")
        if not any(f == stem or f.startswith((stem + ".", stem + "/")) for f in files):
            missing.append(path)
    assert not missing, f"README.md names paths that do not exist (update it): {missing}"


def test_layout_paths_reads_folders_and_their_modules():
    block = [
        "train.py, eval.py   entry scripts (two)",
        "models/       transformer (+ layers), int8; common",
        "              registry, the rest of it",
        "configs/      experiment configs",
    ]
    assert layout_paths(block) == [
        "train.py",
        "eval.py",
        "models/",
        "models/transformer",
        "models/int8",
        "models/common",
        "models/registry",
        "configs/",
    ]


@pytest.mark.parametrize(
    "doc", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_markdown_links_resolve(doc):
    assert not broken_links(doc), f"{doc.relative_to(REPO)}: broken links {broken_links(doc)}"


def test_docs_named_anywhere_exist():
    pattern = re.compile(r"\bdocs/[\w-]+\.md\b")
    named = {}
    for path in REPO.rglob("*"):
        parts = set(path.relative_to(REPO).parts)
        if path.suffix not in {".py", ".md", ".cc", ".txt", ""} or not path.is_file():
            continue
        if parts & {".git", ".venv", "venv", "__pycache__", "runs", ".hypothesis"}:
            continue
        for doc in pattern.findall(path.read_text(errors="replace")):
            if not (REPO / doc).is_file():
                named.setdefault(doc, []).append(str(path.relative_to(REPO)))
    assert not named, f"files that name docs that do not exist (update them): {named}"
