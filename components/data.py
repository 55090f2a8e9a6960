"""Support corpus: a deterministic customer-support SFT generator and content-addressed snapshots.

The corpus itself (intents, phrasing and answer templates, the policy table, slot fillers) is
package data under ``components/corpus/``; :func:`load_corpus` reads and checks it, so a new
intent, template or policy version is a change of data, not of code.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import string
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import InvalidInput, NotFound
from components.schemas import SPLITS, DatasetRef, SFTRow
from components.uris import to_path, to_uri

log = logging.getLogger(__name__)

REF_FILE = "ref.json"
CORPUS_FILES = ("policies.yaml", "intents.yaml", "slots.yaml")
# Which corpus file holds each top-level field: errors name the file the user has to edit.
_FILE_OF_FIELD = {
    "policies": "policies.yaml",
    "intents": "intents.yaml",
    "items": "slots.yaml",
    "openers": "slots.yaml",
    "closers": "slots.yaml",
    "synonyms": "slots.yaml",
    "noise": "slots.yaml",
}
# The refusal intent: its answers are one fixed refusal, and evaluation reads refusals from it.
OUT_OF_SCOPE = "out_of_scope"
# Names end up in row ids, sources (corpus/<intent>/tNN) and the ref's comma-joined versions.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_SURROGATE = re.compile("[\ud800-\udfff]")
# Share of the rows (percent) that eval and holdout get each; train gets the rest.
HELD_OUT_PERCENT = 15


# The corpus data ---------------------------------------------------------------------------


class IntentSpec(BaseModel):
    """One intent of the corpus: the facts its answers state and how it is asked and answered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    facts: tuple[str, ...] = Field(min_length=1, description="Keys into the policy table.")
    train: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        min_length=1, description="Phrasing templates ({item} slot) the model learns from."
    )
    eval: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        min_length=1, description="Wordings kept out of training, to choose settings by."
    )
    holdout: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        min_length=1, description="Wordings kept out of training and out of every choice."
    )
    answers: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        min_length=1, description="Answer templates over {item} and the policy's fact keys."
    )

    @property
    def questions(self) -> tuple[str, ...]:
        """Every phrasing template: train, then eval, then holdout (a row's ``tNN`` indexes it)."""
        return self.train + self.eval + self.holdout

    def split_of(self, index: int) -> str:
        """The split of the phrasing template at ``index`` of :attr:`questions`.

        Raises:
            ValueError: no template has that index.
        """
        if not 0 <= index < len(self.questions):
            raise ValueError(f"template {index}: the intent has {len(self.questions)} templates")
        if index < len(self.train):
            return "train"
        return "eval" if index < len(self.train) + len(self.eval) else "holdout"


