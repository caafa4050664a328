"""Rebuild the shipped demo corpus in `data/corpus/` from real, human-written text.

The corpus has the five domains of Reka's mix (code, stem, web, math, multilingual).
Every document comes from what the reachable package registries serve: the Python
standard library that this machine's interpreter ships, and Debian packages
(documentation, manuals, man pages, fortune collections). Nothing is generated or
templated, so token statistics, bits-per-character and tokenizer behaviour measured on
this corpus mean something.

Output (the contract in docs/ARCHITECTURE.md):
  data/corpus/{domain}/{split}-{i:05d}-of-{n:05d}.tfrecord.gz
      gzipped TFRecord of tf.train.Example with one bytes feature `text` (UTF-8);
      4 shards for `train`, 1 for `validation`.
  data/corpus/stats.json   counts per domain / split / source / language.
  data/PROVENANCE.md       sources, versions, paths, licences, counts, how to rebuild.

Rebuild (as root on Debian 12; installs the source packages first):
  python scripts/build_corpus.py --install   # apt-get install the packages, then build
  python scripts/build_corpus.py             # build from what is installed

The output is deterministic: inputs are read in sorted order, documents are selected
and assigned to splits and shards by SHA-256 of their id, and no clock or random state
is involved. Rebuilding with the same package versions gives byte-identical files.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import html
import html.parser
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("code", "stem", "web", "math", "multilingual")
NUM_TRAIN_SHARDS = 4
NUM_VALIDATION_SHARDS = 1
# Held-out validation split per domain: at least 5% of the documents, 50 documents
# and 100,000 characters (enough for a stable bits-per-character estimate).
VALIDATION_FRACTION = 0.05
MIN_VALIDATION_DOCS = 50
MIN_VALIDATION_CHARS = 100_000
# Long manuals are cut into pieces of at most this many characters at paragraph
# boundaries: a 1.4 MB TeX chapter as one document would be a single, unsplittable
# unit for the train/validation split and for seqio's per-document preprocessing.
MAX_DOC_CHARS = 12_000
MIN_DOC_CHARS = 200
# Code is cut finer (a few functions per document) so that the code domain has
# hundreds of documents, like the others, rather than ~200 whole modules.
CODE_MAX_DOC_CHARS = 4_000

DEBIAN_PACKAGES = (
    # code: none (Python standard library of the running interpreter)
    "manpages",
    "manpages-dev",
    "r-doc-info",
    "octave-doc",  # stem
    "debian-reference-en",
    "debian-faq",
    "developers-reference",
    "debian-policy",
    "maint-guide",
    "python3.11-doc",  # web
    "pari-doc",
    "maxima-doc",
    "gnuplot-doc",
    "units",
    "bc",  # math
    "fortunes-de",
    "fortunes-es",
    "fortunes-it",
    "fortunes-ru",
    "fortunes-pl",
    "fortunes-cs",
    "fortunes-br",
    "fortunes-zh",
    "fortunes-bg",
    "fortunes-eo",
    "fortunes-ga",
    "manpages-fr",
    "manpages-ja",  # multilingual
    "groff-base",  # renders man pages to text
)


@dataclasses.dataclass(frozen=True)
class Doc:
    id: str  # stable, unique within a domain; decides selection, split and shard
    text: str
    source: str
    language: str = "en"


@dataclasses.dataclass(frozen=True)
class Source:
    """One origin of documents within a domain, with a budget of characters."""

    name: str
    packages: tuple[str, ...]  # Debian packages, or () for the Python standard library
    paths: str  # human-readable description of what is read
    budget_chars: int
    docs: Callable[[], Iterable[Doc]]
    language: str = "en"


# --------------------------------------------------------------------------- helpers

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# C0 controls other than tab/newline, DEL and C1 controls: info files use \x1f and \x7f
# as markers and some fortunes carry terminal escapes; none of them is text.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ANSI_RE.sub("", text)
    text = _CONTROL_RE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def _sha(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big")


def _hash_order(items: Iterable[str], salt: str) -> list[str]:
    """A fixed pseudo-random order, so a budget samples across a source, not its head."""
    return sorted(items, key=lambda x: (_sha(salt + "\0" + x), x))


def _read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None  # the caller skips it: the corpus only ships valid UTF-8


def _chunk(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split at blank lines into pieces of at most ~max_chars (a paragraph stays whole)."""
    if len(text) <= max_chars:
        return [text]
    pieces, current, size = [], [], 0
    for para in text.split("\n\n"):
        if current and size + len(para) + 2 > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def _chunk_python(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split a module at top-level statements (def/class/decorator) so chunks parse alone."""
    if len(text) <= max_chars:
        return [text]
    lines = text.split("\n")
    blocks, current = [], []
    for i, line in enumerate(lines):
        starts_block = (
            line.startswith(("def ", "class ", "async def ", "@"))
            and i > 0
            and not lines[i - 1].startswith("@")
        )
        if starts_block and current:
            blocks.append("\n".join(current))
            current = []
        current.append(line)
    blocks.append("\n".join(current))
    pieces, current, size = [], [], 0
    for block in blocks:
        if current and size + len(block) > max_chars:
            pieces.append("\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 1
    pieces.append("\n".join(current))
    return pieces


def _pieces(
    doc_id: str,
    text: str,
    source: str,
    language: str = "en",
    chunker: Callable[[str], list[str]] = _chunk,
) -> Iterator[Doc]:
    text = _clean(text)
    parts = chunker(text)
    for k, part in enumerate(parts):
        part = part.strip("\n")
        yield Doc(f"{doc_id}#{k}" if len(parts) > 1 else doc_id, part, source, language)


# ------------------------------------------------------------------------- renderers


def _render_man(path: Path) -> str | None:
    """Render one man page with groff to plain UTF-8 text (no overstrike, no colour)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw.lstrip().startswith(b".so "):
        return None  # an alias of another page, which is read on its own
    proc = subprocess.run(
        ["groff", "-k", "-Kutf-8", "-mandoc", "-Tutf8", "-P-cbou", "-rLL=78n"],
        input=raw,
        capture_output=True,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
    )
    if proc.returncode != 0:
        return None
    try:
        return proc.stdout.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _man_pages(dirs: Iterable[Path]) -> list[Path]:
    files = []
    for d in dirs:
        files += [p for p in d.iterdir() if p.is_file() and not p.is_symlink()]
    return sorted(files)


def _info_nodes(paths: list[Path]) -> Iterator[tuple[str, str]]:
    """Yield (node name, text) for each node of an info manual (split files in order)."""
    for path in paths:
        text = _read_text(path)
        if text is None:
            continue
        for node in text.split("\x1f\n")[1:]:
            header, _, body = node.partition("\n")
            m = re.search(r"Node: ([^,\n]+)", header)
            if not m or header.startswith(("Tag Table:", "Indirect:", "End Tag Table")):
                continue
            yield m.group(1).strip(), body


def _info_files(name: str) -> list[Path]:
    """The parts of an info manual in reading order: x.info.gz, x.info-1.gz, ..."""
    base = Path("/usr/share/info")
    parts = [p for p in base.glob(f"{name}.info*.gz")]

    def order(p: Path) -> int:
        m = re.search(r"\.info-(\d+)\.gz$", p.name)
        return int(m.group(1)) if m else 0

    return sorted(parts, key=order)


class _HTMLText(html.parser.HTMLParser):
    """HTML → text sections, split at h1–h3, skipping navigation, scripts and styles."""

    _BLOCK = {
        "p",
        "div",
        "br",
        "li",
        "tr",
        "dt",
        "dd",
        "table",
        "ul",
        "ol",
        "dl",
        "blockquote",
        "section",
        "pre",
        "h4",
        "h5",
        "h6",
        "hr",
    }
    _SKIP_TAGS = {"script", "style", "head", "title"}
    _SKIP_CLASSES = (
        "navheader",
        "navfooter",
        "toc",
        "sphinxsidebar",
        "related",
        "footer",
        "headerlink",
        "breadcrumbs",
        "footnotes-title",
    )

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self._skip_stack: list[str] = []  # tags opened while skipping, to find the end
        self._pre = 0
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if self._skip_stack:
            if tag not in ("br", "hr", "img", "meta", "link", "input"):
                self._skip_stack.append(tag)
            return
        cls = dict(attrs).get("class") or ""
        if tag in self._SKIP_TAGS or any(c in cls.split() for c in self._SKIP_CLASSES):
            if tag not in ("br", "hr", "img"):
                self._skip_stack.append(tag)
            return
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        elif tag in self._BLOCK:
            self._emit("\n")
        if tag == "pre":
            self._pre += 1
        if tag == "li":
            self._emit("* ")

    def handle_endtag(self, tag):
        if self._skip_stack:
            # pop to the matching tag: sloppy HTML leaves <p> and <li> open
            if tag in self._skip_stack:
                while self._skip_stack and self._skip_stack.pop() != tag:
                    pass
            return
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            title = " ".join("".join(self._heading).split())
            self._heading = None
            self.sections.append((title, [title + "\n\n"]))
        elif tag in self._BLOCK:
            self._emit("\n")
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
            self._emit("\n")

    def handle_data(self, data):
        if self._skip_stack:
            return
        if self._heading is not None:
            self._heading.append(data)
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
        self._emit(data)

    def _emit(self, s: str):
        parts = self.sections[-1][1]
        if not self._pre and parts and parts[-1].endswith(("\n", "* ")):
            s = s.lstrip(" ")  # source indentation of the HTML is not part of the text
        if s:
            parts.append(s)

    def result(self) -> list[tuple[str, str]]:
        out = []
        for title, parts in self.sections:
            text = "".join(parts)
            # whitespace-only lines between blocks collapse to one blank line
            text = re.sub(r"\n[ \t]+\n", "\n\n", text)
            text = re.sub(
                r"^\* *\n+ *", "* ", text, flags=re.M
            )  # <li><p>: bullet, same line
            out.append((title, text))
        return out


def _html_sections(path: Path) -> list[tuple[str, str]]:
    text = _read_text(path)
    if text is None:
        return []
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return parser.result()


# --------------------------------------------------------------------------- sources


def _python_stdlib() -> Iterator[Doc]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.glob("*.py")):
        text = _read_text(path)
        if text is not None:
            yield from _pieces(
                f"python/{path.name}",
                text,
                "python-stdlib",
                "en",
                lambda t: _chunk_python(t, CODE_MAX_DOC_CHARS),
            )


