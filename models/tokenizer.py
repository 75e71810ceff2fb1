"""Prompt cleaning and tokenisation for the T5 text encoders, on the checkpoint's own tokenizer files.

Tokenisation is not ported: ``sentencepiece`` reads ``spiece.model`` and ``tokenizers`` reads ``tokenizer.json``.
What is reproduced here is the call the pipelines make (``padding='max_length', truncation=True,
add_special_tokens=True`` on a T5 tokenizer): the text's ids without special tokens, cut to ``max_length - 1``,
then ``</s>`` (also after a cut), then pad ids to ``max_length``.

Cleaning differs per pipeline: MAGI-1 runs DeepFloyd-IF's ``clean_caption`` twice (``clean_magi``), Wan2.1 /
SkyReels-V2 / diffusers only fix text and collapse whitespace (``clean_wan``).
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import ftfy
import numpy as np


# ----- cleaning ---------------------------------------------------------------------------------------------------
def _basic_clean(text: str) -> str:
    """ftfy (mojibake, curly quotes), then HTML entities decoded twice (``&amp;amp;`` -> ``&``)."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


_WS = re.compile(r"\s+")


def clean_wan(text: str) -> str:
    """Wan2.1 / SkyReels-V2 ``clean='whitespace'`` (= diffusers ``prompt_clean``); case is kept.

    Upstream uses the ``regex`` package's ``\\s``; stdlib ``re`` differs from it only on U+001C..U+001F, which
    ``ftfy.fix_text`` has removed (and ``html.unescape`` never produces) before the substitution runs.
    """
    return _WS.sub(" ", _basic_clean(text)).strip()


