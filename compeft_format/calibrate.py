"""Calibration: one multiplier of a LoRA adapter's factor scales, chosen by the network's response.

At low density no scale rule computed from the factors alone lands within 0.005 of the best
single scale on every adapter (``bench/results/lora_scale.md``): the adapters' factor
statistics are alike, but the scale each one needs is not. What decides it is how the network
responds to the rebuilt update *on natural text*: random tokens do not show it, any ordinary
sentences do (``bench/lora_calibrate.py``). Calibration runs the base model with the adapter
merged, on a few dozen unlabelled sentences (:data:`CALIBRATION_TEXT`, or the user's), and
picks the multiplier ``c`` of every factor's scale whose rebuilt model's sentence embeddings
(mean-pooled last hidden states) are closest, in mean cosine, to the uncompressed adapter's.
No labels and no task data: the sentences only have to be language the model reads.

The search is the one the benchmarks tune with: a log grid of :data:`GRID` points over
``[1/4, 4]`` (1 included), then :data:`REFINE` golden-section steps around the best. The
selection and the signs are compress's; only the factors' scales change, all by the same
factor, so they are what ``alpha`` times ``c`` would have given, and the file merges as
compress's selection would (it records the scale before calibration as
``lora_fit.proj_scale``, spec 5.2.1).

Needs torch and transformers, and the base model's weights and tokenizer (a local folder, or
a hub name in the Hugging Face cache; nothing is downloaded). The model runs in float32 on
the CPU (4 bytes a parameter: the cosines compared differ in the fourth decimal). Models
whose forward takes ``input_ids`` and ``attention_mask`` alone (encoders, decoders), and
LoRA on linear layers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConvertError, EncodeError, MissingDependencyError
from .lora_scale import lora_pairs, peft_scaling
from .scales import float32_scale
from .tensor import TernaryTensor

__all__ = ["CALIBRATION_KEY", "CALIBRATION_TEXT", "CALIBRATION_TEXT_NAME", "Calibration",
           "calibrate_lora", "calibrate_scales", "calibration_text_of", "load_text", "refine",
           "search"]

#: The built-in calibration sentences (recorded as :data:`CALIBRATION_TEXT_NAME`): 40
#: sentences in the registers a model meets (opinions and reviews, praise and complaint,
#: conversation, questions and instructions, news, technical text, narrative), written for
#: this purpose and disjoint from the benchmarks' scoring sentences (``bench/scale_rules.py``).
#: They replaced 40 everyday statements (``"builtin"``, kept as ``bench/lora_calibrate.py
#: --inputs everyday``), which missed where an adapter's task lives in another register
#: (``bench/results/lora_calibrate.md``).
CALIBRATION_TEXT: tuple[str, ...] = (
    "I loved this restaurant; the staff were friendly and the soup was perfect.",
    "The new phone is fast, light and worth every penny.",
    "What a wonderful concert, I would happily go again.",
    "Her latest novel is clever, moving and beautifully written.",
    "Honestly, this is the most comfortable chair I have ever owned.",
    "The hotel room was dirty and the noise kept us awake all night.",
    "I am disappointed; the package arrived late and the box was broken.",
    "This update made the app slower and more confusing.",
    "The movie dragged on for three hours and the ending made no sense.",
    "Terrible service: we waited forty minutes and nobody apologised.",
    "The camera is good in daylight but struggles at night.",
    "It is not my favourite album, though a few songs are catchy.",
    "I think the city should build more bike lanes.",
    "Some people enjoy long winters; I find them exhausting.",
    "The price seems fair for what you get.",
    "Hey, are you coming to the party on Friday?",
    "Sorry I missed your call, I was stuck in a meeting.",
    "Thanks so much for the flowers, they made my day!",
    "Ugh, I can't believe it's raining again.",
    "No worries, we can reschedule for next week.",
    "What time does the pharmacy open on Saturdays?",
    "Why is the sky blue during the day and red at sunset?",
    "Preheat the oven and grease the baking tray.",
    "Press and hold the button until the light turns green.",
    "Remember to back up your files before installing the update.",
    "The central bank raised interest rates for the third time this year.",
    "Officials said the bridge will remain closed until repairs are finished.",
    "Thousands of fans gathered outside the stadium before the final.",
    "The report warns that water supplies could run low by summer.",
    "Voters will elect a new mayor in November.",
    "The function returns an empty list when no match is found.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "Increase the memory limit if the server keeps crashing.",
    "The vaccine trial enrolled volunteers from twelve countries.",
    "A higher resolution screen uses more battery power.",
    "He smiled nervously as the results were read aloud.",
    "After years apart, the two sisters hugged at the airport.",
    "She was furious when she found out the truth.",
    "The old man felt lonely after his dog passed away.",
    "We laughed until our stomachs hurt.",
)
#: What a file's calibration record names the built-in sentences (spec 5.2.1).
CALIBRATION_TEXT_NAME = "builtin-2"

#: The ``compeft.compression`` member of a calibrated file (spec 5.2.1):
#: :meth:`Calibration.record`.
CALIBRATION_KEY = "calibration"

#: Points of the log grid of multipliers over ``[1/4, 4]`` (odd, so that 1 is one of them).
GRID = 13
#: Golden-section steps around the grid's best point (each one evaluation; two more start it).
REFINE = 6
#: The most sentences a calibration text may hold, and the tokens kept of each.
MAX_SENTENCES = 4096
MAX_TOKENS = 128


@dataclass(frozen=True)
class Calibration:
    """The multiplier chosen and what it was chosen on.

    Attributes
    ----------
    multiplier:
        The factor every LoRA factor's scale was multiplied by.
    score, score_before:
        Mean cosine of the rebuilt model's sentence embeddings with the adapter's own, at
        ``multiplier`` and at 1 (the rule's scale).
    sentences:
        How many sentences it ran on.
    text:
        :data:`CALIBRATION_TEXT_NAME` (:data:`CALIBRATION_TEXT`) or the text file's name.
    evaluations:
        Forward passes of the model: the adapter's own, then one per multiplier scored.
    """

    multiplier: float
    score: float
    score_before: float
    sentences: int
    text: str
    evaluations: int

    def line(self) -> str:
        """The compress summary's line on it.

        >>> for part in Calibration(0.8, 0.91, 0.9, 40, "builtin-2", 21).line().split(", "):
        ...     print(part)
        calibrated: factor scales x 0.800 on 40 sentences (builtin-2)
        embedding cosine 0.9000 -> 0.9100
        """
        return (f"calibrated: factor scales x {self.multiplier:.3f} on {self.sentences} "
                f"sentences ({self.text}), embedding cosine {self.score_before:.4f} -> "
                f"{self.score:.4f}")

    def record(self) -> dict[str, Any]:
        """The file's ``compeft.compression.calibration`` record (spec 5.2.1).

        >>> Calibration(0.8, 0.91, 0.9, 40, "builtin-2", 21).record()["multiplier"]
        0.8
        """
        return {"multiplier": self.multiplier, "score": round(self.score, 6),
                "score_before": round(self.score_before, 6), "sentences": self.sentences,
                "text": self.text}


def load_text(path: str | os.PathLike) -> list[str]:
    """The sentences of a calibration text file: UTF-8, one per line, blank lines skipped.

    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "cal.txt")
    >>> with open(p, "w") as f:
    ...     _ = f.write("One sentence.\\n\\nAnother one.\\n")
    >>> load_text(p)
    ['One sentence.', 'Another one.']
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read the calibration text: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConvertError(f"{path}: the calibration text is not UTF-8 (byte {exc.start})"
                           ) from None
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if not lines:
        raise ConvertError(f"{path}: the calibration text has no sentence (one per line)")
    if len(lines) > MAX_SENTENCES:
        raise ConvertError(f"{path}: the calibration text has {len(lines)} sentences; at most "
                           f"{MAX_SENTENCES} are used (a few dozen are enough)")
    return lines