def _man_source(name: str, dirs: list[str], language: str) -> Callable[[], Iterator[Doc]]:
    def gen() -> Iterator[Doc]:
        files = _man_pages(Path(d) for d in dirs)
        by_name = {str(p): p for p in files}
        for key in _hash_order(by_name, name):
            text = _render_man(by_name[key])
            if text:
                yield from _pieces(
                    f"{name}/{Path(key).parent.name}/{Path(key).name}", text, name, language
                )

    return gen


def _info_source(name: str, manuals: list[str]) -> Callable[[], Iterator[Doc]]:
    def gen() -> Iterator[Doc]:
        nodes = []
        for manual in manuals:
            for node, text in _info_nodes(_info_files(manual)):
                nodes.append((f"{manual}/{node}", text))
        texts = dict(nodes)  # a node name repeated within a manual keeps its last text
        for key in _hash_order(texts, name):
            yield from _pieces(f"{name}/{key}", texts[key], name)

    return gen


def _html_source(name: str, files: list[str]) -> Callable[[], Iterator[Doc]]:
    def gen() -> Iterator[Doc]:
        sections = {}
        for f in files:
            for k, (title, text) in enumerate(_html_sections(Path(f))):
                sections[f"{Path(f).name}/{k:03d} {title}"] = text
        for key in _hash_order(sections, name):
            yield from _pieces(f"{name}/{key}", sections[key], name)

    return gen


