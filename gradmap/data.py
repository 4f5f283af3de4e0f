"""Calibration and evaluation text: sources, splits and fixed-length token windows.

Default text: the English Wikipedia articles shipped in gensim's test data (a 2016 MediaWiki XML export, CC BY-SA),
wiki markup stripped with ``mwparserfromhell``. The articles are split by article, never inside one: the first 80 %
(in file order) are the calibration split, the last 20 % the test split, so no test text is seen while pruning.
Any user text file (e.g. WikiText-2's ``wiki.test.raw``) can be used instead; one file used for both calibration and
evaluation is split the same way (first 80 % / last 20 %, at a line break; see :func:`load_text`).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .paths import cache_dir

WIKI = "wiki"
SPLITS = ("calibration", "test")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_CALIBRATION_FRACTION = 0.8


def _wiki_dump() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default text needs gensim's test data: pip install --no-deps gensim==4.4.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / _WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"gensim is installed but {path} is missing")
    return path


def wiki_articles() -> list[dict]:
    """Return the Wikipedia articles of gensim's test dump as ``[{"title": str, "text": str}, ...]`` in file order.

    Only main-namespace pages that are not redirects are kept; markup is stripped with ``mwparserfromhell``.
    The result is cached as JSON under ``cache_dir()/wiki`` (written atomically).

    Raises:
        FileNotFoundError: if gensim (its data file) is not installed.
    """
    cached = cache_dir() / "wiki" / "articles.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    import mwparserfromhell

    articles = []
    with bz2.open(_wiki_dump(), "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            is_redirect = elem.find("{*}redirect") is not None or text.lstrip().lower().startswith("#redirect")
            if ns is not None and ns.text == "0" and not is_redirect and text.strip():
                plain = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
                plain = "\n".join(line.strip() for line in plain.splitlines())
                while "\n\n\n" in plain:
                    plain = plain.replace("\n\n\n", "\n\n")
                articles.append({"title": title, "text": f"{title}\n\n{plain.strip()}"})
            elem.clear()
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(articles, out)
    os.replace(tmp, cached)
    return articles


def load_text(source: str | os.PathLike = WIKI, split: str = "calibration") -> str:
    """Return the text of ``split`` of ``source``.

    Args:
        source: ``"wiki"`` (bundled Wikipedia articles, split 80/20 by article) or a path to a UTF-8 text file.
        split: ``"calibration"``, ``"test"`` or ``"all"``. A user file is split deterministically at the first line
            break at or after 80 % of its characters (no line break there: at exactly 80 %): ``"calibration"`` is
            the part before, ``"test"`` the part after, so calibrating and evaluating on the same file never sees a
            test token while pruning. ``"all"`` returns the whole file (use it when the calibration and test texts
            are different files). For ``"wiki"``, ``"all"`` is every article.

    Raises:
        ValueError: for an unknown split, or a split of a user file that comes out empty.
        FileNotFoundError: if the file does not exist. IsADirectoryError: if ``source`` is a directory.
        ValueError: also if the file is not UTF-8.
    """
    if split not in SPLITS + ("all",):
        raise ValueError(f"split: {split!r} is not one of {SPLITS + ('all',)}")
    if str(source) == WIKI:
        articles = wiki_articles()
        cut = int(len(articles) * _CALIBRATION_FRACTION)
        chosen = {"calibration": articles[:cut], "test": articles[cut:], "all": articles}[split]
        return "\n\n".join(a["text"] for a in chosen)
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(f"text: {str(path)!r} is a directory; give a UTF-8 text file or {WIKI!r}")
    if not path.is_file():
        raise FileNotFoundError(f"text: file {str(path)!r} does not exist (give a text file or {WIKI!r})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text: file {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if split == "all":
        return text
    cut = split_point(text)
    part = text[:cut] if split == "calibration" else text[cut:]
    if not part.strip():
        raise ValueError(f"text: the {split} part of {str(path)!r} (split at character {cut} of {len(text)}) is empty; "
                         "give a longer file or separate calibration and test files")
    return part


def split_point(text: str, fraction: float = _CALIBRATION_FRACTION) -> int:
    """Character index where a user text is split into calibration (before) and test (after): the first line break
    at or after ``fraction`` of the characters, or exactly ``int(fraction * len(text))`` if there is none."""
    cut = int(len(text) * fraction)
    newline = text.find("\n", cut)
    return newline + 1 if newline >= 0 else cut


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize ``text`` as one stream.

    Returns:
        LongTensor ``[num_tokens]`` of token ids (no special tokens added).
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Calibration:
    """A calibration set: ``nsamples`` token windows of ``seqlen`` tokens.

    Attributes:
        input_ids: LongTensor ``[nsamples, seqlen]``.
        attention_mask: LongTensor ``[nsamples, seqlen]``; 1 for real tokens, 0 for padding. Padding tokens are
            excluded from the loss, the scores and every hidden-state statistic.
        spec: how the set was made (source, seqlen, nsamples, seed, tokens) for the report.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spec: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.input_ids.dim() != 2:
            raise ValueError(f"calibration: input_ids must be [nsamples, seqlen], got shape {tuple(self.input_ids.shape)}")
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.input_ids)
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError("calibration: attention_mask and input_ids differ in shape "
                             f"{tuple(self.attention_mask.shape)} vs {tuple(self.input_ids.shape)}")
        if int(self.attention_mask.sum()) < 2:
            raise ValueError("calibration: fewer than 2 real tokens; nothing to score")

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """Number of predicted tokens: positions whose token and next token are both real."""
        m = self.attention_mask
        return int((m[:, 1:] * m[:, :-1]).sum())

    def batches(self, micro_batch: int):
        """Yield ``(input_ids, attention_mask)`` slices of at most ``micro_batch`` windows, in order."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch: must be >= 1, got {micro_batch}")
        for start in range(0, self.nsamples, micro_batch):
            yield self.input_ids[start:start + micro_batch], self.attention_mask[start:start + micro_batch]

    def split(self, holdout: int) -> tuple["Calibration", "Calibration"]:
        """Split off the last ``holdout`` windows: returns ``(fit, held_out)``."""
        if not 0 < holdout < self.nsamples:
            raise ValueError(f"holdout: need 0 < holdout < nsamples={self.nsamples}, got {holdout}")
        k = self.nsamples - holdout
        return (Calibration(self.input_ids[:k], self.attention_mask[:k], dict(self.spec, part="fit")),
                Calibration(self.input_ids[k:], self.attention_mask[k:], dict(self.spec, part="holdout")))

    def folds(self, k: int) -> list["Calibration"]:
        """Split the windows into ``k`` contiguous groups, in order, for k-fold cross-validation.

        Sizes differ by at most one: the first ``nsamples % k`` groups hold one window more. The groups are views of
        this set's tensors (no copy); ``spec`` gains ``part="fold i/k"``.

        Raises:
            ValueError: ``k`` not an int with ``1 <= k <= nsamples``, or a group with fewer than 2 real tokens
                (heavily padded windows; use fewer groups).
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.nsamples:
            raise ValueError(f"folds: need an int with 1 <= k <= nsamples={self.nsamples}, got {k!r}")
        size, extra = divmod(self.nsamples, k)
        parts, start = [], 0
        for i in range(k):
            stop = start + size + (1 if i < extra else 0)
            mask = self.attention_mask[start:stop]
            if int(mask.sum()) < 2:
                raise ValueError(f"folds: group {i} (windows {start}..{stop - 1}) has fewer than 2 real tokens; "
                                 "use fewer folds")
            parts.append(Calibration(self.input_ids[start:stop], mask, dict(self.spec, part=f"fold {i}/{k}")))
            start = stop
        return parts