def calibration_text_of(calibrate: bool | str | os.PathLike | None
                        ) -> tuple[list[str], str] | None:
    """The sentences ``compress_file(calibrate=...)`` asks for and their name: ``True``, the
    built-in ones (:data:`CALIBRATION_TEXT_NAME`); a path, its file's (:func:`load_text`;
    the file's name); ``False`` or None, no calibration (None).

    >>> calibration_text_of(False), calibration_text_of(True)[1]
    (None, 'builtin-2')
    """
    if calibrate is False or calibrate is None:
        return None
    if calibrate is True:
        return list(CALIBRATION_TEXT), CALIBRATION_TEXT_NAME
    if isinstance(calibrate, (str, os.PathLike)):
        return load_text(calibrate), Path(calibrate).name
    raise EncodeError(f"calibrate must be True or a text file's path, got {calibrate!r}")


def refine(f: Callable[[float], float], curve: Sequence[tuple[float, float]], steps: int
           ) -> tuple[float, float]:
    """``(x, f(x))``: golden-section search, in log scale, between the neighbours of the best
    point of ``curve`` (``(x, f(x))`` pairs in increasing ``x``); ``steps + 2`` evaluations.

    >>> xs = np.geomspace(0.25, 4, 13)
    >>> x, fx = refine(lambda c: -(math.log(c) - math.log(0.7)) ** 2,
    ...                [(x, -(math.log(x) - math.log(0.7)) ** 2) for x in xs], 6)
    >>> round(x, 2)
    0.7
    """
    i = max(range(len(curve)), key=lambda j: curve[j][1])
    a = math.log(curve[max(i - 1, 0)][0])
    b = math.log(curve[min(i + 1, len(curve) - 1)][0])
    best = (curve[i][1], curve[i][0])
    g = (math.sqrt(5) - 1) / 2
    c, e = b - g * (b - a), a + g * (b - a)
    fc, fe = f(math.exp(c)), f(math.exp(e))
    for _ in range(steps):
        if fc >= fe:
            b, e, fe = e, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, e, fe
            e = a + g * (b - a)
            fe = f(math.exp(e))
        best = max(best, (fc, math.exp(c)), (fe, math.exp(e)))
    return best[1], best[0]