def _text_files_source(name: str, files: list[str]) -> Callable[[], Iterator[Doc]]:
    def gen() -> Iterator[Doc]:
        for f in _hash_order(files, name):
            text = _read_text(Path(f))
            if text is not None:
                rel = "/".join(Path(f).parts[-2:])
                yield from _pieces(f"{name}/{rel}", text, name)

    return gen


def _tex_sections() -> Iterator[Doc]:
    """PARI/GP's manual and tutorials as TeX source, split at \\section / \\subsec."""
    base = Path("/usr/share/pari/doc")
    files = sorted(base.glob("usersch*.tex")) + [
        base / "tutorial.tex",
        base / "tutorial-mf.tex",
    ]
    sections = {}
    for path in files:
        text = _read_text(path)
        if text is None:
            continue
        parts = re.split(r"\n(?=\\(?:section|subsec|subsubsec|chapter)\b)", text)
        for k, part in enumerate(parts):
            sections[f"{path.name}/{k:04d}"] = part
    for key in _hash_order(sections, "pari"):
        yield from _pieces(f"pari-doc/{key}", sections[key], "pari-doc")


def _units_definitions() -> Iterator[Doc]:
    text = _read_text(Path("/usr/share/units/definitions.units"))
    if text:
        yield from _pieces(
            "units/definitions.units", text, "units", chunker=lambda t: _chunk(t, 6000)
        )


