"""The decoding engine: parity with transformers' generate, and invariants on tiny and fake models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import save_tiny_gpt2
from torch import nn

from distillery.generation import GenerationConfig, decode_step, generate, prefill, stream
from distillery.generation.engine import FixedShapeDecodeStep, compiled_decode_step
from distillery.generation.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    top_k_filter,
    top_p_filter,
)
from distillery.models import ConfigError, DistilleryError, ModelOutput, load_model

EOS = 98


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(ours, transformers') on the same tiny random GPT-2 (vocab 99, 64 positions)."""
    import transformers

    directory = save_tiny_gpt2(tmp_path_factory.mktemp("engine") / "tiny")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    return load_model(directory), theirs


class NextTokenModel(nn.Module):
    """A fake LM in milliseconds: the next token is always (last token + 1) % vocab."""

    def __init__(self, vocab_size: int = 10, n_positions: int = 64) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab_size, "n_positions": n_positions})()
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def new_cache(self, batch_size: int, max_length: int):
        return None

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0):
        nxt = (input_ids[:, -1:] + 1) % self.config.vocab_size
        return ModelOutput(logits=10.0 * nn.functional.one_hot(nxt, self.config.vocab_size).float())


PROMPT = torch.tensor([[5, 17, 42, 8, 3, 60]])

PARITY_SETTINGS = [  # (settings, seed)
    (dict(do_sample=False), 0),
    (dict(do_sample=False, repetition_penalty=1.4), 0),
    (dict(do_sample=True, num_return_sequences=5), 0),
    (dict(do_sample=True, num_return_sequences=5), 7),
    (dict(do_sample=True, top_k=5, temperature=0.7), 1),
    (dict(do_sample=True, top_k=0, top_p=0.8, num_return_sequences=3), 2),
    (dict(do_sample=True, repetition_penalty=1.3, temperature=1.5, top_p=0.95), 3),
]


@pytest.mark.parametrize(("settings", "seed"), PARITY_SETTINGS,
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) if isinstance(s, dict) else str(s))
def test_tokens_equal_transformers_generate(tiny, settings, seed):
    ours, theirs = tiny
    torch.manual_seed(seed)
    expected = theirs.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=20,
                               pad_token_id=EOS, **settings)
    torch.manual_seed(seed)
    got = generate(ours, PROMPT, None, GenerationConfig(max_new_tokens=20, eos_token_id=EOS, **settings))
    assert torch.equal(got, expected)


def test_eos_ends_rows_and_pads_them_like_transformers(tiny):
    ours, theirs = tiny
    # Sample a batch, then declare a token that shows up mid-way the EOS so that rows end at different steps.
    torch.manual_seed(3)
    free = generate(ours, PROMPT, None, GenerationConfig(do_sample=True, num_return_sequences=4, max_new_tokens=20))
    eos = int(free[0, PROMPT.size(1) + 4])
    torch.manual_seed(3)
    expected = theirs.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=True,
                               num_return_sequences=4, max_new_tokens=20, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(3)
    got = generate(ours, PROMPT, None, GenerationConfig(do_sample=True, num_return_sequences=4, max_new_tokens=20,
                                                        eos_token_id=eos))
    assert torch.equal(got, expected)
    assert (got[0, PROMPT.size(1) + 4:] == eos).all()