class NoiseSpec(BaseModel):
    """How often each kind of noise is applied to a composed prompt (0 = never)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    synonym: float = Field(0.0, ge=0, le=1, description="Per occurrence of a synonyms phrase.")
    typo: float = Field(0.0, ge=0, le=1, description="One letter swapped, dropped or doubled in the frame.")
    lowercase: float = Field(0.0, ge=0, le=1, description="The whole prompt in lower case.")
    no_punctuation: float = Field(0.0, ge=0, le=1, description="?!., removed.")


class CorpusSpec(BaseModel):
    """The whole corpus as data, checked for consistency on load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policies: dict[
        Annotated[str, Field(pattern=_NAME)],
        dict[Annotated[str, Field(pattern=_NAME)], Annotated[str, Field(min_length=1)]],
    ] = Field(min_length=1, description="Policy table by version, oldest first.")
    intents: dict[Annotated[str, Field(pattern=_NAME)], IntentSpec] = Field(min_length=1)
    items: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    openers: tuple[str, ...] = Field(min_length=1, description='Said before a question ("" = nothing).')
    closers: tuple[str, ...] = Field(min_length=1, description='Said after a question ("" = nothing).')
    synonyms: dict[Annotated[str, Field(min_length=1)], tuple[Annotated[str, Field(min_length=1)], ...]] = (
        Field(default_factory=dict, description="Phrase of a frame -> wordings that may replace it.")
    )
    noise: NoiseSpec = Field(default_factory=NoiseSpec)

    @model_validator(mode="after")
    def _consistent(self) -> CorpusSpec:
        problems: list[str] = []
        first, *others = self.policies
        keys = set(self.policies[first])
        for version in others:
            table = set(self.policies[version])
            if table != keys:
                # Every version must state every fact: directional checks compare them key by key.
                what = [f"missing {', '.join(sorted(keys - table))}"] if keys - table else []
                what += [f"extra {', '.join(sorted(table - keys))}"] if table - keys else []
                problems.append(f"policies.yaml policies.{version}: {'; '.join(what)} (against {first})")
        seen: dict[str, str] = {}
        for name, intent in self.intents.items():
            where = f"intents.yaml intents.{name}"
            unknown = [f for f in intent.facts if f not in keys]
            if unknown:
                problems.append(f"{where}.facts: unknown fact key(s) {', '.join(unknown)}")
            for split in SPLITS:
                for n, question in enumerate(getattr(intent, split)):
                    problems += _template_problems(question, {"item"}, (), f"{where}.{split}[{n}]")
                    # The same wording in two places would put one prompt in two splits (a leak);
                    # case and punctuation do not make a wording new (noise drops both).
                    key = " ".join(re.findall(r"[\w{}'-]+", question.lower()))
                    if key in seen:
                        problems.append(f"{where}.{split}[{n}]: duplicate of {seen[key]}")
                    seen.setdefault(key, f"{name}.{split}[{n}]")
            for n, answer in enumerate(intent.answers):
                problems += _template_problems(answer, {"item", *keys}, intent.facts, f"{where}.answers[{n}]")
            # A question is answered only by answers that name its product exactly when it has one.
            for has_item in {_answer_names_item(name, q) for q in intent.questions}:
                if not any(("{item}" in a) == has_item for a in intent.answers):
                    kind = "with" if has_item else "without"
                    problems.append(
                        f"{where}.answers: questions {kind} {{item}} need an answer {kind} {{item}}"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _answer_names_item(intent: str, question: str) -> bool:
    """Whether the answers to a question name its product: when it has one, except for refusals."""
    return "{item}" in question and intent != OUT_OF_SCOPE


def _template_problems(template: str, allowed: set[str], required: Sequence[str], where: str) -> list[str]:
    """What is wrong with one template: bad braces, unknown slots, facts it does not state."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        return [f"{where}: {exc} (write a literal brace as {{{{ or }}}})"]
    problems = []
    if fields - allowed:
        problems.append(f"{where}: unknown slot(s) {', '.join(sorted(fields - allowed))}")
    if missing := [f for f in required if f not in fields]:
        # The row's facts must be in its response, or fact accuracy scores every model wrong.
        problems.append(f"{where}: does not state fact(s) {', '.join(missing)}")
    return problems


def load_corpus(folder: Path | None = None) -> CorpusSpec:
    """Read and check the corpus data files.

    Args:
        folder: a folder holding ``policies.yaml``, ``intents.yaml`` and ``slots.yaml``;
            None: the data shipped in the package (read once per process).

    Returns:
        The checked corpus.

    Raises:
        InvalidInput: a file is missing, is not YAML, or a field is wrong (the message names
            the file and the field).
    """
    if folder is None:
        return _shipped_corpus()
    folder = to_path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"corpus folder {folder} does not exist")
    return _load_corpus(folder, str(folder))


@functools.cache
def _shipped_corpus() -> CorpusSpec:
    return _load_corpus(resources.files("components") / "corpus", "components/corpus")


def _load_corpus(folder: Traversable | Path, shown: str) -> CorpusSpec:
    raw: dict[str, Any] = {}
    file_of: dict[str, str] = {}  # top-level field → the file it came from (typos included)
    for name in CORPUS_FILES:
        file = folder / name
        if not file.is_file():
            raise InvalidInput(
                f"{shown}/{name}: no such file (a corpus folder holds {', '.join(CORPUS_FILES)})"
            )
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{shown}/{name}: not valid YAML: {_one_line(exc)}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"{shown}/{name}: must be a mapping of field names")
        for key, value in data.items():
            if _FILE_OF_FIELD.get(key, name) != name:
                raise InvalidInput(f"{shown}/{name}: field {key!r} belongs in {_FILE_OF_FIELD[key]}")
            raw[key], file_of[str(key)] = value, name
    try:
        return CorpusSpec.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False):
            loc = ".".join(str(part) for part in error["loc"])
            msg = error["msg"].removeprefix("Value error, ")
            if loc:
                top = str(error["loc"][0])
                lines.append(f"{shown}/{file_of.get(top) or _FILE_OF_FIELD.get(top, '?')}: {loc}: {msg}")
            else:  # a consistency problem: its message names the file and field itself
                lines.append(f"{shown}: {msg}")
        raise InvalidInput("invalid corpus data: " + "; ".join(lines)) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def policy_versions(spec: CorpusSpec | None = None) -> tuple[str, ...]:
    """The known policy versions, in the order the policy table lists them (oldest first).

    Args:
        spec: the corpus; None: the shipped one.

    Returns:
        Version names such as ``("v1", "v2")``.
    """
    return tuple((spec or load_corpus()).policies)


def policy_facts(policy_version: str, spec: CorpusSpec | None = None) -> dict[str, str]:
    """The policy table of one version (a copy).

    Args:
        policy_version: a name from :func:`policy_versions`.
        spec: the corpus; None: the shipped one.

    Returns:
        Fact key → fact text.

    Raises:
        NotFound: the version is not in the policy table (the message lists the known ones).
    """
    policies = (spec or load_corpus()).policies
    if policy_version not in policies:
        raise NotFound(f"unknown policy version {policy_version!r}; known: {', '.join(policies)}")
    return dict(policies[policy_version])


def intents(spec: CorpusSpec | None = None) -> tuple[str, ...]:
    """The corpus's intent names, in file order.

    Args:
        spec: the corpus; None: the shipped one.

    Returns:
        Intent names such as ``("returns", "refunds", …)``.
    """
    return tuple((spec or load_corpus()).intents)


def split_rows(rows: int, spec: CorpusSpec | None = None) -> dict[str, int]:
    """How many of ``rows`` each split gets: eval and holdout a fixed share each, train the rest.

    The held-out splits are measuring sets, so their size follows the row count, not how many
    training wordings the corpus has; each needs a row for every one of its frames.

    Args:
        rows: total rows.
        spec: the corpus data; None: the shipped one.

    Returns:
        Rows by split.

    Raises:
        InvalidInput: eval or holdout would get fewer rows than it has phrasing templates.
    """
    spec = spec or load_corpus()
    if not _fits(_shares(rows), spec):
        least = next(n for n in itertools.count(max(rows, 1)) if _fits(_shares(n), spec))
        raise InvalidInput(
            f"rows must be at least {least} (one per phrasing template of eval and holdout), got {rows}"
        )
    return _shares(rows)


def _shares(rows: int) -> dict[str, int]:
    held = {split: rows * HELD_OUT_PERCENT // 100 for split in SPLITS if split != "train"}
    return {"train": rows - sum(held.values()), **held}


def _fits(per_split: Mapping[str, int], spec: CorpusSpec) -> bool:
    """Whether eval and holdout have at least one row per phrasing template of their own."""
    return all(
        per_split[split] >= sum(len(getattr(intent, split)) for intent in spec.intents.values())
        for split in SPLITS
        if split != "train"
    )


def generate_corpus(
    rows: int = 7200, policy_version: str | None = None, seed: int = 0, spec: CorpusSpec | None = None
) -> dict[str, list[SFTRow]]:
    """Generate the support corpus, deterministically for (rows, policy_version, seed, spec).

    Args:
        rows: total rows across all splits; eval and holdout get a fixed share each
            (:func:`split_rows`). Rows spread evenly over a split's templates; with fewer train
            rows than train templates, over an evenly spaced subset of them.
        policy_version: which policy table the answers state; None: the first one.
        seed: seed of the slot filling.
        spec: the corpus data; None: the shipped one.

    Returns:
        Rows by split (``train``, ``eval``, ``holdout``); splits share no phrasing template.

    Raises:
        NotFound: an unknown policy version.
        InvalidInput: too few rows for one per phrasing template of eval and holdout.
    """
    spec = spec or load_corpus()
    policy_version = policy_version or policy_versions(spec)[0]
    policy = policy_facts(policy_version, spec)
    templates = [(name, t) for name, intent in spec.intents.items() for t in range(len(intent.questions))]
    splits = [spec.intents[name].split_of(t) for name, t in templates]
    per_split = split_rows(rows, spec)
    rng = random.Random(f"{seed}:{policy_version}")
    # Within a split, row r goes to its template r * n // total: an even spread over all n
    # templates, or over an evenly spaced subset (every intent's) when there are fewer rows.
    position = {split: [i for i, s in enumerate(splits) if s == split] for split in SPLITS}
    per_template = [0] * len(templates)
    for split, where in position.items():
        for r in range(per_split[split]):
            per_template[where[r * len(where) // per_split[split]]] += 1
    out: dict[str, list[SFTRow]] = {split: [] for split in SPLITS}
    # Every prompt is unique across the corpus (compared as the model's normalization would):
    # held-out frames are filled first, so noise can never turn a train prompt into one of theirs.
    taken: set[str] = set()
    order = sorted((i for i in range(len(templates)) if per_template[i]), key=lambda i: splits[i] == "train")
    filled: dict[int, list[SFTRow]] = {}
    for i in order:
        (name, t), count = templates[i], per_template[i]
        intent = spec.intents[name]
        facts = [policy[key] for key in intent.facts]
        frame = intent.questions[t]
        # The customer's own product: a question with {item} gets an answer that names it.
        answers = [a for a in intent.answers if ("{item}" in a) == _answer_names_item(name, frame)]
        filled[i] = rows_here = []
        for _attempt in range(count * 50):
            if len(rows_here) == count:
                break
            item = rng.choice(spec.items) if "{item}" in frame else ""
            prompt = compose_prompt(frame, item, spec, rng)
            key = _prompt_key(prompt)
            if key in taken:
                continue
            taken.add(key)
            response = rng.choice(answers).format(item=item, **policy)
            rows_here.append(
                SFTRow(
                    id=_row_id(policy_version, name, t, prompt, response),
                    prompt=prompt,
                    response=response,
                    intent=name,
                    policy_version=policy_version,
                    facts=facts,
                    source=f"corpus/{name}/t{t:02d}",
                )
            )
        else:
            # A template without {item} has only openers × closers × noise distinct prompts.
            raise InvalidInput(
                f"could not fill {count} unique rows for {name}/t{t:02d}: its slots allow fewer; "
                "ask for fewer rows or add items, openers, closers, synonyms or noise"
            )
    for i in sorted(filled):  # rows in template order within each split
        out[splits[i]].extend(filled[i])
    return out


def compose_prompt(frame: str, item: str, spec: CorpusSpec, rng: random.Random) -> str:
    """One customer prompt from a frame: synonyms and a typo in the frame's words, the product, an
    opener and a closer, then casing and punctuation noise (all drawn from ``rng``).

    Args:
        frame: a question template (``{item}`` optional).
        item: the product named in the question ("" for a frame without ``{item}``).
        spec: the corpus (openers, closers, synonyms, noise rates).
        rng: the generator's random stream.

    Returns:
        The prompt, stripped. The product name is never misspelled.
    """
    noise = spec.noise
    text = frame
    for phrase in sorted(spec.synonyms, key=len, reverse=True):
        alternatives = spec.synonyms[phrase]
        text = _phrase_pattern(phrase).sub(
            lambda m, alts=alternatives: rng.choice(alts) if rng.random() < noise.synonym else m.group(), text
        )
    parts = text.split("{item}")
    if rng.random() < noise.typo:
        words = [
            (p, m.start(), m.end())
            for p, part in enumerate(parts)
            for m in re.finditer(r"[A-Za-z]{4,}", part)
        ]
        if words:
            p, start, end = rng.choice(words)
            parts[p] = parts[p][:start] + _typo(parts[p][start:end], rng) + parts[p][end:]
    question = item.join(parts)
    prompt = f"{rng.choice(spec.openers)}{question}{rng.choice(spec.closers)}"
    if rng.random() < noise.lowercase:
        prompt = prompt.lower()
    if rng.random() < noise.no_punctuation:
        prompt = prompt.translate(_PUNCTUATION)
    return " ".join(prompt.split())


_PUNCTUATION = str.maketrans("", "", "?!.,")


@functools.lru_cache(maxsize=256)
def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)")


def _typo(word: str, rng: random.Random) -> str:
    """The word with one slip of the keyboard: two inner letters swapped, one dropped or doubled."""
    k = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:k] + word[k + 1] + word[k] + word[k + 2 :]
    if kind == 1:
        return word[:k] + word[k + 1 :]
    return word[:k] + word[k] + word[k:]


def _prompt_key(prompt: str) -> str:
    """What makes two prompts the same wording: case and spacing do not."""
    return " ".join(prompt.lower().split())


def _row_id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def corpus_texts(seed: int = 0, spec: CorpusSpec | None = None) -> list[str]:
    """Every prompt and response of every policy version: the tokenizer's training text.

    Args:
        seed: seed of the slot filling.
        spec: the corpus data; None: the shipped one.

    Returns:
        Texts, about four rows per phrasing template and policy version.
    """
    spec = spec or load_corpus()
    templates = sum(len(intent.questions) for intent in spec.intents.values())
    # Four rows per template, or the least that gives eval and holdout one per template.
    size = next(n for n in itertools.count(templates * 4) if _fits(_shares(n), spec))
    texts: list[str] = []
    for version in policy_versions(spec):
        for rows in generate_corpus(size, version, seed, spec).values():
            texts.extend(t for r in rows for t in (r.prompt, r.response))
    return texts


# Snapshots ---------------------------------------------------------------------------------


class DatasetNotFound(NotFound):
    """No dataset matches what the user named, or a file it lists is missing."""


def _row_dict(row: SFTRow | Mapping) -> dict:
    return row.model_dump(mode="json") if isinstance(row, SFTRow) else dict(row)


def _json_line(row: SFTRow | Mapping) -> str:
    line = json.dumps(_row_dict(row), sort_keys=True, ensure_ascii=False)
    # A lone surrogate (from a "\ud800" escape) cannot be UTF-8: keep it as its JSON escape, so
    # the file stays valid UTF-8 and reading it back gives the same string, for validation to judge.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", line) if _SURROGATE.search(line) else line


def _split_bytes(rows: Iterable[SFTRow | Mapping]) -> bytes:
    return "".join(_json_line(r) + "\n" for r in rows).encode("utf-8")


def _content_sha256(blobs: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for split in sorted(blobs):
        digest.update(f"{split}\n{len(blobs[split])}\n".encode())
        digest.update(blobs[split])
    return digest.hexdigest()


def snapshot(
    splits: Mapping[str, Sequence[SFTRow | Mapping]],
    datasets_dir: Path,
    parents: Sequence[str] = (),
    feedback_ids: Sequence[str] = (),
) -> DatasetRef:
    """Write a content-addressed snapshot; writing the same content again is a no-op.

    Args:
        splits: rows by split name.
        datasets_dir: folder that holds all snapshots (``<home>/datasets``).
        parents: sha256 of the snapshots this one derives from.
        feedback_ids: feedback event ids whose rows it contains.

    Returns:
        The DatasetRef of ``<datasets_dir>/<sha256>/``.
    """
    blobs = {name: _split_bytes(rows) for name, rows in splits.items()}
    sha = _content_sha256(blobs)
    target = to_path(datasets_dir) / sha
    if (target / REF_FILE).exists():
        return _read_ref(target / REF_FILE)
    versions = sorted({_row_dict(r).get("policy_version") for rows in splits.values() for r in rows} - {None})
    ref = DatasetRef(
        uri=to_uri(target),
        sha256=sha,
        rows=sum(len(rows) for rows in splits.values()),
        splits={name: len(rows) for name, rows in splits.items()},
        created_at=datetime.now(UTC),
        parents=list(parents),
        feedback_ids=sorted(feedback_ids),
        policy_version=",".join(map(str, versions)) or None,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp folder, then rename: a crash never leaves a half snapshot under its sha.
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=target.parent))
    try:
        for name, blob in blobs.items():
            (tmp / f"{name}.jsonl").write_bytes(blob)
        (tmp / REF_FILE).write_text(ref.model_dump_json(indent=2), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / REF_FILE).exists():
            raise
        return _read_ref(target / REF_FILE)
    log.info("snapshot %s: %d rows %s", sha[:12], ref.rows, ref.splits)
    return ref


def _read_ref(file: Path) -> DatasetRef:
    return DatasetRef.model_validate_json(file.read_text(encoding="utf-8"))


def latest_snapshot(datasets_dir: Path) -> DatasetRef | None:
    """The most recently created snapshot under ``datasets_dir``, by its ref's ``created_at``.

    Writing existing content again keeps its original ``created_at`` (snapshots are
    content-addressed), so re-seeding an older corpus does not make it the latest.

    Args:
        datasets_dir: folder that holds all snapshots (``<home>/datasets``).

    Returns:
        The newest snapshot's ref, or None when there is none.
    """
    folder = to_path(datasets_dir)
    if not folder.is_dir():
        return None
    refs = []
    for child in folder.iterdir():
        file = child / REF_FILE
        if child.name.startswith(".") or not file.is_file():
            continue  # temp folders of a snapshot being written
        try:
            refs.append(_read_ref(file))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: unreadable ref (%s)", child, _one_line(exc))
    return max(refs, key=lambda ref: (ref.created_at, ref.sha256), default=None)


def dataset_path(ref: DatasetRef) -> Path:
    """Local folder of a snapshot (or file, for a single-file dataset).

    Raises:
        InvalidInput: the dataset is not on a local file system.
    """
    try:
        return to_path(ref.uri)
    except ValueError as exc:
        raise InvalidInput(f"dataset {ref.sha256[:12]}: {exc}") from None


def read_split(path: Path | str | DatasetRef, split: str) -> list[dict]:
    """Rows of one split of a snapshot.

    A split the dataset does not have (its ref does not list it) reads as no rows; a split
    it lists whose file is missing is an error, never an empty list.

    Args:
        path: the snapshot's ref, folder (path or ``file://`` URI), or a single JSONL file
            (its ``train`` split).
        split: ``train``, ``eval`` or ``holdout``.

    Returns:
        The split's raw rows.

    Raises:
        DatasetNotFound: the dataset or a split file it lists is missing.
        InvalidInput: the file is not UTF-8 JSON Lines of objects.
    """
    listed: Mapping[str, int] | None = None
    if isinstance(path, DatasetRef):
        folder, listed = dataset_path(path), path.splits
    else:
        folder = to_path(path)
    if folder.is_file():
        return _read_jsonl(folder) if split == "train" else []
    if not folder.is_dir():
        raise DatasetNotFound(f"dataset folder {folder}: no such folder")
    file = folder / f"{split}.jsonl"
    if file.is_file():
        return _read_jsonl(file)
    if listed is None and (folder / REF_FILE).is_file():
        listed = _read_ref(folder / REF_FILE).splits
    if listed is not None and split not in listed:
        return []
    raise DatasetNotFound(f"{file}: no such file (the dataset's {split} split is missing)")


def _read_jsonl(file: Path) -> list[dict]:
    """The JSON objects of a JSON Lines file (UTF-8, a BOM and CRLF line ends accepted)."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFound(f"{file}: no such file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInput(
            f"{file}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None
    if text.lstrip().startswith("["):
        raise InvalidInput(
            f"{file}: holds a JSON array; a dataset file is JSON Lines, one JSON object per line"
        )
    rows: list[dict] = []
    # Only "\n" ends a line: str.splitlines would also cut at U+2028 or U+0085 inside a string.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{file}:{n}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InvalidInput(f"{file}:{n}: each line must be a JSON object, not {type(row).__name__}")
        rows.append(row)
    return rows


_SHA_PREFIX = re.compile(r"^[0-9a-f]{1,64}$")


def open_dataset(path_or_sha: str, datasets_dir: Path) -> tuple[DatasetRef, dict[str, list[dict]]]:
    """Open a dataset by sha256 (or unique prefix), snapshot folder or single JSONL file.

    The sha256 is recomputed from the files, so an edited copy is judged on what it holds.
    A single JSONL file counts as a ``train`` split.

    Args:
        path_or_sha: a sha256 or its prefix, or a path / ``file://`` URI of a folder or file.
        datasets_dir: folder that holds all snapshots (``<home>/datasets``).

    Returns:
        The dataset's ref and its raw rows by split.

    Raises:
        DatasetNotFound: nothing matches, a sha prefix is ambiguous, or a listed split is missing.
        InvalidInput: a file is not UTF-8 JSON Lines of objects, or the name is not a local path.
    """
    if not path_or_sha.strip():
        raise InvalidInput("name a dataset: a sha256 (or prefix), a snapshot folder or a .jsonl file")
    try:
        candidate = to_path(path_or_sha)
    except ValueError as exc:
        raise InvalidInput(f"dataset {path_or_sha!r}: {exc}") from None
    if candidate.is_file():
        files = {"train": candidate}
    else:
        if not candidate.is_dir():
            candidate = _snapshot_by_prefix(path_or_sha, to_path(datasets_dir))
        files = _split_files(candidate)
    rows = {split: _read_jsonl(file) for split, file in files.items()}
    sha = _content_sha256({s: _split_bytes(r) for s, r in rows.items()})
    stored = candidate / REF_FILE if candidate.is_dir() else None
    if stored and stored.is_file():
        ref = _read_ref(stored)
        if ref.sha256 == sha:
            return ref, rows
    ref = DatasetRef(
        uri=to_uri(candidate),
        sha256=sha,
        rows=sum(map(len, rows.values())),
        splits={s: len(r) for s, r in rows.items()},
        created_at=datetime.fromtimestamp(max(f.stat().st_mtime for f in files.values()), UTC),
    )
    return ref, rows


def _snapshot_by_prefix(name: str, datasets_dir: Path) -> Path:
    """The one snapshot folder whose sha256 starts with ``name``."""
    if not _SHA_PREFIX.match(name):
        raise DatasetNotFound(f"no dataset matches {name!r}: no such file or folder")
    matches = sorted(
        p
        for p in (datasets_dir.iterdir() if datasets_dir.is_dir() else ())
        if p.name.startswith(name) and p.is_dir()
    )
    if len(matches) != 1:
        if matches:
            raise DatasetNotFound(f"{len(matches)} datasets match {name!r}: give more of the sha256")
        raise DatasetNotFound(
            f"no dataset matches {name!r}: no such file or folder, and no snapshot in {datasets_dir} starts with it"
        )
    return matches[0]


def _split_files(folder: Path) -> dict[str, Path]:
    """The split files of a dataset folder; a split its ref lists must have its file."""
    files = {split: folder / f"{split}.jsonl" for split in SPLITS if (folder / f"{split}.jsonl").is_file()}
    if (folder / REF_FILE).is_file():
        listed = _read_ref(folder / REF_FILE).splits
        files.update({s: folder / f"{s}.jsonl" for s in listed if (folder / f"{s}.jsonl").is_file()})
        missing = [s for s in listed if s not in files]
        if missing:
            raise DatasetNotFound(
                f"{folder}: no such file {', '.join(f'{s}.jsonl' for s in missing)} (listed in {REF_FILE})"
            )
    if not files:
        raise DatasetNotFound(f"{folder} holds no train/eval/holdout .jsonl files")
    return files
