"""dsv3.eval lm-eval adapter, against lm-eval's documented LM interface: the real
``lm_eval`` when installed, else a minimal stand-in with the same abstract base and
``Instance.args`` (the adapter must then implement every abstract method, or the
class cannot be instantiated). Without lm-eval, a clear ImportError. A context too
long for max_gen_toks loses its start, and the adapter counts it; ``run_evaluation``
reports the count."""
import abc
import math
import sys
import types

import pytest
import torch

import dsv3.eval.lm_eval_adapter as adapter
from test_eval_support import OracleModel, UniformModel, codec

try:
    from lm_eval.api.instance import Instance as _RealInstance
    REAL = True
except ImportError:
    REAL = False


def _stand_in_modules() -> dict:
    """lm_eval.api.model.LM as the lm-eval docs define it: an ABC with three methods."""
    class LM(abc.ABC):
        def __init__(self):
            self._rank, self._world_size = 0, 1

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def loglikelihood_rolling(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

    names = ("lm_eval", "lm_eval.api", "lm_eval.api.model")
    root, api, model = (types.ModuleType(n) for n in names)
    model.LM, root.api, api.model = LM, api, model
    return {"lm_eval": root, "lm_eval.api": api, "lm_eval.api.model": model}


@pytest.fixture
def lm_class(monkeypatch):
    monkeypatch.setattr(adapter, "_CLASS", None)
    if not REAL:
        for name, module in _stand_in_modules().items():
            monkeypatch.setitem(sys.modules, name, module)
    return adapter.lm_eval_class()


def request(kind, *args):
    if REAL:
        return _RealInstance(request_type=kind, doc={}, arguments=args, idx=0)
    return types.SimpleNamespace(args=args)


def test_loglikelihood_and_greedy_flag(lm_class):
    text_codec = codec()
    vocab, eos = text_codec.vocab_size, text_codec.eos_id
    # Context "The quick" + " brown fox": the oracle knows it; trailing space moves over.
    knows = [[eos] + text_codec.encode("The quick") + text_codec.encode(" brown fox")]
    lm = lm_class(model=OracleModel(vocab, knows), codec=text_codec)
    (sure, greedy), (unsure, not_greedy) = lm.loglikelihood(
        [request("loglikelihood", "The quick ", "brown fox"),
         request("loglikelihood", "The quick", " lazy dog")])
    n = len(text_codec.encode(" brown fox"))
    assert sure == pytest.approx(n * (20 - math.log(math.exp(20) + vocab - 1)), abs=1e-6)
    assert greedy is True and not_greedy is False
    # " lazy" where the oracle expected " brown" (logit 20 elsewhere), then uniform.
    m = len(text_codec.encode(" lazy dog"))
    want = -math.log(math.exp(20) + vocab - 1) - (m - 1) * math.log(vocab)
    assert unsure == pytest.approx(want, rel=1e-6)


def test_rolling_loglikelihood_counts_every_token_once(lm_class):
    text_codec = codec()
    vocab = text_codec.vocab_size
    text = "The quick brown fox jumps over the lazy dog. " * 3
    lm = lm_class(model=UniformModel(vocab, max_seq_len=8), codec=text_codec)
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert total == pytest.approx(-len(text_codec.encode(text)) * math.log(vocab), rel=1e-6)


def test_generate_until_stops_at_the_stop_string(lm_class):
    text_codec = codec()
    eos = text_codec.eos_id
    says = [[eos] + text_codec.encode("import os") + text_codec.encode("\nprint(os.getcwd())\n")]
    lm = lm_class(model=OracleModel(text_codec.vocab_size, says), codec=text_codec)
    calls = []
    model = lm.model
    lm.model = lambda tokens_BS, kv_cache=None: calls.append(1) or model(tokens_BS, kv_cache)
    lm.model.config = model.config
    (out,) = lm.generate_until([request("generate_until", "import os",
                                        {"until": [")\n"], "max_gen_toks": 30})])
    assert out == "\nprint(os.getcwd()"
    # Decoding stops once the stop string is there, not at max_gen_toks or eos: one
    # forward for the prompt, then one per new token but the last.
    calls.clear()
    (out,) = lm.generate_until([request("generate_until", "import os",
                                        {"until": ["getcwd"], "max_gen_toks": 30})])
    assert out == "\nprint(os."
    generated = text_codec.encode("\nprint(os.getcwd())\n")
    needed = next(n for n in range(1, len(generated) + 1)
                  if "getcwd" in text_codec.decode(generated[:n]))
    assert len(calls) == needed < len(generated)


def test_needs_model_or_checkpoint(lm_class):
    with pytest.raises(ValueError, match="pass model= and codec=, or checkpoint="):
        lm_class()


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setattr(adapter, "_CLASS", None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        adapter.Dsv3LM
    with pytest.raises(ImportError, match="pip install lm-eval"):
        adapter.run_lm_eval(None, ["hellaswag"])


def test_generate_until_cuts_a_long_context_to_leave_room_and_counts_it(lm_class):
    """A context that filled the model's context used to keep its last max_seq_len
    tokens and get one token, uncounted; now it keeps W - max_gen_toks + 1."""
    text_codec = codec()
    eos, window, budget = text_codec.eos_id, 32, 8
    contexts = ["the cat sat on the mat " * 10, "import os"]
    ids = [[eos] + text_codec.encode(c) for c in contexts]
    assert len(ids[0]) > window > len(ids[1])
    says = [ids[0][-(window - budget + 1):] + text_codec.encode(" the dog ran\n"),
            ids[1] + text_codec.encode("\nprint(os")]
    lm = lm_class(model=OracleModel(text_codec.vocab_size, says, max_seq_len=window),
                  codec=text_codec)
    outs = lm.generate_until([request("generate_until", c, {"until": ["\n"],
                                                            "max_gen_toks": budget})
                              for c in contexts])
    assert outs == [" the dog ran", ""]
    assert (lm.generations, lm.truncated_prompts) == (2, 1)


def test_max_gen_toks_must_fit_the_context(lm_class):
    text_codec = codec()
    model = UniformModel(text_codec.vocab_size, max_seq_len=32)
    # Without one given: 256, or half the context when that is less (room for a prompt).
    assert lm_class(model=model, codec=text_codec).max_gen_toks == 16
    assert lm_class(model=model, codec=text_codec, max_gen_toks="32").max_gen_toks == 32
    with pytest.raises(ValueError, match=r"Dsv3LM: max_gen_toks must be a whole number >= 0 "
                                         r"and <= the model's max_seq_len=32, got 33"):
        lm_class(model=model, codec=text_codec, max_gen_toks=33)
    lm = lm_class(model=model, codec=text_codec)
    with pytest.raises(ValueError, match=r"generate_until: the request's max_gen_toks must be "
                                         r"a whole number >= 0, got 2.5"):
        lm.generate_until([request("generate_until", "a dog", {"max_gen_toks": 2.5})])


def test_a_request_asking_past_the_context_gets_the_adapters_budget_and_is_counted(lm_class):
    """A task written for large models (gsm8k asks for 256 new tokens) on a small one:
    it used to fail the run there, after the tasks before it; now the request gets the
    adapter's max_gen_toks and the results count it."""
    text_codec = codec()
    model = UniformModel(text_codec.vocab_size, max_seq_len=32)
    says_7 = lambda tokens_BS, kv_cache=None: model(tokens_BS, kv_cache).index_fill(  # noqa: E731
        -1, torch.tensor([7]), 1.0)
    says_7.config = model.config
    lm = lm_class(model=says_7, codec=text_codec, max_gen_toks=5)
    outs = lm.generate_until([request("generate_until", "a dog", {"max_gen_toks": 256}),
                              request("generate_until", "a cat", {"max_gen_toks": 32})])
    assert outs == [text_codec.decode([7] * 5), text_codec.decode([7] * 32)]
    assert (lm.generations, lm.capped_requests) == (2, 1)
    from dsv3.eval.report import result_warnings
    results = {"tasks": {"lm-eval:gsm8k": {"generations": 2, "truncated_prompts": 0,
                                           "capped_requests": 1, "max_gen_toks": 5}}}
    assert result_warnings(results) == [
        "lm-eval:gsm8k: 1 of 2 requests asked for more new tokens (the task's max_gen_toks) "
        "than the model's context holds and got 5 instead"]


def test_run_evaluation_reports_lm_eval_prompts_the_context_cut(lm_class, monkeypatch):
    """What the adapter counted comes back beside lm-eval's metrics and as a warning."""
    from dsv3.eval.report import markdown_table, result_warnings
    from dsv3.eval.runner import EvalOptions, run_evaluation
    text_codec = codec()

    def fake_lm_eval(lm, tasks, num_fewshot=None, limit=None):  # lm-eval needs the hub
        lm.generate_until([request("generate_until", text, {"max_gen_toks": 8})
                           for text in ("the cat sat on the mat " * 10, "a dog")])
        return {tasks[0]: {"exact_match,none": 0.5}}
    monkeypatch.setattr(adapter, "run_lm_eval", fake_lm_eval)
    model = UniformModel(text_codec.vocab_size, max_seq_len=32)
    results = run_evaluation(model, text_codec, ["lm-eval:fake"], EvalOptions(progress=False))
    result = results["tasks"]["lm-eval:fake"]
    assert (result["generations"], result["truncated_prompts"]) == (2, 1)
    assert result_warnings(results) == [
        "lm-eval:fake: 1 of 2 prompts left the model's context too little room for the "
        "tokens to generate and lost their start: lower the task's max_gen_toks or shorten "
        "the prompts"]
    assert "| lm-eval:fake fake | exact_match,none | 0.5 |" in markdown_table(results)


def test_trailing_whitespace_of_any_kind_moves_to_the_continuation(lm_class):
    """lm-eval's own models move all of the context's trailing whitespace
    (``context.rstrip()`` in ``_encode_pair``), a newline too; the adapter moved only
    spaces, so a context ending in "\\n" had its newline scored as context, and the
    continuation's log-likelihood summed one token fewer than on lm-eval's models."""
    assert adapter.split_pair("Q: 2+2?\n", "4") == ("Q: 2+2?", "\n4")
    assert adapter.split_pair("The quick \t\n ", "fox") == ("The quick", " \t\n fox")
    assert adapter.split_pair("The quick", " fox") == ("The quick", " fox")
    text_codec = codec()
    vocab, eos = text_codec.vocab_size, text_codec.eos_id
    knows = [[eos] + text_codec.encode("The quick") + text_codec.encode("\nbrown fox")]
    lm = lm_class(model=OracleModel(vocab, knows), codec=text_codec)
    ((logprob, greedy),) = lm.loglikelihood([request("loglikelihood", "The quick\n",
                                                     "brown fox")])
    n = len(text_codec.encode("\nbrown fox"))
    assert logprob == pytest.approx(n * (20 - math.log(math.exp(20) + vocab - 1)), abs=1e-6)
    assert greedy is True


@pytest.mark.parametrize("value", ["auto", "auto:4"])
def test_batch_size_auto_is_the_adapters_default(lm_class, value):
    """lm-eval passes --batch_size as text and allows "auto"/"auto:N": int("auto")
    failed with a message that named no argument."""
    text_codec = codec()
    lm = lm_class(model=UniformModel(text_codec.vocab_size), codec=text_codec,
                  batch_size=value)
    assert lm.batch_size == adapter.DEFAULT_BATCH_SIZE
    assert lm_class(model=lm.model, codec=text_codec, batch_size="16").batch_size == 16


@pytest.mark.parametrize("value", ["big", "0", 0, 2.5, True, "automatic"])
def test_a_bad_batch_size_is_named(lm_class, value):
    text_codec = codec()
    with pytest.raises(ValueError, match=r"Dsv3LM: batch_size must be a whole number >= 1, "
                                         r"\"auto\" or \"auto:N\", got "):
        lm_class(model=UniformModel(text_codec.vocab_size), codec=text_codec,
                 batch_size=value)


def test_lm_eval_tasks_keep_their_own_few_shot_default_unless_k_shot_is_given(
        lm_class, monkeypatch):
    """--k-shot's default 0 went to lm-eval as num_fewshot=0, which overrides a task's
    own default (gsm8k's 5) with only a log line: every lm-eval task ran 0-shot."""
    from dsv3.eval.runner import EvalOptions, run_evaluation
    text_codec = codec()
    asked = []

    def fake_lm_eval(lm, tasks, num_fewshot=None, limit=None):  # lm-eval needs the hub
        asked.append(num_fewshot)
        return {tasks[0]: {"exact_match,none": 0.5}}
    monkeypatch.setattr(adapter, "run_lm_eval", fake_lm_eval)
    model = UniformModel(text_codec.vocab_size, max_seq_len=32)
    run_evaluation(model, text_codec, ["lm-eval:fake"], EvalOptions(progress=False))
    run_evaluation(model, text_codec, ["lm-eval:fake"], EvalOptions(k_shot=3, progress=False))
    run_evaluation(model, text_codec, ["lm-eval:fake"], EvalOptions(k_shot=0, progress=False))
    assert asked == [None, 3, 0]