# Fortune files by language. Directories hold one language each, except cs/ which
# also holds Slovak (klasik-sk) and the top level, which holds Portuguese (brasil)
# and Chinese (chinese, tang300, song100) next to links into the language folders.
_FORTUNE_ROOT = Path("/usr/share/games/fortunes")
_FORTUNE_FILES = {
    "de": ("fortunes-de", "de/*"),
    "es": ("fortunes-es", "es/*"),
    "it": ("fortunes-it", "it/*"),
    "ru": ("fortunes-ru", "ru/*"),
    "pl": ("fortunes-pl", "pl/*"),
    "cs": ("fortunes-cs", "cs/*"),
    "bg": ("fortunes-bg", "bg/*"),
    "eo": ("fortunes-eo", "eo/*"),
    "ga": ("fortunes-ga", "ga/*"),
    "pt": ("fortunes-br", "brasil"),
    "zh": ("fortunes-zh", "{chinese,tang300,song100}"),
}
FORTUNE_CHARS_PER_DOC = 3000


def _fortune_paths(lang: str) -> list[Path]:
    pattern = _FORTUNE_FILES["cs" if lang == "sk" else lang][1]
    names = re.match(r"\{(.*)\}", pattern)
    paths = (
        [_FORTUNE_ROOT / n for n in names.group(1).split(",")]
        if names
        else list(_FORTUNE_ROOT.glob(pattern))
    )
    keep = []
    for p in paths:
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8"):
            continue
        is_sk = "-sk" in p.name
        if (lang == "sk") == is_sk:
            keep.append(p)
    return sorted(keep)


def _fortunes(lang: str) -> Callable[[], Iterator[Doc]]:
    """Consecutive fortunes of one file grouped into pages of ~3,000 characters.

    A single fortune is a line or two; as documents they would be shorter than most
    training windows and a denoiser could hardly find spans to mask.
    """

    def gen() -> Iterator[Doc]:
        pages = {}
        for path in _fortune_paths(lang):
            text = _read_text(path)
            if text is None:
                continue
            entries = [
                _clean(e) for e in re.split(r"\n%\n", "\n" + text.replace("\r\n", "\n"))
            ]
            page, size, k = [], 0, 0
            for entry in entries:
                if not entry.strip():
                    continue
                page.append(entry)
                size += len(entry)
                if size >= FORTUNE_CHARS_PER_DOC:
                    pages[f"{path.name}/{k:04d}"] = "\n\n".join(page)
                    page, size, k = [], 0, k + 1
            if page:
                pages[f"{path.name}/{k:04d}"] = "\n\n".join(page)
        for key in _hash_order(pages, "fortunes-" + lang):
            yield from _pieces(
                f"fortunes-{lang}/{key}", pages[key], f"fortunes-{lang}", lang
            )

    return gen


