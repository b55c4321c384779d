"""Answers to presence questions: the file to fill in, and the lazy cubes made from it.

``emseg query --ask presence --out q.json`` writes ``q.answers.json`` beside the questions
(:func:`write_answers_template`): one entry per presence question, ``"answer": null``. An annotator
sets each answer to ``true`` (the class occurs somewhere in the box) or ``false`` (it does not);
entries left ``null`` are skipped. :func:`answers_to_cubes` (``emseg query answers``) turns the
"no" answers into lazy cubes, one per box, in the format a training config takes:

* ``cube_000/raw``: the raw crop, the source's dtype;
* ``cube_000/label``: int16, all -1;
* ``cube_000/info``: ``(2, n_classes)`` uint8, row 0 ``mask_class_labeled`` all 0, row 1
  ``mask_class_not_present`` 1 for every class answered "no" for that box.

A "yes" flags nothing (it is listed in the result as a candidate for a follow-up ``partial`` or
``dense`` question). The answers file is checked in full before anything is written, and the
cubes file is written under a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from emseg.active.questions.annotation import lazy_info
from emseg.errors import InputError
from emseg.metrics import MAX_CLASSES
from emseg.io import (atomic_write_text, check_output_location, claim_output, json_objects, open_volume,
                      read_json_file, parse_spec, replace_output)

__all__ = [
    "ANSWERS_FORMAT",
    "CUBES_FORMAT",
    "Answer",
    "AnswersResult",
    "answers_path",
    "answers_to_cubes",
    "cube_name",
    "read_answers",
    "stale_answers",
    "write_answers_template",
]

#: ``format`` key of the answers file.
ANSWERS_FORMAT = "emseg-answers"
#: ``format`` attribute of the cubes file written from answers.
CUBES_FORMAT = "emseg-lazy-cubes"
ANSWERS_VERSION = 1

_KEYS = ("volume", "offset", "shape", "class", "answer")
_INSTRUCTIONS = ("Set each 'answer' to true if the class occurs anywhere in the box (offset <= v < "
                 "offset + shape, voxels, axes as in 'axes') and to false if it does not; leave null to "
                 "skip. Then run: emseg query answers THIS_FILE --out cubes.h5")


#: An answers file is a few hundred bytes per question; anything far larger is not one (and is
#: not read into memory).
MAX_ANSWERS_BYTES = 64 * 2**20
#: Bound of the box coordinates an answers file states (classes: emseg.metrics.MAX_CLASSES).
MAX_COORDINATE = 1 << 40


def cube_name(index: int) -> str:
    """Group name of the ``index``-th cube (0-based) of a cubes file."""
    return f"cube_{index:03d}"


def answers_path(json_path: str | Path) -> Path:
    """The answers file beside a questions file: ``q.json`` -> ``q.answers.json``."""
    path = Path(json_path)
    return path.with_name(path.stem + ".answers.json")


def _absolute(spec: str) -> str:
    parsed = parse_spec(spec)
    return str(type(parsed)(parsed.path.resolve(), parsed.key, parsed.fmt))


def write_answers_template(path: str | Path, questions: Sequence[Any], *, n_classes: int, axes: str,
                           source: str | None = None) -> Path | None:
    """Write the answers file for the presence questions among ``questions`` (``None`` if none).

    Volume specs are made absolute, so the file can be answered and converted from anywhere.

    Examples
    --------
    >>> write_answers_template("q.answers.json", result.queries, n_classes=3, axes="zyx")  # doctest: +SKIP
    """
    entries = [{"rank": q.rank, "volume": _absolute(q.volume), "offset": list(q.box.offset),
                "shape": list(q.box.shape), "class": int(q.klass), "answer": None}
               for q in questions if getattr(q, "kind", None) == "presence"]
    if not entries:
        return None
    doc = {"format": ANSWERS_FORMAT, "version": ANSWERS_VERSION, "axes": axes, "n_classes": int(n_classes),
           "questions": source, "instructions": _INSTRUCTIONS, "answers": entries}
    path = Path(path)
    # one entry per line, so that an annotator edits one line per question
    head = json.dumps({k: v for k, v in doc.items() if k != "answers"}, indent=2)[:-2]
    body = ",\n".join("    " + json.dumps(e) for e in entries)
    atomic_write_text(path, head + ',\n  "answers": [\n' + body + "\n  ]\n}\n")
    return path


def stale_answers(path: str | Path) -> tuple[bool, str | None]:
    """What to do with an answers file left by an earlier query of the same ``--out`` whose new
    questions have no presence question (the file no longer belongs to them): ``(remove, note)``.

    An emseg answers file with no answer given is to be removed (nothing is lost); one with answers
    given, or a file that is not an emseg answers file, is kept. The note (one line) says which.
    No file: ``(False, None)``.

    Examples
    --------
    >>> stale_answers("q.answers.json")  # doctest: +SKIP
    (True, 'removed q.answers.json: left by an earlier query into the same output, no answer given')
    """
    path = Path(path)
    if not path.is_file():
        return False, None
    try:
        _, entries = read_answers(path)
    except (InputError, OSError):
        return False, f"{path} is not an emseg answers file; left as it is"
    given = sum(a.answer is not None for a in entries)
    if not given:
        return True, f"removed {path}: left by an earlier query into the same output, no answer given"
    return False, (f"{path} is from an earlier query into the same output (these questions have no presence "
                   f"question); kept because {given} of its {len(entries)} answers are given")


@dataclass(frozen=True)
class Answer:
    """One entry of an answers file (``number`` is its 1-based position)."""

    number: int
    volume: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    klass: int
    answer: bool | None

    @property
    def box_key(self) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        return (self.volume, self.offset, self.shape)


def _ints(value: Any, what: str, where: str, low: int, src: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(f"{where}: '{what}' must be a list of integers, got {json.dumps(value)}", source=src)
    if any(not low <= v <= MAX_COORDINATE for v in value) or len(value) > 3:
        raise InputError(f"{where}: '{what}' must be at most 3 values in [{low}, {MAX_COORDINATE}], got "
                         f"{json.dumps(value)[:60]}", source=src)
    return tuple(value)


def read_answers(path: str | Path) -> tuple[int, list[Answer]]:
    """``(n_classes, answers)`` of an answers file, checked entry by entry (not against the volumes).

    Raises :class:`~emseg.errors.InputError` naming the file and the problem: not JSON, not an
    answers file, a missing key, an answer other than true/false/null, a bad box or class.
    """
    src = str(path)
    doc = read_json_file(path, what="an emseg answers file", max_bytes=MAX_ANSWERS_BYTES)
    if not isinstance(doc, dict):
        raise InputError("not an emseg answers file (expected a JSON object)", source=src)
    if doc.get("format", ANSWERS_FORMAT) != ANSWERS_FORMAT:
        raise InputError(f"not an emseg answers file (format {doc.get('format')!r})", source=src)
    for key in ("n_classes", "answers"):
        if key not in doc:
            raise InputError(f"missing key '{key}'", source=src)
    n_classes = doc["n_classes"]
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or not 1 <= n_classes <= MAX_CLASSES:
        raise InputError(f"'n_classes' must be an integer in [1, {MAX_CLASSES}], got {json.dumps(n_classes)[:40]}",
                         source=src)
    if not isinstance(doc["answers"], list):
        raise InputError("'answers' must be a list", source=src)
    out = []
    for number, where, entry in json_objects(doc["answers"], "answer", ", ".join(_KEYS), src):
        missing = [k for k in _KEYS if k not in entry]
        if missing:
            raise InputError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(k) for k in missing)}", source=src)
        answer = entry["answer"]
        if answer is not None and not isinstance(answer, bool):
            raise InputError(f"{where}: 'answer' must be true, false or null, got {json.dumps(answer)}", source=src)
        klass = entry["class"]
        if isinstance(klass, bool) or not isinstance(klass, int) or not 0 <= klass < n_classes:
            raise InputError(f"{where}: unknown class {json.dumps(klass)} (n_classes = {n_classes}: "
                             f"0..{n_classes - 1})", source=src)
        if not isinstance(entry["volume"], str):
            raise InputError(f"{where}: 'volume' must be a FILE.h5:DATASET or FILE.zarr/ARRAY spec", source=src)
        try:
            parse_spec(entry["volume"])
        except InputError as exc:
            raise InputError(f"{where}: {exc}", source=src) from None
        offset = _ints(entry["offset"], "offset", where, 0, src)
        shape = _ints(entry["shape"], "shape", where, 1, src)
        if len(offset) != len(shape):
            raise InputError(f"{where}: offset {list(offset)} and shape {list(shape)} differ in length", source=src)
        out.append(Answer(number, entry["volume"], offset, shape, int(klass), answer))
    return int(n_classes), out


@dataclass
class AnswersResult:
    """What :func:`answers_to_cubes` did (``to_dict()`` is the JSON document of the command)."""

    answers: str
    out: str
    n_classes: int
    n_questions: int
    n_no: int
    n_yes: int
    n_unanswered: int
    cubes: list[dict[str, Any]] = field(default_factory=list)
    present: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"answers": self.answers, "out": self.out, "n_classes": self.n_classes,
                "n_questions": self.n_questions, "n_answered": self.n_no + self.n_yes, "n_no": self.n_no,
                "n_yes": self.n_yes, "n_unanswered": self.n_unanswered, "n_cubes": len(self.cubes),
                "cubes": self.cubes, "present": self.present}


def answers_to_cubes(answers: str | Path, out: str | Path, *,
                     progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> AnswersResult:
    """Turn the "no" answers of an answers file into lazy cubes in the HDF5 file ``out``.

    One cube per box answered "no" for at least one class: raw crop, labels all -1, ``info``
    with ``mask_class_labeled`` all 0 and ``mask_class_not_present`` set for each class answered
    "no". "Yes" answers flag nothing; unanswered (``null``) entries are skipped. The whole file is
    checked first (entries, classes, boxes inside their volumes, no box answered both yes and no
    for one class); on any problem nothing is written. ``out`` is written under a temporary name
    and renamed; an existing file is refused unless ``overwrite``.

    Examples
    --------
    >>> result = answers_to_cubes("q.answers.json", "cubes.h5")  # doctest: +SKIP
    >>> result.to_dict()["n_cubes"]  # doctest: +SKIP
    """
    src = str(answers)
    n_classes, entries = read_answers(answers)
    out = Path(out)
    if out.suffix.lower() not in (".h5", ".hdf5", ".hdf"):
        raise InputError("the cubes file must be HDF5 (.h5), so a training config can list FILE.h5:cube_000/raw",
                         source=str(out))
    check_output_location(out)
    given: dict[tuple[Any, int], Answer] = {}
    for a in entries:
        if a.answer is None:
            continue
        prev = given.get((a.box_key, a.klass))
        if prev is not None and prev.answer != a.answer:
            raise InputError(f"answers {prev.number} and {a.number} disagree on class {a.klass} in the same box",
                             source=src)
        given[(a.box_key, a.klass)] = a
    with ExitStack() as stack:
        volumes: dict[str, Any] = {}
        for a in entries:
            if a.volume not in volumes:
                try:
                    volumes[a.volume] = stack.enter_context(open_volume(a.volume))
                except InputError as exc:
                    raise InputError(f"answer {a.number}: {exc}", source=src) from None
            vshape = tuple(volumes[a.volume].shape)
            if len(a.offset) != len(vshape) or any(o + s > n for o, s, n in zip(a.offset, a.shape, vshape)):
                raise InputError(f"answer {a.number}: box offset {list(a.offset)} shape {list(a.shape)} lies outside "
                                 f"the volume {a.volume} of shape {list(vshape)}", source=src)
        if any(out.resolve() == parse_spec(v).path.resolve() for v in volumes) or out.resolve() == Path(src).resolve():
            raise InputError("`out` would replace an input file; choose a new file", source=str(out))
        boxes: dict[Any, list[int]] = {}
        present = []
        for a in entries:
            if a.answer is False:
                ks = boxes.setdefault(a.box_key, [])
                if a.klass not in ks:
                    ks.append(a.klass)
            elif a.answer is True:
                present.append({"number": a.number, "volume": a.volume, "offset": list(a.offset),
                                "shape": list(a.shape), "class": a.klass})
        with claim_output(out, overwrite=overwrite, kind="file"):  # one writer; an existing file kept
            cubes = _write_cubes(out, boxes, volumes, n_classes, src, progress)
    n_no = sum(a.answer is False for a in entries)
    n_yes = sum(a.answer is True for a in entries)
    return AnswersResult(src, str(out), n_classes, len(entries), n_no, n_yes,
                         len(entries) - n_no - n_yes, cubes, present)


def _write_cubes(out: Path, boxes: dict[Any, list[int]], volumes: dict[str, Any], n_classes: int, src: str,
                 progress: Callable[[int, int], None] | None) -> list[dict[str, Any]]:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    cubes = []
    try:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format"] = CUBES_FORMAT
            fh.attrs["n_classes"] = n_classes
            fh.attrs["answers"] = src
            for j, ((volume, offset, shape), classes) in enumerate(boxes.items()):
                box = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                raw = np.asarray(volumes[volume][box])
                group = fh.create_group(cube_name(j))
                group.create_dataset("raw", data=raw, chunks=True, compression="gzip", compression_opts=4)
                group.create_dataset("label", shape=raw.shape, dtype=np.int16, fillvalue=-1,
                                     chunks=True, compression="gzip", compression_opts=4)
                group["label"][...] = -1
                group.create_dataset("info", data=lazy_info(n_classes, not_present=sorted(classes)))
                group.attrs["volume"] = volume
                group.attrs["offset"] = list(offset)
                group.attrs["shape"] = list(shape)
                group.attrs["axes"] = "zyx"[-len(shape):]
                group.attrs["not_present"] = sorted(classes)
                cubes.append({"name": cube_name(j), "volume": volume, "offset": list(offset), "shape": list(shape),
                              "not_present": sorted(classes)})
                if progress is not None:
                    progress(j + 1, len(boxes))
        replace_output(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return cubes