def search(f: Callable[[float], float], grid: int = GRID, steps: int = REFINE,
           lo: float = 0.25, hi: float = 4.0) -> tuple[float, float, int]:
    """``(x, f(x), evaluations)``: the best of a log grid of ``grid`` points over
    ``[lo, hi]``, then :func:`refine` with ``steps`` steps.

    >>> x, fx, n = search(lambda c: -(math.log(c) - math.log(0.7)) ** 2)
    >>> round(x, 2), n
    (0.7, 21)
    """
    curve = [(float(x), f(float(x))) for x in np.geomspace(lo, hi, grid)]
    x, fx = refine(f, curve, steps)
    return x, fx, grid + steps + 2


def _stack() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(f"calibration needs torch and transformers: {exc}") from exc
    return torch, transformers


def _load_model(config: Mapping[str, Any], base_model: str | os.PathLike | None,
                where: object) -> tuple[Any, Any]:
    """The base model (float32, CPU, eval) and its tokenizer, offline."""
    from .peft_init import base_model_source, model_class

    torch, transformers = _stack()
    name, revision = base_model_source(config, base_model, where)
    cls = model_class(config, where)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # compress has its own
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            name, local_files_only=True, revision=revision)
        model = cls.from_pretrained(name, local_files_only=True, revision=revision,
                                    dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{where}: calibration needs the base model's weights and "
                           f"tokenizer, {name!r} is neither a local folder that has them nor in "
                           f"the Hugging Face cache (nothing is downloaded): "
                           f"{str(exc).splitlines()[0]}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if tokenizer.pad_token is None:  # decoders: any token does, the mask hides it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer


def _parameters(model: Any, pairs: Sequence[tuple[str, str]], where: object) -> list[Any]:
    """The weight of the base layer each LoRA pair adapts, by PEFT's saved names."""
    params = dict(model.named_parameters())
    out = []
    for a, _ in pairs:
        module = a.removeprefix("base_model.model.").split(".lora_A")[0]
        for key in (f"{module}.weight", f"{module.removeprefix('model.')}.weight"):
            if key in params:
                out.append(params[key])
                break
        else:
            raise ConvertError(f"{where}: tensor {a!r}: the base model has no layer "
                               f"{module!r} to calibrate it on")
    return out


def calibrate_lora(
    compressed: Mapping[str, Any],
    adapter: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    config: Mapping[str, Any],
    *,
    base_model: str | os.PathLike | None = None,
    text: Sequence[str] | None = None,
    text_name: str = CALIBRATION_TEXT_NAME,
    where: object = "adapter",
) -> Calibration:
    """Choose the multiplier of a compressed LoRA adapter's factor scales on the base model.

    ``compressed``: compress's output for the adapter (its LoRA factors
    :class:`~compeft_format.tensor.TernaryTensor`); ``adapter``: the adapter's factors;
    ``reference``: what the task vector was measured from (the initial adapter's factors, or
    None for zero); ``config``: its ``adapter_config.json``; ``base_model``: the base model's
    folder or hub name (default: the config's ``base_model_name_or_path``); ``text``: the
    sentences (default :data:`CALIBRATION_TEXT`). The caller multiplies every factor's scale
    by the result's ``multiplier``. Raises
    :class:`~compeft_format.errors.ConvertError` (no base model offline, a layer it lacks,
    an adapter it cannot calibrate) or :class:`~compeft_format.errors.MissingDependencyError`.

    Examples
    --------
    A one-layer BERT with a LoRA on its query layer (PEFT's saved names):

    >>> import os, tempfile, numpy as np, torch, transformers
    >>> from compeft_format.compress import compress
    >>> d = tempfile.mkdtemp()
    >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "."]
    >>> with open(os.path.join(d, "vocab.txt"), "w") as f:
    ...     _ = f.write("\\n".join(words))
    >>> _ = transformers.BertTokenizer(os.path.join(d, "vocab.txt")).save_pretrained(d)
    >>> _ = torch.manual_seed(0)
    >>> transformers.BertModel(transformers.BertConfig(vocab_size=10, hidden_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(d)
    >>> m = "base_model.model.encoder.layer.0.attention.self.query"
    >>> rng = np.random.default_rng(0)
    >>> w = {f"{m}.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32),
    ...      f"{m}.lora_B.weight": rng.normal(size=(16, 4)).astype(np.float32)}
    >>> cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": d}
    >>> cal = calibrate_lora(compress(w, density=0.1), w, None, cfg,
    ...                      text=["the cat sat on the mat .", "the mat sat ."])
    >>> 0.25 <= cal.multiplier <= 4, cal.score >= cal.score_before, cal.sentences
    (True, True, 2)
    """
    torch, _ = _stack()
    if config.get("use_dora"):
        raise ConvertError(f"{where}: calibration does not handle DoRA adapters")
    pairs = lora_pairs(n for n, v in compressed.items() if hasattr(v, "scale"))
    if not pairs:
        raise ConvertError(f"{where}: calibration needs a LoRA adapter's factors; found none")
    for a, b in pairs:
        if ".lora_embedding_A" in a or len(adapter[a].shape) != 2 or len(adapter[b].shape) != 2:
            raise ConvertError(f"{where}: tensor {a!r}: calibration handles LoRA on linear "
                               "layers only (not embeddings or convolutions)")
    sentences = list(CALIBRATION_TEXT if text is None else text)
    model, tokenizer = _load_model(config, base_model, where)
    weights = _parameters(model, pairs, where)
    transpose = bool(config.get("fan_in_fan_out"))
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt")
    feed = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    mask = enc["attention_mask"].unsqueeze(-1).float()
    originals = [w.detach().clone() for w in weights]

    def tensor(x: Any) -> Any:
        return torch.from_numpy(np.array(x, np.float32))  # a copy: inputs may be read-only

    coeff = [peft_scaling(config, a, adapter[a].shape[0]) for a, _ in pairs]
    ref = {n: tensor(reference[n]) if reference is not None and n in reference else None
           for pair in pairs for n in pair}
    signs = {n: tensor(compressed[n].to_numpy()) / float(compressed[n].scale)
             if compressed[n].nnz and compressed[n].scale else
             torch.zeros(tuple(compressed[n].shape)) for pair in pairs for n in pair}
    scales = {n: float(compressed[n].scale) for pair in pairs for n in pair}

    def embed(deltas: Sequence[Any]) -> Any:
        with torch.no_grad():
            for w, w0, d in zip(weights, originals, deltas, strict=True):
                w.copy_(w0 + (d.T if transpose else d).to(w0.dtype))
            try:
                with torch.inference_mode():
                    out = model(**feed, output_hidden_states=True)
            except (RuntimeError, ValueError, TypeError) as exc:  # e.g. an encoder-decoder
                raise ConvertError(
                    f"{where}: calibration runs the base model on input_ids and attention_mask "
                    f"alone; {type(model).__name__} could not: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            h = out.hidden_states[-1]
            e = (h * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(e, dim=-1)

    def factor(n: str, c: float) -> Any:
        part = signs[n] * float(np.float32(c * scales[n]))
        return part if ref[n] is None else ref[n] + part

    try:
        target = embed([k * (tensor(adapter[b]) @ tensor(adapter[a]))
                        for (a, b), k in zip(pairs, coeff, strict=True)])

        scores: dict[float, float] = {}  # the grid holds 1, scored first as `before`

        def score(c: float) -> float:
            key = round(c, 12)
            if key not in scores:
                got = embed([k * (factor(b, c) @ factor(a, c))
                             for (a, b), k in zip(pairs, coeff, strict=True)])
                scores[key] = float((got * target).sum(-1).mean())
            return scores[key]

        before = score(1.0)
        c, best, _ = search(score)
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, originals, strict=True):
                w.copy_(w0)
    if best < before:  # the grid holds 1: only a tie in float arithmetic gets here
        c, best = 1.0, before
    return Calibration(multiplier=float(c), score=best, score_before=before,
                       sentences=len(sentences), text=text_name, evaluations=len(scores) + 1)


def calibrate_scales(
    compressed: dict[str, Any],
    adapter: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    config: Mapping[str, Any],
    **options: Any,
) -> tuple[Calibration, dict[str, float]]:
    """:func:`calibrate_lora`, then every LoRA factor of ``compressed`` replaced, in place, by
    the same tensor with its scale times the multiplier (rounded to float32 as a stored scale
    is). Returns the calibration and the factors' scales before it. ``options``: those of
    :func:`calibrate_lora`.

    >>> from compeft_format.compress import compress
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> w = {"m.lora_A.weight": rng.normal(size=(2, 8)).astype(np.float32),
    ...      "m.lora_B.weight": rng.normal(size=(8, 2)).astype(np.float32)}
    >>> comp = compress(w, density=0.5)
    >>> calibrate_scales(comp, w, None, {"base_model_name_or_path": "/nowhere"}, text=["a"])
    Traceback (most recent call last):
    ...
    compeft_format.errors.ConvertError: adapter: calibration needs the base model's ...
    """
    cal = calibrate_lora(compressed, adapter, reference, config, **options)
    names = [n for pair in lora_pairs(n for n, v in compressed.items() if hasattr(v, "scale"))
             for n in pair]
    before = {n: compressed[n].scale for n in names}
    for n in names:
        t = compressed[n]
        compressed[n] = TernaryTensor(
            t.shape, t.indices, t.signs,
            float32_scale(cal.multiplier * t.scale, [(n, t.dtype, t.numel)]), t.dtype)
    return cal, before