def _sources() -> dict[str, list[Source]]:
    """Every source by domain, with its budget; nothing is read until `docs()` runs."""
    py = sysconfig.get_paths()["stdlib"]
    dr = "/usr/share/debian-reference"
    devref = "/usr/share/developers-reference"
    policy = "/usr/share/doc/debian-policy/policy.html"
    faq = "/usr/share/doc/debian/FAQ"
    maint = "/usr/share/doc/maint-guide/html"
    pydoc = "/usr/share/doc/python3.11/html/_sources"

    def glob(directory: str, pattern: str) -> list[str]:
        return sorted(str(p) for p in Path(directory).glob(pattern))

    fortune_src = []
    for lang in ("de", "es", "it", "ru", "pl", "cs", "sk", "pt", "zh", "bg", "eo", "ga"):
        pkg, pattern = _FORTUNE_FILES["cs" if lang == "sk" else lang]
        fortune_src.append(
            Source(
                f"fortunes-{lang}",
                (pkg,),
                f"{_FORTUNE_ROOT}/{pattern}"
                + (" (klasik-sk only)" if lang == "sk" else ""),
                220_000,
                _fortunes(lang),
                lang,
            )
        )
    return {
        "code": [
            Source(
                "python-stdlib",
                (),
                f"{py}/*.py (one document per module, long "
                "modules split at top-level def/class)",
                2_500_000,
                _python_stdlib,
            ),
        ],
        "stem": [
            Source(
                "linux-man-pages",
                ("manpages", "manpages-dev"),
                "/usr/share/man/man{2,3,4,5,7}/* rendered with groff -Tutf8",
                1_000_000,
                _man_source(
                    "linux-man-pages",
                    [f"/usr/share/man/man{s}" for s in (2, 3, 4, 5, 7)],
                    "en",
                ),
            ),
            Source(
                "r-manuals",
                ("r-doc-info",),
                "/usr/share/info/R-*.info*.gz (one document per info node)",
                800_000,
                _info_source(
                    "r-manuals",
                    ["R-intro", "R-lang", "R-data", "R-exts", "R-admin", "R-FAQ", "R-ints"],
                ),
            ),
            Source(
                "octave-manual",
                ("octave-doc",),
                "/usr/share/info/octave.info*.gz (one document per info node)",
                700_000,
                _info_source("octave-manual", ["octave"]),
            ),
        ],
        "web": [
            Source(
                "debian-reference",
                ("debian-reference-en",),
                f"{dr}/*.en.html",
                900_000,
                _html_source("debian-reference", glob(dr, "*.en.html")),
            ),
            Source(
                "debian-faq",
                ("debian-faq",),
                f"{faq}/*.html",
                400_000,
                _html_source("debian-faq", glob(faq, "*.html")),
            ),
            Source(
                "developers-reference",
                ("developers-reference",),
                f"{devref}/*.html",
                500_000,
                _html_source(
                    "developers-reference",
                    [
                        f
                        for f in glob(devref, "*.html")
                        if not f.endswith(("/search.html", "/developers-reference.html"))
                    ],
                ),
            ),
            Source(
                "debian-policy",
                ("debian-policy",),
                f"{policy}/*.html",
                500_000,
                _html_source(
                    "debian-policy",
                    [
                        f
                        for f in glob(policy, "*.html")
                        if not f.endswith(("/search.html", "/genindex.html"))
                    ],
                ),
            ),
            Source(
                "maint-guide",
                ("maint-guide",),
                f"{maint}/*.en.html",
                300_000,
                _html_source("maint-guide", glob(maint, "*.en.html")),
            ),
            Source(
                "python-docs",
                ("python3.11-doc",),
                f"{pydoc}/{{tutorial,howto,faq,whatsnew}}/*.rst.txt (reStructuredText "
                "sources; whatsnew/changelog excluded)",
                1_000_000,
                _text_files_source(
                    "python-docs",
                    [
                        f
                        for sub in ("tutorial", "howto", "faq", "whatsnew")
                        for f in glob(f"{pydoc}/{sub}", "*.rst.txt")
                        if not f.endswith(("/changelog.rst.txt", "/index.rst.txt"))
                    ],
                ),
            ),
        ],
        "math": [
            Source(
                "pari-doc",
                ("pari-doc",),
                "/usr/share/pari/doc/usersch*.tex, tutorial.tex, tutorial-mf.tex "
                "(TeX source, split at \\section/\\subsec)",
                1_000_000,
                _tex_sections,
            ),
            Source(
                "maxima-manual",
                ("maxima-doc",),
                "/usr/share/info/maxima.info*.gz (one document per info node)",
                1_000_000,
                _info_source("maxima-manual", ["maxima"]),
            ),
            Source(
                "gnuplot-manual",
                ("gnuplot-doc",),
                "/usr/share/info/gnuplot.info.gz",
                250_000,
                _info_source("gnuplot-manual", ["gnuplot"]),
            ),
            Source(
                "bc-manual",
                ("bc",),
                "/usr/share/info/bc.info.gz",
                100_000,
                _info_source("bc-manual", ["bc"]),
            ),
            Source(
                "units-definitions",
                ("units",),
                "/usr/share/units/definitions.units",
                300_000,
                _units_definitions,
            ),
        ],
        "multilingual": fortune_src
        + [
            Source(
                "manpages-fr",
                ("manpages-fr",),
                "/usr/share/man/fr/man*/* rendered with groff -Tutf8",
                300_000,
                _man_source("manpages-fr", glob("/usr/share/man/fr", "man*"), "fr"),
                "fr",
            ),
            Source(
                "manpages-ja",
                ("manpages-ja",),
                "/usr/share/man/ja/man*/* rendered with groff -Tutf8",
                300_000,
                _man_source("manpages-ja", glob("/usr/share/man/ja", "man*"), "ja"),
                "ja",
            ),
        ],
    }