def build_calibration(tokenizer, text: str, *, nsamples: int = 32, seqlen: int = 256, seed: int = 0,
                      source: str = WIKI, max_length: int | None = None,
                      exclude: list[int] | tuple[int, ...] = ()) -> Calibration:
    """Sample ``nsamples`` windows of ``seqlen`` consecutive tokens from ``text``, deterministically.

    The text is tokenized as one stream and cut into the ``len // seqlen`` non-overlapping windows; ``nsamples`` of
    them are drawn without replacement by a ``torch.Generator`` seeded with ``seed`` (same seed, same windows). Every
    window is full, so the attention mask is all ones.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the calibration text.
        nsamples: number of windows (>= 1).
        seqlen: tokens per window (>= 2, <= ``max_length`` when given).
        seed: sampling seed.
        source: recorded in ``spec``.
        max_length: the model's maximum sequence length (``max_position_embeddings``), checked against ``seqlen``.
        exclude: window indices (of the same ``seqlen`` cut) that may not be drawn, e.g. another set's
            ``spec["windows"]`` to make a held-out set that shares no window with it.

    Raises:
        ValueError: bad ``nsamples``/``seqlen``, ``seqlen`` above ``max_length``, or text shorter than one window
            (the message gives the token count).
    """
    if nsamples < 1:
        raise ValueError(f"nsamples: must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise ValueError(f"seqlen: must be >= 2, got {seqlen}")
    if max_length is not None and seqlen > max_length:
        raise ValueError(f"seqlen: {seqlen} exceeds the model's maximum sequence length {max_length}")
    ids = tokenize(tokenizer, text)
    nwin = ids.numel() // seqlen
    if nwin < 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens, shorter than one window of seqlen={seqlen}")
    excluded = {int(i) for i in exclude}
    free = nwin - len(excluded & set(range(nwin)))
    if nsamples > free:
        raise ValueError(f"nsamples: {nsamples} windows of {seqlen} tokens requested but the text holds only {free}"
                         + (f" (of {nwin}, {nwin - free} excluded)" if excluded else ""))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(nwin, generator=gen)
    picks = order[~torch.isin(order, torch.tensor(sorted(excluded), dtype=order.dtype))][:nsamples].sort().values
    windows = ids[: nwin * seqlen].view(nwin, seqlen)[picks].clone()
    spec = {"source": str(source), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "tokens": nsamples * seqlen, "text_tokens": int(ids.numel()), "windows": picks.tolist()}
    return Calibration(windows, torch.ones_like(windows), spec)


def calibration_from_texts(tokenizer, texts: list[str], *, seqlen: int, pad_token_id: int | None = None) -> Calibration:
    """One window per text (truncated to ``seqlen``, right-padded), for users whose calibration set is documents.

    Returns a :class:`Calibration` whose ``attention_mask`` marks the padding with 0.

    Raises:
        ValueError: if ``texts`` is empty or ``seqlen`` < 2.
    """
    if not texts:
        raise ValueError("texts: empty list")
    if seqlen < 2:
        raise ValueError(f"seqlen: must be >= 2, got {seqlen}")
    pad = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
    ids = torch.full((len(texts), seqlen), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), seqlen), dtype=torch.long)
    for i, text in enumerate(texts):
        tok = tokenize(tokenizer, text)[:seqlen]
        ids[i, : tok.numel()] = tok
        mask[i, : tok.numel()] = 1
    return Calibration(ids, mask, {"source": "texts", "nsamples": len(texts), "seqlen": seqlen,
                                   "tokens": int(mask.sum())})
