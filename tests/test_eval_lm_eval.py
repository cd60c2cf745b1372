"""dsv3.eval lm-eval adapter, against lm-eval's documented LM interface: the real
``lm_eval`` when installed, else a minimal stand-in with the same abstract base and
``Instance.args`` (the adapter must then implement every abstract method, or the
class cannot be instantiated). Without lm-eval, a clear ImportError."""
import abc
import math
import sys
import types

import pytest

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
    (out,) = lm.generate_until([request("generate_until", "import os",
                                        {"until": [")\n"], "max_gen_toks": 30})])
    assert out == "\nprint(os.getcwd()"


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