# --------------------------------------------------------------------------- build


def collect(sources: list[Source]) -> list[Doc]:
    """Take each source's documents in its fixed order until its budget is spent.

    Drops short documents and exact duplicates (also across sources: the same man page
    can ship in two packages, the same fortune in two files).
    """
    seen: set[str] = set()
    out: list[Doc] = []
    for src in sources:
        used = 0
        for doc in src.docs():
            if used >= src.budget_chars:
                break
            if len(doc.text.strip()) < MIN_DOC_CHARS:
                continue
            digest = hashlib.sha256(" ".join(doc.text.split()).encode("utf-8")).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            # the source's name, not the generator's label, is what stats report
            out.append(dataclasses.replace(doc, source=src.name))
            used += len(doc.text)
    ids = [d.id for d in out]
    if len(set(ids)) != len(ids):
        dup = collections.Counter(ids).most_common(1)[0][0]
        raise RuntimeError(f"document id {dup!r} occurs twice; ids must be unique")
    return out


def assign_splits(domain: str, docs: list[Doc]) -> dict[str, str]:
    """Map doc id → split: the first documents in a fixed hash order go to validation.

    Validation takes the smallest prefix of that order holding at least
    VALIDATION_FRACTION of the documents, MIN_VALIDATION_DOCS documents and
    MIN_VALIDATION_CHARS characters, so every domain gets a held-out set big enough for
    a stable bits-per-character estimate, whatever its document sizes.
    """
    order = sorted(docs, key=lambda d: (_sha(f"split/{domain}/{d.id}"), d.id))
    chars = 0
    splits = {}
    for k, doc in enumerate(order):
        enough = (
            k >= VALIDATION_FRACTION * len(order)
            and k >= MIN_VALIDATION_DOCS
            and chars >= MIN_VALIDATION_CHARS
        )
        splits[doc.id] = "train" if enough else "validation"
        if not enough:
            chars += len(doc.text)
    return splits


def write_split(
    domain_dir: Path, split: str, docs: list[Doc], num_shards: int
) -> list[Path]:
    import tensorflow as tf  # imported late: `--help` and `--install` need no TensorFlow

    docs = sorted(docs, key=lambda d: (_sha("order/" + d.id), d.id))
    paths = []
    for i in range(num_shards):
        path = domain_dir / f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
            for doc in docs[i::num_shards]:
                example = tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            "text": tf.train.Feature(
                                bytes_list=tf.train.BytesList(
                                    value=[doc.text.encode("utf-8")]
                                )
                            )
                        }
                    )
                )
                writer.write(example.SerializeToString())
        paths.append(path)
    return paths


def _dpkg_version(pkg: str) -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", pkg],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else "not installed"


# Summaries of the copyright files that are not machine-readable (DEP-5), written
# after reading them; the files themselves stay the authority.
_LICENCE_SUMMARIES = {
    "debian-faq": "verbatim/modified copying permitted under an identical permission "
    "notice (Software in the Public Interest)",
    "maxima-doc": "GPL-2",
    "manpages-ja": "licences of the original man pages (DFSG-free), per file",
    "fortunes-eo": "public domain (Zamenhof, d. 1917); GPL for the digital edition",
    "fortunes-br": "GPL-2+",
    "fortunes-bg": "GPL-2+",
    "pari-doc": "GPL-2+",
    "python3.11-doc": "PSF-2.0 (Python Software Foundation License)",
}