def test_left_padded_batch_equals_transformers_batch(tiny):
    ours, theirs = tiny
    ids = torch.tensor([[EOS, EOS, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.manual_seed(0)
    expected = theirs.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=12, pad_token_id=EOS,
                               repetition_penalty=1.2)
    torch.manual_seed(0)
    got = generate(ours, ids, mask, GenerationConfig(do_sample=True, max_new_tokens=12, eos_token_id=EOS,
                                                     repetition_penalty=1.2))
    assert torch.equal(got, expected)


def test_cached_decoding_equals_full_forward(tiny):
    ours, _ = tiny
    ids = torch.randint(0, 98, (2, 12), generator=torch.Generator().manual_seed(0))
    full = ours(ids).logits
    cache = ours.new_cache(2, 12)
    with torch.inference_mode():
        stepwise = [prefill(ours, ids[:, :5], None, cache)]
        stepwise += [decode_step(ours, ids[:, t], cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.stack(stepwise, dim=1), full[:, 4:11], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_one_by_one(tiny):
    ours, _ = tiny
    prompts = [[4, 8, 15, 16, 23, 42], [7], [30, 31, 32]]
    config = GenerationConfig(max_new_tokens=15, repetition_penalty=1.3)  # the penalty must ignore pads
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = generate(ours, ids, mask, config)[:, width:]
    for row, prompt in enumerate(prompts):
        alone = generate(ours, torch.tensor([prompt]), None, config)[0, len(prompt):]
        assert batched[row].tolist() == alone.tolist()


def test_temperature_zero_is_greedy_whatever_the_seed(tiny):
    ours, _ = tiny
    greedy = generate(ours, PROMPT, None, GenerationConfig(max_new_tokens=15))
    for seed in (0, 1):
        torch.manual_seed(seed)
        cold = generate(ours, PROMPT, None, GenerationConfig(do_sample=True, temperature=0.0, max_new_tokens=15))
        assert torch.equal(cold, greedy)


def test_same_seed_same_sample_other_seed_other_sample(tiny):
    ours, _ = tiny
    config = GenerationConfig(do_sample=True, max_new_tokens=15)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(generate(ours, PROMPT, None, config))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_length_limits():
    model = NextTokenModel()
    prompt = torch.tensor([[1, 2, 3]])
    assert generate(model, prompt, None, GenerationConfig(max_new_tokens=4)).tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert generate(model, prompt, None, GenerationConfig(max_length=5)).tolist() == [[1, 2, 3, 4, 5]]
    # max_new_tokens wins over max_length, as in transformers; the default is 20 new tokens.
    assert generate(model, prompt, None, GenerationConfig(max_length=5, max_new_tokens=2)).shape == (1, 5)
    assert generate(model, prompt, None, GenerationConfig()).shape == (1, 23)
    assert torch.equal(generate(model, prompt, None, GenerationConfig(max_new_tokens=0)), prompt)


def test_eos_and_stop_callback_end_rows_with_padding():
    model = NextTokenModel()
    prompt = torch.tensor([[1], [5]])
    out = generate(model, prompt, None, GenerationConfig(max_new_tokens=8, eos_token_id=7, pad_token_id=0))
    # Row 1 reaches EOS (7) after 2 tokens and is padded until row 0 reaches it after 6.
    assert out.tolist() == [[1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 0, 0, 0, 0]]
    out = generate(model, prompt, None, GenerationConfig(max_new_tokens=8, pad_token_id=0),
                   stop=lambda tokens: tokens == 3)
    assert out.tolist() == [[1, 2, 3, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 0, 1, 2, 3]]


def test_stream_yields_the_tokens_generate_returns(tiny):
    ours, _ = tiny
    config = GenerationConfig(do_sample=True, max_new_tokens=10, num_return_sequences=2)
    torch.manual_seed(1)
    steps = list(stream(ours, PROMPT, None, config))
    torch.manual_seed(1)
    whole = generate(ours, PROMPT, None, config)
    assert all(step.shape == (2,) for step in steps)
    assert torch.equal(torch.stack(steps, dim=1), whole[:, PROMPT.size(1):])


@pytest.mark.parametrize(("settings", "message"), [
    (dict(do_sample=True, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(do_sample=True, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(do_sample=True, temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(num_return_sequences=3), "num_return_sequences=3 needs sampling"),
    (dict(do_sample=True, temperature=0, num_return_sequences=2), "needs sampling"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_length=0), "max_length must be a positive integer"),
    (dict(top_k=-3), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(num_return_sequences=0), "num_return_sequences must be a positive integer"),
    (dict(eos_token_id=-1), "eos_token_id must be a token id"),
])
def test_bad_settings_name_the_argument(settings, message):
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**settings)
    assert message in str(e.value)


def test_lengths_that_do_not_fit_are_refused():
    model = NextTokenModel(n_positions=16)
    with pytest.raises(ConfigError, match="max_length .* is 3; raise max_length"):
        generate(model, torch.tensor([[1, 2, 3]]), None, GenerationConfig(max_length=3))
    with pytest.raises(ConfigError, match="exceeds the model's 16 positions; ask for at most 13 new tokens"):
        generate(model, torch.tensor([[1, 2, 3]]), None, GenerationConfig(max_new_tokens=14))
    with pytest.raises(ConfigError, match="20 tokens long but the model has only 16 positions"):
        generate(model, torch.ones(1, 20, dtype=torch.long), None, GenerationConfig(max_new_tokens=1))


def test_a_model_without_a_cache_cannot_generate(tiny_roberta_dir):
    with pytest.raises(DistilleryError, match="cannot generate text"):
        generate(load_model(tiny_roberta_dir), PROMPT, None, GenerationConfig(max_new_tokens=1))


def test_processors_equal_transformers_processors():
    from transformers.generation import logits_process as lp

    scores = torch.randn(4, 99, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.randint(0, 99, (4, 7), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(4, 99, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(apply_repetition_penalty(scores, seen, 1.3),
                       lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))
    assert torch.equal(apply_temperature(scores, 0.7), lp.TemperatureLogitsWarper(0.7)(ids, scores))
    for k in (1, 5, 200):
        assert torch.equal(top_k_filter(scores, k), lp.TopKLogitsWarper(k)(ids, scores))
    for p in (0.05, 0.5, 0.9, 1.0):
        assert torch.equal(top_p_filter(scores, p), lp.TopPLogitsWarper(p)(ids, scores))


def test_top_k_and_top_p_keep_what_they_promise():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    scores = probs.log()
    assert torch.isfinite(top_k_filter(scores, 2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(scores, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(scores, 0.01)).tolist() == [[True, False, False, False]]


def test_fixed_shape_steps_equal_growing_cache_steps(tiny):
    """What a CUDA graph replays (every slot attended, masked; positions and slot in tensors) yields
    what the growing cache yields, left padding included, and again after a new prompt."""
    ours, _ = tiny
    step = FixedShapeDecodeStep(ours, ours.new_cache(3, 24), graph=False)
    for prompts in ([[4, 8, 15, 16, 23, 42], [7], [30, 31, 32]], [[9, 9], [1, 2, 3, 4, 5, 6, 7, 8], [50]]):
        width = max(map(len, prompts))
        ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        run_mask = torch.cat([mask, torch.ones(3, 24 - width, dtype=torch.long)], dim=1)
        growing = ours.new_cache(3, 24)
        with torch.inference_mode():
            expected = prefill(ours, ids, mask, growing)
            torch.testing.assert_close(step.prefill(ids, mask), expected)
            for _ in range(24 - width):
                tokens = expected.argmax(-1)
                expected = decode_step(ours, tokens, growing, run_mask[:, : growing.length + 1])
                torch.testing.assert_close(step(ours, tokens, step.cache), expected, atol=1e-5, rtol=1e-5)
                assert step.cache.length == growing.length
            with pytest.raises(ValueError, match="holds 24 positions; 25 were asked for"):
                step(ours, tokens, step.cache)


def test_compiled_steps_equal_eager_steps_and_write_the_cache_in_place(tiny):
    """torch.compile with frozen weights (a copy of the model, so that other tests keep theirs):
    left-padded rows give the eager logits step by step, and the keys and values land in the
    cache's own tensors, as the eager step puts them."""
    model = copy.deepcopy(tiny[0]).eval()
    step = compiled_decode_step(model)
    assert compiled_decode_step(model) is step  # compiled once per model
    ids = torch.tensor([[EOS, EOS, 5, 17], [42, 8, 3, 60]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    run_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
    eager_cache, compiled_cache = model.new_cache(2, 40), model.new_cache(2, 40)
    keys = compiled_cache.keys[0]
    with torch.inference_mode():
        expected = prefill(model, ids, mask, eager_cache)
        torch.testing.assert_close(prefill(model, ids, mask, compiled_cache), expected)
        for _ in range(8):
            tokens = expected.argmax(-1)
            step_mask = run_mask[:, : eager_cache.length + 1]
            expected = decode_step(model, tokens, eager_cache, step_mask)
            torch.testing.assert_close(step(model, tokens, compiled_cache, step_mask), expected, atol=1e-4, rtol=1e-4)
    assert compiled_cache.length == eager_cache.length == 12 and compiled_cache.keys[0] is keys
    for ours, theirs in zip(compiled_cache.keys + compiled_cache.values, eager_cache.keys + eager_cache.values):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # the compiled step would still use the old weights
    with pytest.raises(DistilleryError, match="weights changed after its decode step was compiled"):
        generate(model, ids, mask, GenerationConfig(max_new_tokens=2), compile=True)


def test_compile_without_a_cxx_compiler_is_one_sentence(tiny):
    """On a CPU inductor builds C++ kernels; without a working compiler that is a clear error."""
    from torch._inductor import config as inductor_config

    model = copy.deepcopy(tiny[0]).eval()
    no_compiler = {"cpp.cxx": (None, "/nonexistent/g++"), "force_disable_caches": True}  # no earlier build either
    with inductor_config.patch(no_compiler), pytest.raises(
            DistilleryError, match=r"torch.compile could not build the decode step \(.*C\+\+ compiler"):
        generate(model, PROMPT, None, GenerationConfig(max_new_tokens=3), compile=True)


def test_cuda_graphs_are_refused_off_a_gpu_and_with_compile(tiny):
    ours, _ = tiny
    with pytest.raises(ConfigError, match="CUDA graphs need the model on a CUDA GPU; load it with device='cuda'"):
        generate(ours, PROMPT, None, GenerationConfig(max_new_tokens=2), cuda_graphs=True)
    with pytest.raises(ConfigError, match="Choose torch.compile or CUDA graphs"):
        generate(ours, PROMPT, None, GenerationConfig(max_new_tokens=2), compile=True, cuda_graphs=True)
    with pytest.raises(ConfigError, match="CUDA graphs need"):
        FixedShapeDecodeStep(ours, ours.new_cache(1, 8), graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_cuda_graph_decoding_equals_eager_decoding(tiny):
    ours, _ = tiny
    model = copy.deepcopy(ours).to("cuda").eval()
    prompts = torch.tensor([[EOS, EOS, 5, 17], [42, 8, 3, 60]], device="cuda")
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], device="cuda")
    config = GenerationConfig(max_new_tokens=20)
    eager = generate(model, prompts, mask, config)
    assert torch.equal(generate(model, prompts, mask, config, cuda_graphs=True), eager)
    assert torch.equal(generate(model, prompts, mask, config, cuda_graphs=True), eager)  # replayed again
    assert len(model._recorded_decode_steps) == 1
    one = generate(model, prompts[1:, 1:], None, config)  # another shape: another graph
    assert torch.equal(generate(model, prompts[1:, 1:], None, config, cuda_graphs=True), one)
    torch.manual_seed(3)
    sampled = generate(model, prompts, mask, GenerationConfig(do_sample=True, max_new_tokens=20))
    torch.manual_seed(3)
    assert torch.equal(generate(model, prompts, mask, GenerationConfig(do_sample=True, max_new_tokens=20),
                                cuda_graphs=True), sampled)
