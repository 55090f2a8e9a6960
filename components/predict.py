"""Load a model once and generate completions: the one generation path of evaluation and serving.

A :class:`Predictor` never changes shared state: prompts are padded by hand (the tokenizer's
padding side is never touched), a sampled request draws from its own ``torch.Generator`` (the
process-wide RNG is never reseeded), and torch's thread count is set once, when the model loads.
One predictor may be called from several threads.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.errors import InvalidInput, NotFound
from components.schemas import Completion, GenerationParams

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from components.settings import Settings

log = logging.getLogger(__name__)

BATCH_SIZE = 32
SMALL_MODEL_PARAMETERS = 50_000_000  # below this, decode on one CPU thread (see _set_threads)
# The prompt template's section marker: text from there on is the model starting a new turn.
TURN_MARKER = "###"
REGISTRY_ALIASES = ("champion", "challenger", "previous")
_REGISTRY_REF = re.compile(r"^(?:@[\w.-]+|v?\d+)$")
_LOGGED_MODEL = re.compile(r"^models:/m-[0-9a-f]{32}/?$")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def resolve_model(ref: str, settings: Settings) -> tuple[str, str | None]:
    """Pin what a user or a step named to a loadable model URI and its registry version.

    Args:
        ref: a registry alias (``champion``, ``challenger``, ``previous``, ``@any-alias``), a
            version (``3``, ``v3``), ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` — all
            resolved through the registry now, so a later alias move cannot change what loads —
            or anything else as it is: ``models:/m-…`` (a logged model), ``runs:/…``, an artifact
            URI, a local folder or ``file://`` URI, a Hugging Face model id.
        settings: tracking / registry URI and registered model name.

    Returns:
        (model URI, registry version or None).

    Raises:
        components.registry.ModelNotFound: a registry reference that matches no version.
    """
    ref = ref.strip()
    if ref in REGISTRY_ALIASES or _REGISTRY_REF.match(ref) or _is_registry_uri(ref):
        from components.registry import resolve

        info = resolve(ref, settings)
        return info.model_uri, info.version
    return ref, None


def load(
    uri_or_path: str, settings: Settings, *, device: str | None = None, batch_size: int = BATCH_SIZE
) -> Predictor:
    """Load a model for generation; weights from safetensors only.

    Args:
        uri_or_path: anything :func:`resolve_model` accepts.
        settings: tracking / registry URI to resolve MLflow URIs against.
        device: torch device; default CUDA when available, else CPU.
        batch_size: most prompts per ``generate`` call.

    Returns:
        A predictor for that model (registry version pinned at load).

    Raises:
        InvalidInput: the model's weights exist only as a pickle checkpoint.
        NotFound: nothing to load at that path or id.
    """
    import torch

    uri, version = resolve_model(uri_or_path, settings)
    model, tokenizer = _load(uri, settings)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    _set_threads(model)
    name = settings.model_name if version is not None else uri
    if (match := re.match(r"^models:/([^/@]+)/", uri)) and version is not None:
        name = match[1]
    return Predictor(model, tokenizer, uri=uri, version=version, name=name, batch_size=batch_size)


def load_pretrained(uri_or_path: str, settings: Settings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer :func:`load` would wrap, on the CPU, to save or train further."""
    return _load(resolve_model(uri_or_path, settings)[0], settings)


class Predictor:
    """A loaded causal LM that answers prompts through the one prompt template."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        uri: str,
        version: str | None = None,
        name: str | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        """Wrap a model in eval mode and its tokenizer (used as is: never reconfigured).

        Args:
            model: the causal LM.
            tokenizer: its tokenizer (a pad token is needed only if none of EOS/pad is set).
            uri: what was loaded (pinned URI or path).
            version: registry version, when loaded through the registry.
            name: registered model name (or the URI when there is none).
            batch_size: most prompts per ``generate`` call.
        """
        self.uri = uri
        self.version = version
        self.name = name or uri
        self.batch_size = max(1, batch_size)
        self._model = model.eval()
        self._tokenizer = tokenizer
        # Fast tokenizers hold Rust state that a concurrent call may re-borrow: one at a time.
        self._tokenizer_lock = threading.Lock()
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self._eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else model.generation_config.pad_token_id
        )
        self._pad_id = int(pad if pad is not None else min(self._eos_ids))
        self._stop_criteria: dict[tuple[str, ...], Any] = {}

    @property
    def model(self) -> PreTrainedModel:
        """The model (read-only use: scoring a loss)."""
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (read-only use)."""
        return self._tokenizer

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + completion) the model attends to."""
        config = self._model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if value := getattr(config, key, None):
                return int(value)
        return 1024

    def count_tokens(self, prompt: str) -> int:
        """Tokens of a user prompt once templated (what a completion's ``prompt_tokens`` counts)."""
        return len(self._encode([prompt])[0])

    def generate(
        self, prompts: Sequence[str], params: GenerationParams, stop: Sequence[str] | None = None
    ) -> list[Completion]:
        """Answer user prompts: batched by length, greedy unless ``params.do_sample``.

        Greedy decoding is deterministic and does not depend on which prompts share a batch;
        a sampled request with ``params.seed`` gives the same text for the same prompt and seed.

        Args:
            prompts: raw user prompts (normalized and templated here).
            params: generation parameters.
            stop: extra strings that end an answer (the template's turn marker always does).

        Returns:
            One completion per prompt, in order.

        Raises:
            InvalidInput: ``max_new_tokens`` leaves no room for a prompt in the model's context.
        """
        import torch

        if not prompts:
            return []
        max_new = params.max_new_tokens
        max_prompt = self.max_context - max_new
        if max_prompt < 1:
            raise InvalidInput(
                f"max_new_tokens {max_new} leaves no room for a prompt in the model's context "
                f"of {self.max_context} tokens"
            )
        stops = tuple(dict.fromkeys([TURN_MARKER, *(s for s in (stop or ()) if s)]))
        encoded = [ids[-max_prompt:] for ids in self._encode(prompts)]  # keep the end: it holds the cue
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [encoded[i] for i in idx]
            with torch.inference_mode():
                out = self._model.generate(**self._generate_kwargs(batch, params, stops))
            width = max(len(ids) for ids in batch)
            for i, ids, row in zip(idx, batch, out[:, width:].tolist(), strict=True):
                results[i] = self._completion(row, len(ids), max_new, stops)
        return [r for r in results if r is not None]

    # Internals -----------------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        from components.prompt import format_prompt

        # Special tokens as training adds them to a context (trainloop.build_examples).
        with self._tokenizer_lock:
            encoded = self._tokenizer([format_prompt(p) for p in prompts], add_special_tokens=True)
        return [list(ids) for ids in encoded["input_ids"]]

    def _generate_kwargs(
        self, batch: Sequence[Sequence[int]], params: GenerationParams, stops: tuple[str, ...]
    ) -> dict[str, Any]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        # Left padding by hand: the tokenizer's padding side belongs to whoever else uses it.
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
        # A fresh config: the model's own sampling defaults (a hub model's temperature, top_p…)
        # must not leak into a request; the request's params are the whole configuration.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self._pad_id,
            eos_token_id=sorted(self._eos_ids) or None,
        )
        processors = LogitsProcessorList()
        if params.do_sample and params.temperature > 0:
            # Sampled by our own processor with a generator per row; generate then takes its
            # argmax. The process-wide RNG is never drawn from or reseeded.
            processors.append(_Sampler(params, len(batch), self._model.device))
        return {
            "input_ids": input_ids.to(self._model.device),
            "attention_mask": attention_mask.to(self._model.device),
            "generation_config": config,
            "logits_processor": processors,
            "stopping_criteria": StoppingCriteriaList([self._stop_criterion(stops)]),
        }

    def _stop_criterion(self, stops: tuple[str, ...]) -> Any:
        from transformers.generation.stopping_criteria import StopStringCriteria

        with self._tokenizer_lock:
            if stops not in self._stop_criteria:
                self._stop_criteria[stops] = StopStringCriteria(self._tokenizer, list(stops))
            return self._stop_criteria[stops]

    def _completion(
        self, row: list[int], prompt_tokens: int, max_new: int, stops: tuple[str, ...]
    ) -> Completion:
        """One answer from the generated ids of a row: cut at EOS / padding and at the first stop string."""
        ended = next((k for k, tok in enumerate(row) if tok in self._eos_ids or tok == self._pad_id), None)
        kept = row if ended is None else row[:ended]
        with self._tokenizer_lock:
            text = self._tokenizer.decode(kept, skip_special_tokens=True)
        cut = min((at for s in stops if (at := text.find(s)) >= 0), default=None)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif ended is not None:
            reason = "stop"
        else:
            reason = "length" if len(row) >= max_new else "stop"
        generated = len(kept) + (1 if ended is not None and row[ended] in self._eos_ids else 0)
        return Completion(
            text=text.strip(), prompt_tokens=prompt_tokens, completion_tokens=generated, finish_reason=reason
        )


class _Sampler:
    """A logits processor that samples each row with its own generator (temperature, top-k, top-p)."""

    def __init__(self, params: GenerationParams, rows: int, device: torch.device) -> None:
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self._warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_k:
            self._warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(params.top_p))
        self._generators = []
        for _ in range(rows):
            generator = torch.Generator(device=device)
            # Every row starts from the request's seed: a prompt's answer does not depend on
            # its batch; without a seed, a fresh non-deterministic one.
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
            self._generators.append(generator)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import torch

        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picked = torch.stack(
            [torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(self._generators)]
        )
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, picked.unsqueeze(1), 0.0)
        return out


# Loading -----------------------------------------------------------------------------------


def _is_registry_uri(ref: str) -> bool:
    return ref.startswith("models:/") and not _LOGGED_MODEL.match(ref)


def _load(uri: str, settings: Settings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local folder, an MLflow URI or a Hugging Face id."""
    from components.uris import is_local, to_path

    if is_local(uri):
        path = to_path(uri)
        if path.is_dir():
            return _load_folder(path)
        if uri.startswith(("file:", "/", ".", "~")) or path.exists():
            raise NotFound(f"no model folder at {path}")
        return _load_hub(uri)
    import mlflow

    from components.registry import artifact_location

    location = artifact_location(uri, settings)
    if is_local(location) and to_path(location).is_dir():  # a local artifact store: read it in place
        return _load_folder(to_path(location))
    with tempfile.TemporaryDirectory(prefix="flywheel-model-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=location,
            dst_path=tmp,
            tracking_uri=settings.tracking_uri,
            registry_uri=settings.tracking_uri,
        )
        return _load_folder(Path(path))


def _load_hub(model_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from components.base_model import load_model

    try:
        return load_model(model_id)
    except OSError as exc:  # no such repo, offline, or only pickle weights there
        raise NotFound(f"cannot load {model_id!r} as a local folder or a Hugging Face model: {exc}") from exc


def _load_folder(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face folder, or the one inside a downloaded MLflow transformers model."""
    from transformers import AutoModelForCausalLM

    from components.base_model import load_tokenizer

    weights, tokenizer_dir = path, path
    mlmodel = path / "MLmodel"
    if mlmodel.exists():
        import yaml

        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("transformers")
        if not flavor:
            raise InvalidInput(f"{path} is an MLflow model without the transformers flavor")
        weights = path / str(flavor.get("model_binary") or "model")
        components_tokenizer = path / "components" / "tokenizer"
        tokenizer_dir = components_tokenizer if components_tokenizer.is_dir() else weights
    _require_safetensors(weights)
    tokenizer = load_tokenizer(tokenizer_dir)
    from safetensors import SafetensorError

    try:  # never the model's own code: a registry version is data, not a program
        model = AutoModelForCausalLM.from_pretrained(
            str(weights), use_safetensors=True, dtype="auto", trust_remote_code=False
        )
    except SafetensorError as exc:  # e.g. a pickle renamed to model.safetensors
        raise InvalidInput(f"{weights}: the safetensors weights cannot be read: {exc}") from exc
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _require_safetensors(folder: Path) -> None:
    """Refuse a folder whose weights exist only as a pickle: unpickling runs arbitrary code."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
    found = f"found only pickle weights ({', '.join(pickles)})" if pickles else "found no weights"
    raise InvalidInput(
        f"{folder}: {found}; flywheel loads safetensors only (save with save_pretrained(..., "
        "safe_serialization=True), or log the MLflow model with save_pretrained=True)"
    )


def _set_threads(model: PreTrainedModel) -> None:
    """One intra-op thread for a small model on CPU, set once at load.

    Decoding a small model is a long chain of tiny ops: extra threads only add synchronization
    (measured here: 200 answers of the ~0.5 M-parameter base model take 2 s on one thread, 5-15 s
    on two when the cores are shared).
    """
    import torch

    small = model.device.type == "cpu" and model.num_parameters() < SMALL_MODEL_PARAMETERS
    if small and torch.get_num_threads() != 1:
        log.info("small model on CPU: torch uses one intra-op thread from now on")
        torch.set_num_threads(1)