def _licences(pkg: str) -> str:
    """Licence names from /usr/share/doc/PKG/copyright (DEP-5 `License:` fields)."""
    path = Path("/usr/share/doc") / pkg / "copyright"
    if not path.exists():
        return f"(no {path})"
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.startswith("Format:"):  # machine-readable: the License fields are names
        names = []
        for m in re.finditer(r"^License:\s*(\S.*)$", text, re.M):
            if m.group(1).strip() not in names:
                names.append(m.group(1).strip())
        if names:
            return ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    if pkg in _LICENCE_SUMMARIES:
        return _LICENCE_SUMMARIES[pkg]
    for key in ("GNU General Public License", "public domain", "BSD"):
        if key.lower() in text.lower():
            return f"{key} (see {path})"
    return f"see {path}"


def check_installed() -> None:
    missing = [p for p in DEBIAN_PACKAGES if _dpkg_version(p) == "not installed"]
    if missing:
        sys.exit(
            "build_corpus: these Debian packages provide the corpus text but are not "
            f"installed: {' '.join(missing)}.\nInstall them with\n  apt-get update && "
            f"apt-get install -y --no-install-recommends {' '.join(missing)}\n"
            "or run this script with --install."
        )


def install() -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES],
        check=True,
        env=env,
    )


def _provenance(stats: dict, sources: dict[str, list[Source]]) -> str:
    py = sys.version.split()[0]
    lines = [
        "# Demo corpus: provenance",
        "",
        "Generated by `scripts/build_corpus.py`; do not edit by hand. Real, human-written",
        "text from the Python standard library and Debian 12 (bookworm) packages, in the",
        "five domains of Reka's mix. Format: `corpus/{domain}/{split}-{i:05d}-of-{n:05d}"
        ".tfrecord.gz`,",
        "gzipped TFRecord of `tf.train.Example` with one bytes feature `text` (UTF-8);",
        f"{NUM_TRAIN_SHARDS} train shards and {NUM_VALIDATION_SHARDS} validation shard per "
        "domain. Counts by source and language are in `corpus/stats.json`.",
        "",
        "Processing: inputs read in sorted order; man pages rendered with `groff -k -Kutf-8 "
        "-mandoc -Tutf8 -P-cbou -rLL=78n`; info manuals split into nodes; HTML rendered to "
        "text by a small stdlib parser (navigation dropped, split at h1-h3); fortunes grouped "
        f"into pages of ~{FORTUNE_CHARS_PER_DOC:,} characters; documents longer than "
        f"{MAX_DOC_CHARS:,} characters cut at paragraph (or, for Python, top-level "
        f"statement) boundaries; documents under {MIN_DOC_CHARS} characters and exact "
        "duplicates (whitespace-normalised) dropped; control characters and terminal "
        "escapes removed; only valid UTF-8 kept. Each source is sampled in a fixed "
        "SHA-256 order of its document ids up to its character budget. Documents are ordered by "
        "SHA-256(`split/{domain}/{id}`); the shortest prefix of that order holding at least "
        f"{VALIDATION_FRACTION:.0%} of the documents, {MIN_VALIDATION_DOCS} documents and "
        f"{MIN_VALIDATION_CHARS:,} characters is `validation`, the rest `train`.",
        "",
        "Rebuild (as root on Debian 12, from the repository root):",
        "",
        "```",
        "python scripts/build_corpus.py --install   # apt-get the source packages, then build",
        "python scripts/train_tokenizer.py          # then the tokenizer, from the train split",
        "```",
        "",
        "Same package versions give byte-identical files.",
        "",
        "The tokenizer `vocab/reka_demo.model` (SentencePiece unigram, 7,680 pieces + 512 "
        "SeqIO sentinels = 8,192 ids, the tiny models' vocabulary; 512 sentinels because "
        "UL2's x1 denoiser cuts up to 511 spans at 2,048-token inputs) is trained by "
        "`scripts/train_tokenizer.py` on a balanced sample of the train split only; its "
        "settings are in that script's docstring. Retrained with other sizes, keep pieces "
        "+ sentinels equal to the models' `vocab_size` and the sentinels at least what "
        "`t5x_like.data.ul2.sentinel_budget` gives for the longest inputs you train on.",
        "",
    ]
    for domain in DOMAINS:
        d = stats["domains"][domain]
        lines += [
            f"## {domain}",
            "",
            f"{d['train']['docs']:,} train / {d['validation']['docs']:,} validation "
            f"documents; {d['train']['chars']:,} / {d['validation']['chars']:,} characters; "
            f"{d['compressed_bytes']:,} bytes compressed.",
            "",
            "| source | package (version) | paths | licence | docs | chars |",
            "|---|---|---|---|---|---|",
        ]
        for src in sources[domain]:
            s = d["sources"].get(src.name, {"docs": 0, "chars": 0})
            if src.packages:
                pkgs = "<br>".join(f"`{p}` {_dpkg_version(p)}" for p in src.packages)
                lic = "<br>".join(dict.fromkeys(_licences(p) for p in src.packages))
            else:
                pkgs = f"Python {py} standard library"
                lic = "PSF-2.0 (Python Software Foundation License)"
            lines.append(
                f"| {src.name} | {pkgs} | {src.paths} | {lic} | {s['docs']:,} | "
                f"{s['chars']:,} |"
            )
        if domain == "multilingual":
            langs = ", ".join(f"{k} {v['docs']}" for k, v in sorted(d["languages"].items()))
            lines += ["", f"Languages (documents): {langs}."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "data",
        help="output root; corpus/ and PROVENANCE.md go below it",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="apt-get install the Debian source packages first (root)",
    )
    parser.add_argument("--domains", nargs="*", default=list(DOMAINS), choices=DOMAINS)
    args = parser.parse_args(argv)
    if args.install:
        install()
    check_installed()

    all_sources = _sources()
    stats_path = args.out / "corpus" / "stats.json"
    stats = (
        json.loads(stats_path.read_text())
        if stats_path.exists() and set(args.domains) != set(DOMAINS)
        else {"domains": {}}
    )
    stats["python_version"] = sys.version.split()[0]
    for domain in args.domains:
        docs = collect(all_sources[domain])
        domain_dir = args.out / "corpus" / domain
        domain_dir.mkdir(parents=True, exist_ok=True)
        for old in domain_dir.glob("*.tfrecord.gz"):
            old.unlink()
        splits = assign_splits(domain, docs)
        by_split = {"train": [], "validation": []}
        for doc in docs:
            by_split[splits[doc.id]].append(doc)
        entry = {"sources": {}, "languages": {}, "compressed_bytes": 0}
        for split, n in (
            ("train", NUM_TRAIN_SHARDS),
            ("validation", NUM_VALIDATION_SHARDS),
        ):
            paths = write_split(domain_dir, split, by_split[split], n)
            entry[split] = {
                "docs": len(by_split[split]),
                "chars": sum(len(d.text) for d in by_split[split]),
                "compressed_bytes": sum(p.stat().st_size for p in paths),
            }
            entry["compressed_bytes"] += entry[split]["compressed_bytes"]
        for key, field in (("sources", "source"), ("languages", "language")):
            counts = collections.defaultdict(
                lambda: {"docs": 0, "chars": 0, "train": 0, "validation": 0}
            )
            for doc in docs:
                c = counts[getattr(doc, field)]
                c["docs"] += 1
                c["chars"] += len(doc.text)
                c[splits[doc.id]] += 1
            entry[key] = dict(sorted(counts.items()))
        stats["domains"][domain] = entry
        print(
            f"{domain:13s} train {entry['train']['docs']:6,} docs "
            f"{entry['train']['chars']:10,} chars | validation "
            f"{entry['validation']['docs']:5,} docs {entry['validation']['chars']:9,} chars"
            f" | {entry['compressed_bytes']:10,} bytes gz | "
            + ", ".join(
                f"{k}:{v['docs']}"
                for k, v in entry[
                    "languages" if domain == "multilingual" else "sources"
                ].items()
            ),
            flush=True,
        )
    stats["domains"] = {d: stats["domains"][d] for d in DOMAINS if d in stats["domains"]}
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path.write_text(json.dumps(stats, indent=1, sort_keys=False) + "\n")
    if set(stats["domains"]) == set(DOMAINS):
        (args.out / "PROVENANCE.md").write_text(_provenance(stats, all_sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
