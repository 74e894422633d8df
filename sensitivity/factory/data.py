"""Real text for moeplan's reference models: sources, document splits, tokenizer.

Four offline sources of naturally written text, each cut into documents (a source file, a
documentation page, a Bible chapter) and tagged with a domain:

==========  ========================================  =======  ===============================
source      what                                      domain   licence
==========  ========================================  =======  ===============================
stdlib      CPython standard-library sources (.py)    code     PSF-2.0
pydoc       Python 3.11 documentation, reST sources   prose    PSF-2.0
kjv         King James Bible, one chapter a document  prose    public domain
handbook    The Debian Administrator's Handbook       prose    GPL-2.0+ or CC-BY-SA-3.0
==========  ========================================  =======  ===============================

Documents are assigned to train / valid / calib by a keyed SHA-256 of their id, never by
position, so the three splits are disjoint by construction (and exact duplicates are dropped
first, so they are disjoint by content too). The valid and calib splits ship with the package,
so they are small and drawn only from permissively licensed or public-domain sources; the
handbook is used for training only.

    python -m moeplan.sensitivity.factory.data prepare --out DIR     # installs missing Debian packages, writes DIR
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moeplan.kernels.outputs import write_text

CORPUS_VERSION = 1
SPLITS = ("train", "valid", "calib")
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
# Salt of the split hash: changing it reshuffles every document between the splits.
SPLIT_SALT = "moeplan-corpus-v1"
# Per permissively licensed source, the most characters its documents may contribute to the
# valid and to the calib split (three such sources: about 190 KB per split).
SHIPPED_CHARS_PER_SOURCE = 64_000
# Documents longer than this go to train, so one big file cannot fill a shipped split alone.
SHIPPED_MAX_DOC_CHARS = 16_000


@dataclass(frozen=True)
class Source:
    name: str
    domain: str  # "code" or "prose"
    licence: str
    permissive: bool  # may ship in the package's valid / calib text
    description: str
    origin: str
    apt_package: str | None


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "stdlib",
            "code",
            "PSF-2.0 (Python Software Foundation License; bundled third-party notices in CPython's LICENSE are permissive)",
            True,
            "CPython standard-library sources (.py files; tests, encodings tables, pydoc_data and site-packages left out)",
            "sysconfig.get_paths()['stdlib'] of the running interpreter",
            None,
        ),
        Source(
            "pydoc",
            "prose",
            "PSF-2.0 (Python documentation licence)",
            True,
            "Python 3.11 documentation, reStructuredText sources (.rst.txt), one page a document",
            "/usr/share/doc/python3.11/html/_sources (Debian package python3.11-doc)",
            "python3.11-doc",
        ),
        Source(
            "kjv",
            "prose",
            "public domain (King James Version, 1611)",
            True,
            "King James Bible, one chapter a document (1,189 chapters)",
            "`bible -f Gen1:1-Rev22:21` (Debian package bible-kjv)",
            "bible-kjv",
        ),
        Source(
            "handbook",
            "prose",
            "GPL-2.0+ or CC-BY-SA-3.0 (training only; never shipped)",
            False,
            "The Debian Administrator's Handbook, English HTML pages converted to text, one page a document",
            "/usr/share/doc/debian-handbook/html/en-US (Debian package debian-handbook)",
            "debian-handbook",
        ),
    )
}

PYDOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
HANDBOOK_ROOT = Path("/usr/share/doc/debian-handbook/html/en-US")
BIBLE_BIN = "bible"

# Standard-library parts that are tests, generated tables or data rather than written code.
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__", "__phello__"}


@dataclass(frozen=True)
class Document:
    doc_id: str  # "<source>:<name inside the source>"
    source: str
    domain: str
    text: str
    sha256: str = field(default="", compare=False)

    @staticmethod
    def make(source: str, name: str, text: str) -> Document:
        src = SOURCES[source]
        return Document(f"{source}:{name}", source, src.domain, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


# ----------------------------------------------------------------------------------- sources


def _stdlib_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield Document.make("stdlib", rel.as_posix(), text)


def _pydoc_documents() -> Iterator[Document]:
    for path in sorted(PYDOC_ROOT.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="strict")
        if text.strip():
            yield Document.make("pydoc", path.relative_to(PYDOC_ROOT).as_posix(), text)


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _kjv_documents() -> Iterator[Document]:
    exe = shutil.which(BIBLE_BIN)
    if exe is None:
        raise FileNotFoundError("the `bible` program (Debian package bible-kjv) is not installed")
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    chapter_key, lines, order = None, [], 0
    for raw in out.splitlines():
        m = _VERSE.match(raw.strip())
        if m is None:
            if raw.strip() and lines:  # a verse wrapped onto a second line
                lines[-1] += " " + raw.strip()
            continue
        book, chap, verse, words = m.groups()
        key = (book, int(chap))
        if key != chapter_key:
            if lines:
                yield _kjv_chapter(order, chapter_key, lines)
                order += 1
            chapter_key, lines = key, []
        lines.append(f"{verse} {words}")
    if lines:
        yield _kjv_chapter(order, chapter_key, lines)


def _kjv_chapter(order: int, key: tuple[str, int], verses: list[str]) -> Document:
    book, chap = key
    text = f"{book} {chap}\n\n" + "\n".join(verses) + "\n"
    return Document.make("kjv", f"{order:04d}-{book}{chap}", text)


class _HandbookText(html.parser.HTMLParser):
    """Text of one publican-generated handbook page: navigation dropped, <pre> kept verbatim."""

    _BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "dt", "dd", "br", "table", "pre", "ul", "ol"}
    _SKIP_IDS = {"banner", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0  # > 0 inside head / navigation / scripts
        self._stack: list[bool] = []  # per open element: does it start a skipped region
        self._pre = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        skip = (
            tag in ("head", "script", "style")
            or a.get("id") in self._SKIP_IDS
            or "docnav" in (a.get("class") or "").split()
        )
        if tag in ("br", "img", "meta", "link", "hr", "input"):
            if tag == "br" and not self._skip_depth:
                self.parts.append("\n")
            return
        self._stack.append(skip)
        if skip:
            self._skip_depth += 1
        if tag == "pre":
            self._pre += 1
        if tag in self._BLOCK and not self._skip_depth:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta", "link", "hr", "input") or not self._stack:
            return
        skip = self._stack.pop()
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self._BLOCK and not self._skip_depth:
            self.parts.append("\n")
        if skip:
            self._skip_depth -= 1

    def handle_data(self, data):
        if self._skip_depth:
            return
        self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        raw = "".join(self.parts)
        lines = [ln.rstrip() for ln in raw.split("\n")]
        out: list[str] = []
        for ln in lines:
            if not self._keep_indent(ln):
                ln = ln.strip()
            if ln or (out and out[-1]):
                out.append(ln)
        return "\n".join(out).strip() + "\n"

    @staticmethod
    def _keep_indent(line: str) -> bool:
        return line.startswith("  ") and not line.strip().startswith(("•",))


def _handbook_documents() -> Iterator[Document]:
    for path in sorted(HANDBOOK_ROOT.glob("*.html")):
        parser = _HandbookText()
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        text = parser.text()
        if len(text.strip()) > 200:
            yield Document.make("handbook", path.name, text)


_READERS = {"stdlib": _stdlib_documents, "pydoc": _pydoc_documents, "kjv": _kjv_documents, "handbook": _handbook_documents}


def _source_available(name: str) -> bool:
    if name == "stdlib":
        return True
    if name == "pydoc":
        return PYDOC_ROOT.is_dir()
    if name == "kjv":
        return shutil.which(BIBLE_BIN) is not None
    if name == "handbook":
        return HANDBOOK_ROOT.is_dir()
    raise KeyError(name)


def ensure_sources(install: bool = True) -> None:
    """Install the Debian packages of any missing source (apt), or say how to."""
    missing = [SOURCES[n].apt_package for n in SOURCES if not _source_available(n)]
    if not missing:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if not install or shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeError(
            f"corpus sources missing: Debian packages {', '.join(missing)} are not installed. "
            f"Run `apt-get update && {' '.join(cmd)}` as root, then rerun."
        )
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(cmd, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    still = [n for n in SOURCES if not _source_available(n)]
    if still:
        raise RuntimeError(f"after apt-get install the sources {still} are still missing")


def iter_documents(sources: Iterable[str] = tuple(SOURCES)) -> Iterator[Document]:
    """Every document of the named sources, deduplicated by content, in a fixed order."""
    seen: set[str] = set()
    for name in sources:
        if name not in _READERS:
            raise KeyError(f"unknown source {name!r}; known: {sorted(_READERS)}")
        for doc in _READERS[name]():
            if doc.sha256 in seen:
                continue
            seen.add(doc.sha256)
            yield doc


# ------------------------------------------------------------------------------------ splits


def split_key(doc_id: str) -> str:
    """The keyed hash that orders documents for the split (hex, compares as a uniform number)."""
    return hashlib.sha256(f"{SPLIT_SALT}\0{doc_id}".encode("utf-8")).hexdigest()


def split_documents(docs: Iterable[Document]) -> dict[str, list[Document]]:
    """Assign every document to exactly one split.

    Per source, documents are visited in order of their keyed id hash. A permissive source fills
    the valid split up to SHIPPED_CHARS_PER_SOURCE characters, then calib likewise (documents over
    SHIPPED_MAX_DOC_CHARS, or that would overflow the budget, are skipped over to train); all
    other documents, and every document of a non-permissive source, go to train.
    """
    by_source: dict[str, list[Document]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for source, items in by_source.items():
        items.sort(key=lambda d: split_key(d.doc_id))
        room = {"valid": SHIPPED_CHARS_PER_SOURCE, "calib": SHIPPED_CHARS_PER_SOURCE} if SOURCES[source].permissive else {}
        for d in items:
            dest = "train"
            if len(d.text) <= SHIPPED_MAX_DOC_CHARS:
                for split in ("valid", "calib"):
                    if room.get(split, 0) >= len(d.text):
                        room[split] -= len(d.text)
                        dest = split
                        break
            out[dest].append(d)
    for split in SPLITS:  # a stable, source-mixed order inside each split
        out[split].sort(key=lambda d: split_key(d.doc_id))
    return out


# ------------------------------------------------------------------------------ on-disk form
#
# A split on disk is <split>.txt (documents joined by a blank line) plus its entry in
# documents.json: per document id, source, domain, sha256 and [start, end) character offsets
# into the .txt. Train documents are listed with ids and hashes even where no text ships.

DOC_SEPARATOR = "\n\n"


def write_split(path: Path, docs: list[Document]) -> list[dict]:
    entries, pos, chunks = [], 0, []
    for i, d in enumerate(docs):
        if i:
            chunks.append(DOC_SEPARATOR)
            pos += len(DOC_SEPARATOR)
        chunks.append(d.text)
        entries.append({"id": d.doc_id, "source": d.source, "domain": d.domain, "sha256": d.sha256, "start": pos, "end": pos + len(d.text)})
        pos += len(d.text)
    write_text(path, "".join(chunks), "split")
    return entries


def read_split(text_path: Path, entries: list[dict]) -> list[Document]:
    with open(text_path, encoding="utf-8", newline="") as f:
        text = f.read()
    docs = []
    for e in entries:
        body = text[e["start"] : e["end"]]
        d = Document(e["id"], e["source"], e["domain"], body, e["sha256"])
        if hashlib.sha256(body.encode("utf-8")).hexdigest() != e["sha256"]:
            raise ValueError(f"{text_path}: document {e['id']} does not match its sha256 in documents.json; the file was edited or truncated")
        docs.append(d)
    return docs


def sources_manifest() -> dict:
    return {
        n: {"domain": s.domain, "licence": s.licence, "shipped": s.permissive, "description": s.description, "origin": s.origin}
        for n, s in SOURCES.items()
    }


def prepare(out: Path, install: bool = True, tokenizer: bool = True) -> dict:
    """Build the corpus (and its tokenizer) under `out`; returns the manifest written there."""
    out.mkdir(parents=True, exist_ok=True)
    ensure_sources(install)
    docs = list(iter_documents())
    splits = split_documents(docs)
    manifest: dict = {"corpus_version": CORPUS_VERSION, "split_salt": SPLIT_SALT, "python_version": sys.version.split()[0], "sources": sources_manifest(), "splits": {}}
    for split in SPLITS:
        manifest["splits"][split] = write_split(out / f"{split}.txt", splits[split])
    manifest["stats"] = corpus_stats(splits)
    write_text(out / "documents.json", json.dumps(manifest, indent=1) + "\n", "manifest")
    if tokenizer:
        tok = train_tokenizer(d.text for d in splits["train"])
        save_tokenizer(tok, out / "tokenizer")
    return manifest


def corpus_stats(splits: dict[str, list[Document]]) -> dict:
    stats: dict = {}
    for split, docs in splits.items():
        per: dict = {}
        for d in docs:
            s = per.setdefault(d.source, {"documents": 0, "chars": 0, "bytes": 0})
            s["documents"] += 1
            s["chars"] += len(d.text)
            s["bytes"] += len(d.text.encode("utf-8"))
        stats[split] = per
    return stats


def load_corpus(root: Path) -> tuple[dict, dict[str, list[Document]]]:
    manifest = json.loads((root / "documents.json").read_text(encoding="utf-8"))
    if manifest.get("corpus_version") != CORPUS_VERSION:
        raise ValueError(f"{root}: corpus version {manifest.get('corpus_version')} != {CORPUS_VERSION}; rebuild it with `python -m moeplan.sensitivity.factory.data prepare --out {root}`")
    return manifest, {s: read_split(root / f"{s}.txt", manifest["splits"][s]) for s in SPLITS}


# --------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (GPT-2 style pre-tokenization, lossless on any UTF-8 text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by PreTrainedTokenizerFast / AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.save_pretrained(str(out_dir))


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def encode_documents(tokenizer, docs: list[Document]) -> list[list[int]]:
    """Token ids per document (no special tokens added)."""
    texts = [d.text for d in docs]
    enc = tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in enc]


# ---------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeplan.sensitivity.factory.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="install missing sources, build train/valid/calib and the tokenizer")
    pp.add_argument("--out", required=True, type=Path, help="directory for train/valid/calib .txt, documents.json, tokenizer/")
    pp.add_argument("--no-install", action="store_true", help="fail instead of running apt-get for missing sources")
    pp.add_argument("--no-tokenizer", action="store_true", help="skip training the BPE tokenizer")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        m = prepare(args.out, install=not args.no_install, tokenizer=not args.no_tokenizer)
        for split in SPLITS:
            per = m["stats"][split]
            total = sum(v["bytes"] for v in per.values())
            detail = ", ".join(f"{k} {v['documents']} docs / {v['bytes'] / 1e6:.2f} MB" for k, v in sorted(per.items()))
            print(f"{split:5s} {total / 1e6:7.2f} MB  ({detail})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
