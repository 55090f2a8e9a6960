"""The one generation path: completions with usage counts, determinism, no shared state touched."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.model

PROMPTS = [
    "Where is my order?",
    "How long do I have to return a pair of shoes I bought last week?",
    "refund?",
    "Can I change the shipping address after I placed the order, and what does express shipping cost?",
]


@pytest.fixture(scope="module")
def predictor(base_model_dir, tmp_path_factory):
    from components import predict
    from components.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("predict") / "home", _env_file=None)
    return predict.load(str(base_model_dir), settings)


def test_completions_carry_usage_and_finish_reasons(predictor, base_model_dir):
    from components.schemas import GenerationParams

    assert predictor.uri == str(base_model_dir) and predictor.version is None
    out = predictor.generate(PROMPTS, GenerationParams(max_new_tokens=6))
    assert len(out) == len(PROMPTS)
    for prompt, completion in zip(PROMPTS, out, strict=True):
        assert completion.prompt_tokens == predictor.count_tokens(prompt) > 0
        assert 1 <= completion.completion_tokens <= 6
        # The untrained base model never says EOS: it runs to the limit.
        assert completion.finish_reason == "length" and completion.completion_tokens == 6
    longer = predictor.count_tokens(PROMPTS[3])
    assert longer > predictor.count_tokens(PROMPTS[0])

    (one,) = predictor.generate([PROMPTS[0]], GenerationParams(max_new_tokens=1))
    assert one.finish_reason == "length" and one.completion_tokens == 1


def test_stop_sequences_cut_the_text(predictor):
    from components.schemas import GenerationParams

    params = GenerationParams(max_new_tokens=40, do_sample=True, seed=7)
    (full,) = predictor.generate([PROMPTS[1]], params)
    assert full.finish_reason == "length" and len(full.text) > 4
    stop = full.text[2:4]  # a string the model is known to produce for this seed
    (cut,) = predictor.generate([PROMPTS[1]], params, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)].strip()
    assert stop not in cut.text and cut.completion_tokens < full.completion_tokens


def test_greedy_is_deterministic_and_batch_invariant(predictor):
    from components.schemas import GenerationParams

    params = GenerationParams(max_new_tokens=12)
    batched = predictor.generate(PROMPTS, params)
    assert predictor.generate(PROMPTS, params) == batched
    # Each prompt alone gets the answer it got among prompts of other lengths (left padding).
    alone = [predictor.generate([p], params)[0] for p in PROMPTS]
    assert alone == batched
    assert predictor.generate(list(reversed(PROMPTS)), params) == list(reversed(batched))


def test_seeded_sampling_uses_its_own_generator(predictor):
    import torch

    from components.schemas import GenerationParams

    tokenizer = predictor.tokenizer
    sides = tokenizer.padding_side, tokenizer.truncation_side
    rng = torch.random.get_rng_state()
    threads = torch.get_num_threads()

    seeded = GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=50, seed=11)
    first = predictor.generate(PROMPTS, seeded)
    assert predictor.generate(PROMPTS, seeded) == first  # same seed, same text
    assert predictor.generate([PROMPTS[2]], seeded) == [first[2]]  # and independent of the batch
    other = predictor.generate(PROMPTS, seeded.model_copy(update={"seed": 12}))
    assert other != first

    # Nothing shared moved: the process RNG, the tokenizer's sides, the thread count.
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert (tokenizer.padding_side, tokenizer.truncation_side) == sides
    assert torch.get_num_threads() == threads

    # An unseeded sampled request neither reads nor reseeds the process RNG either.
    predictor.generate(PROMPTS[:1], seeded.model_copy(update={"seed": None}))
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_concurrent_callers_get_what_they_would_get_alone(predictor):
    from components.schemas import GenerationParams

    greedy = GenerationParams(max_new_tokens=10)
    sampled = GenerationParams(max_new_tokens=10, do_sample=True, seed=5)
    expected = {
        "greedy": predictor.generate(PROMPTS, greedy),
        "sampled": predictor.generate(PROMPTS, sampled),
    }
    got: dict[str, list] = {}
    errors: list[BaseException] = []

    def call(name, params):
        try:
            for _ in range(3):
                got.setdefault(name, []).append(predictor.generate(PROMPTS, params))
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=call, args=a) for a in (("greedy", greedy), ("sampled", sampled))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got["greedy"] == [expected["greedy"]] * 3 and got["sampled"] == [expected["sampled"]] * 3


def test_pickle_checkpoints_are_refused(predictor, tmp_path):
    import torch

    from components import predict
    from components.errors import InvalidInput
    from components.settings import Settings

    settings = Settings(home=tmp_path / "home", _env_file=None)
    # A folder as older tooling writes it: config and tokenizer, weights as a pickle only
    # (transformers 5 writes safetensors even when asked for safe_serialization=False).
    pickled = tmp_path / "pickled"
    predictor.model.save_pretrained(pickled)
    predictor.tokenizer.save_pretrained(pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(predictor.model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(InvalidInput, match="safetensors"):
        predict.load(str(pickled), settings)

    # The same inside an MLflow model folder (the registry's download layout).
    mlflow_model = tmp_path / "mlflow-model"
    (mlflow_model / "model").mkdir(parents=True)
    for file in pickled.iterdir():
        (mlflow_model / "model" / file.name).write_bytes(file.read_bytes())
    (mlflow_model / "MLmodel").write_text("flavors:\n  transformers:\n    model_binary: model\n")
    with pytest.raises(InvalidInput, match="pickle"):
        predict.load(mlflow_model.as_uri(), settings)  # a file:// URI names the folder too


def test_model_references_resolve_in_one_place(tmp_path, base_model_dir):
    from components.errors import NotFound
    from components.predict import load, resolve_model
    from components.registry import ModelNotFound
    from components.settings import Settings

    settings = Settings(home=tmp_path / "home", _env_file=None)
    assert resolve_model(str(base_model_dir), settings) == (str(base_model_dir), None)
    assert resolve_model("runs:/abc/model", settings) == ("runs:/abc/model", None)
    logged = "models:/m-" + "0" * 32
    assert resolve_model(logged, settings) == (logged, None)
    for ref in ("champion", "3", "v3", "@staging", f"models:/{settings.model_name}/3"):
        with pytest.raises(ModelNotFound):  # asked of the (empty) registry, not treated as a path
            resolve_model(ref, settings)
    with pytest.raises(NotFound, match="no model folder"):
        load(str(tmp_path / "missing"), settings)