_DOMAINS = r"(?:com|co|ru|net|org|edu|gov|it)"
_FILE_EXT = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_DASHES = (r"\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           r"\uFE31\uFE32\uFE58\uFE63\uFF0D")
_BAD_PUNCT = r"#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*"  # the characters inside a [...] class


def _rules(*pairs: tuple[str, str]) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple((re.compile(p), r) for p, r in pairs)


# DeepFloyd-IF clean_caption, in upstream order. Stage 1 runs on the lower-cased, unquoted text before HTML
# stripping; stage 2 after it; stage 3 after basic_clean.
_STAGE1 = _rules(
    ("<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _DOMAINS + r"[\w/-]*\b\/?(?!@)))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _DOMAINS + r"[\w/-]*\b\/?(?!@)))", ""),
)
_STAGE2 = _rules(
    (r"@[\w\d]+\b", ""),  # @nickname
    # CJK strokes, katakana ext., enclosed CJK, CJK compat., ext. A, Yijing, unified ideographs: 31C0..9FFF
    # (upstream removes the seven blocks one after another; they are contiguous, so one class is the same).
    (r"[\u31c0-\u9fff]+", ""),
    ("[" + _DASHES + "]+", "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _FILE_EXT, ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    ("[" + _BAD_PUNCT + "]{1,}", " "),
    (r"\s+\.\s+", " "),
)
_SEPARATORS = re.compile(r"(?:\-|\_)")  # this-is-my-cute-cat / this_is_my_cute_cat
_STAGE3 = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _FILE_EXT + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes like 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # surrounding quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


def _apply(rules: Sequence[tuple[re.Pattern, str]], text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


def _strip_html(text: str) -> str:
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
    from bs4.exceptions import ParserRejectedMarkup

    with warnings.catch_warnings():  # a prompt that looks like a URL or file name is still just text
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        try:
            return BeautifulSoup(text, features="html.parser").text
        except ParserRejectedMarkup as e:  # upstream crashes here too; say why instead
            raise ValueError(f"the prompt cannot be cleaned: html.parser rejects it as markup ({e})") from e


def clean_caption(caption: str) -> str:
    """One pass of DeepFloyd-IF's ``clean_caption`` (MAGI-1 ``T5Embedder``): the rule list, in order."""
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_STAGE1, text)
    text = _strip_html(text)
    text = _apply(_STAGE2, text)
    if len(_SEPARATORS.findall(text)) > 3:
        text = _SEPARATORS.sub(" ", text)
    text = _basic_clean(text)
    return _apply(_STAGE3, text).strip()


def clean_magi(text: str) -> str:
    """MAGI-1's ``text_preprocessing``: ``clean_caption`` twice (the second pass sees what the first decoded,
    e.g. ``&lt;b&gt;`` becomes ``<b>`` and is then stripped as a tag)."""
    return clean_caption(clean_caption(text))


# ----- tokenisation -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenBatch:
    ids: np.ndarray  # int32 [B, L], ends with </s>, right-padded with the pad id
    mask: np.ndarray  # int32 [B, L], 1 on real tokens (incl. </s>)
    truncated: np.ndarray  # bool [B], the text had more than L - 1 tokens
    lengths: np.ndarray  # int64 [B] = mask.sum(-1)


def _token_str(value) -> str | None:
    """A special token as written in HF json files: a string or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    return d if isinstance(d, dict) else {}


class Tokenizer:
    """A T5 tokenizer from its files: ``tokenizer.json`` (``tokenizers``) or ``spiece.model`` (``sentencepiece``).

    Literal special-token strings inside a prompt (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_0>``) are those
    tokens, as in the HF tokenizer: the ``tokenizers`` path as its json says, the ``sentencepiece`` path by
    splitting the text on them.
    """

    def __init__(self, encode: Callable[[str], list[int]], eos_id: int, pad_id: int, size: int, source: str):
        self._encode = encode
        self.eos_id, self.pad_id, self.size, self.source = eos_id, pad_id, size, source

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A folder (``tokenizer.json`` preferred, else ``spiece.model``) or one of those files.

        ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it, when present, name the eos / pad tokens
        (default ``</s>`` / ``<pad>``) and ``extra_ids`` (sentinels counted in ``len`` as T5Tokenizer does; 0 when no
        file says, where T5Tokenizer would assume 100).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist")
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "spiece.model").is_file():
                path = path / "spiece.model"
            else:
                raise FileNotFoundError(f"no tokenizer.json or spiece.model in {folder}")
        conf = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        eos = _token_str(conf.get("eos_token")) or "</s>"
        pad = _token_str(conf.get("pad_token")) or "<pad>"
        extra = conf.get("extra_ids")
        if extra is None:
            extra = sum(1 for t in conf.get("additional_special_tokens", [])
                        if re.fullmatch(r"<extra_id_\d+>", _token_str(t) or ""))
        if path.suffix == ".json":
            return cls._from_tokenizers(path, eos, pad)
        if path.suffix == ".model":
            return cls._from_sentencepiece(path, eos, pad, int(extra))
        raise ValueError(f"{path} is neither a tokenizer.json nor a SentencePiece .model file")

    @classmethod
    def _from_tokenizers(cls, path: Path, eos: str, pad: str) -> Tokenizer:
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise ValueError(f"cannot read {path} with tokenizers: {e}") from e
        tok.no_truncation()
        tok.no_padding()
        ids = {}
        for name, token in (("eos", eos), ("pad", pad)):
            ids[name] = tok.token_to_id(token)
            if ids[name] is None:
                raise ValueError(f"{path} has no {name} token {token!r}")
        return cls(lambda t: tok.encode(t, add_special_tokens=False).ids, ids["eos"], ids["pad"],
                   tok.get_vocab_size(with_added_tokens=True), str(path))

    @classmethod
    def _from_sentencepiece(cls, path: Path, eos: str, pad: str, extra_ids: int) -> Tokenizer:
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot read {path} with sentencepiece: {e}") from e
        ids = {}
        for name, token in (("eos", eos), ("pad", pad)):
            ids[name] = sp.piece_to_id(token)
            if ids[name] == sp.unk_id() and token != sp.id_to_piece(sp.unk_id()):
                raise ValueError(f"{path} has no {name} piece {token!r}")
        size = sp.get_piece_size()
        special = {sp.id_to_piece(i): i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)}
        special.update({f"<extra_id_{n}>": size + extra_ids - 1 - n for n in range(extra_ids)})  # reversed, as T5
        split = re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")

        def encode(text: str) -> list[int]:
            # as the HF tokenizer: special-token strings in the text are those tokens; the pieces between them are
            # encoded on their own (each with sentencepiece's leading-space rule)
            out: list[int] = []
            for part in split.split(text):
                if part in special:
                    out.append(special[part])
                elif part:
                    out.extend(sp.encode(part))
            return out

        return cls(encode, ids["eos"], ids["pad"], size + extra_ids, str(path))

    def __len__(self) -> int:
        return self.size

    def encode(self, text: str) -> list[int]:
        """The text's ids without special tokens (no ``</s>``, no truncation)."""
        return list(self._encode(text))

    def __call__(self, texts: Sequence[str], max_length: int) -> TokenBatch:
        """ids/mask [B, max_length]: the first max_length-1 ids, ``</s>``, then pads (HF ``max_length`` padding)."""
        if isinstance(texts, str):
            raise TypeError("pass a list of prompts, not one string")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, not {max_length}")
        ids = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        truncated = np.zeros(len(texts), bool)
        for row, text in enumerate(texts):
            toks = self.encode(text)
            truncated[row] = len(toks) > max_length - 1
            toks = toks[: max_length - 1] + [self.eos_id]
            ids[row, : len(toks)] = toks
            mask[row, : len(toks)] = 1
        return TokenBatch(ids, mask, truncated, mask.sum(-1).astype(np.int64))
