"""dsv3.eval on a model passed in directly (not through ``load_checkpoint``): an MoE
built with a capacity factor is evaluated dropless, so its scores do not depend on the
batch size, and it comes back with its factor (and its train mode), even when a task
fails halfway."""
import dataclasses

import pytest
import torch

from dsv3.eval import perplexity
from dsv3.eval.runner import EvalOptions, run_evaluation
from dsv3.eval.scoring import evaluating
from dsv3.model import Transformer
from dsv3.moe import MoE
from test_eval_support import codec, tiny_config

DOCS = [("a", "the cat sat on the mat " * 3), ("b", "def add(a, b): return a + b"),
        ("a", "a dog ran in the park and the quick brown fox jumps " * 2)]
FACTOR = 0.5


def capacity_model() -> Transformer:
    config = tiny_config()
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe,
                                                                 capacity_factor=FACTOR))
    torch.manual_seed(0)
    return Transformer(config).eval()


def factors(model) -> list:
    return [m.config.capacity_factor for m in model.modules() if isinstance(m, MoE)]


def test_the_capacity_would_make_a_sequence_depend_on_its_batch():
    """The premise of the tests below: with the factor on, the other sequence of a batch
    changes the first one's logits."""
    model = capacity_model()
    tokens_BS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone_SV, together_SV = model(tokens_BS[:1])[0], model(tokens_BS)[0]
    assert not torch.allclose(alone_SV, together_SV, atol=1e-4)


def test_a_model_passed_directly_is_scored_dropless_and_keeps_its_factor():
    """It used to run with its factor: the perplexity changed with --batch-size."""
    model, text_codec = capacity_model(), codec()
    results = {b: run_evaluation(model, text_codec, ["ppl"],
                                 EvalOptions(documents=DOCS, batch_size=b, progress=False))
               for b in (1, 8)}
    one, eight = (results[b]["tasks"]["ppl"]["all"]["perplexity"] for b in (1, 8))
    assert one == pytest.approx(eight, rel=1e-5)
    assert factors(model) == [FACTOR] and model.config.moe.capacity_factor == FACTOR
    assert results[8]["moe"] == {"evaluated": "dropless", "trained_capacity_factor": FACTOR}


def test_the_factor_and_train_mode_come_back_when_a_task_fails(monkeypatch):
    model, text_codec = capacity_model(), codec()
    model.train()
    seen = []

    def failing(model, *args, **kwargs):
        seen.append((factors(model), model.training))
        raise RuntimeError("the task failed")
    monkeypatch.setattr(perplexity, "domain_perplexity", failing)
    with pytest.raises(RuntimeError, match="the task failed"):
        run_evaluation(model, text_codec, ["ppl"], EvalOptions(documents=DOCS, progress=False))
    assert seen == [([None], False)]
    assert factors(model) == [FACTOR] and model.training


def test_evaluating_nests_and_leaves_a_dropless_model_alone():
    model = capacity_model()
    layer = next(m for m in model.modules() if isinstance(m, MoE))
    with evaluating(model):
        inner_config = layer.config
        with evaluating(model):
            assert layer.config is inner_config  # already dropless: nothing swapped again
        assert layer.config.capacity_factor is None
    assert layer.config is model.config.moe  # the very object it had, not a copy
