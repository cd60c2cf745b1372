"""Run any lm-evaluation-harness (``lm-eval``) task on a dsv3 model.

``Dsv3LM`` implements lm-eval's ``LM`` interface (``loglikelihood``,
``loglikelihood_rolling``, ``generate_until``) on this package's scoring and decoding:

    lm = Dsv3LM(checkpoint="runs/tiny")                  # or Dsv3LM(model=m, codec=c)
    results = run_lm_eval(lm, ["hellaswag"], num_fewshot=0, limit=100)

or from the command line, ``dsv3 eval --checkpoint runs/tiny --tasks lm-eval:hellaswag``.
Once built, the class is also in lm-eval's model registry as ``"dsv3"``, for code of the
same process that names models there (``simple_evaluate(model="dsv3", ...)``); lm-eval's
own ``lm_eval`` command never imports dsv3 and does not know the name.

lm-eval is optional and is imported only when the adapter is first used; without it
the import fails with the install command. Tasks fetch their data from the HF hub, so
this needs network (or a populated HF cache); dsv3's own tasks do not.

Where it differs from lm-eval's HF model: the context and continuation are tokenized
separately (trailing whitespace of the context moves to the continuation, as lm-eval's
own models do) and rolling log-likelihoods use ``perplexity``'s strided windows.
``batch_size`` takes lm-eval's ``"auto"`` and ``"auto:N"`` as the adapter's default
(``DEFAULT_BATCH_SIZE``) rather than searching for the largest batch that fits: the
model is scored dropless, so the batch size changes the speed, never a score.

``generate_until`` cuts a context too long to leave room for ``max_gen_toks`` from the
left, as lm-eval's own models do (``decoding``), and counts it: the adapter's
``generations`` and ``truncated_prompts`` add up over its calls, and ``dsv3 eval``
reports them beside the task's scores. A request's ``max_gen_toks`` past the model's
``max_seq_len`` gets the adapter's instead, and is counted (``capped_requests``); the
adapter's own past it is an error. Without one, a request gets the adapter's
``max_gen_toks``: by default 256, or half the model's context when that is less, so
that the default leaves a prompt room on a small model.
"""
from __future__ import annotations

from dsv3.eval.decoding import generate, stop_at_text
from dsv3.eval.perplexity import window_plan
from dsv3.eval.scoring import context_limit, score_continuations, score_sequences

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model's default
DEFAULT_BATCH_SIZE = 8  # what "auto" gets (see the module docstring)
INSTALL_HINT = ("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval "
                "(its tasks also need network access to the HF hub, or a populated cache)")


class _Dsv3LMMethods:
    """The lm-eval LM methods; mixed into lm-eval's LM base by ``lm_eval_class``."""

    def __init__(self, model=None, codec=None, checkpoint: str | None = None,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_gen_toks: int | str | None = None,
                 device: str = "cpu"):
        super().__init__()
        if checkpoint is not None:
            from dsv3.eval.loading import load_checkpoint
            model, codec = load_checkpoint(checkpoint, device)
        if model is None or codec is None:
            raise ValueError("Dsv3LM: pass model= and codec=, or checkpoint=")
        self.model, self.codec = model, codec
        self.batch_size = _batch_size(batch_size)
        limit = context_limit(model)
        if max_gen_toks is None:  # see the module docstring
            max_gen_toks = DEFAULT_MAX_GEN_TOKS if limit is None else \
                min(DEFAULT_MAX_GEN_TOKS, max(1, limit // 2))
        self.max_gen_toks = self._checked_max_gen_toks(max_gen_toks, "Dsv3LM: max_gen_toks")
        self.generations = 0  # generate_until's outputs, over all its calls
        self.truncated_prompts = 0  # of which the context cut the prompt's start
        self.capped_requests = 0  # of which asked for more tokens than the context holds

    def _checked_max_gen_toks(self, value, name: str, fits: bool = True) -> int:
        """``value`` as an int (lm-eval passes model arguments as text) that, when
        ``fits``, the model's context can generate."""
        limit = context_limit(self.model)
        wanted = "a whole number >= 0" + ("" if limit is None or not fits else
                                          f" and <= the model's max_seq_len={limit}")
        try:  # an int, or its text; 2.5 or True is no token count
            tokens = int(value) if isinstance(value, str) or type(value) is int else None
        except ValueError:
            tokens = None
        if tokens is None or tokens < 0 or (fits and limit is not None and tokens > limit):
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
        return tokens

    def _request_max_gen_toks(self, value) -> int:
        """A request's own max_gen_toks. A task written for large models may ask for
        more than a small model's context holds: rather than fail the run there, after
        the tasks before it, such a request gets the adapter's max_gen_toks, and is
        counted (``capped_requests``)."""
        tokens = self._checked_max_gen_toks(value, "generate_until: the request's max_gen_toks",
                                            fits=False)
        limit = context_limit(self.model)
        if limit is not None and tokens > limit:
            self.capped_requests += 1
            return self.max_gen_toks
        return tokens

    def _prefix(self) -> list[int]:
        return [self.codec.eos_id] if self.codec.eos_id is not None else []

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = split_pair(*request.args)
            pairs.append((self._prefix() + self.codec.encode(context),
                          self.codec.encode(continuation)))
        scored = score_continuations(self.model, pairs, self.batch_size)
        return [(r.logprobs.sum().item(), bool(r.greedy.all())) for r in scored]

    def loglikelihood_rolling(self, requests) -> list[float]:
        window = context_limit(self.model) or 2048
        sequences, firsts, owners = [], [], []
        for k, request in enumerate(requests):
            ids = self._prefix() + self.codec.encode(request.args[0])
            for begin, first, end in window_plan(len(ids), window, max(1, window // 2)):
                sequences.append(ids[begin:end + 1])
                firsts.append(first - begin)
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, r in zip(owners, score_sequences(self.model, sequences, firsts, self.batch_size)):
            totals[k] += r.logprobs.sum().item()
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = kwargs.get("do_sample", False)
            temperature = float(kwargs.get("temperature", 0.0)) if do_sample else 0.0
            max_gen_toks = self.max_gen_toks
            if kwargs.get("max_gen_toks") is not None:
                max_gen_toks = self._request_max_gen_toks(kwargs["max_gen_toks"])
            out = generate(self.model, self._prefix() + self.codec.encode(context),
                           max_gen_toks, temperature,
                           top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                           seed=int(kwargs.get("seed", 0)), eos_id=self.codec.eos_id,
                           stop=stop_at_text(self.codec.decode, until))
            self.generations += 1
            self.truncated_prompts += out.prompt_cut > 0
            text = self.codec.decode(out.tokens)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def _batch_size(value) -> int:
    """``Dsv3LM``'s batch_size as an int: lm-eval passes model arguments as text, and
    "auto" or "auto:N" for the largest batch that fits (here the default, see the
    module docstring)."""
    if isinstance(value, str) and (value == "auto" or value.startswith("auto:")):
        return DEFAULT_BATCH_SIZE
    try:  # an int, or its text; 2.5 or True is no batch size
        size = int(value) if isinstance(value, str) or type(value) is int else None
    except ValueError:
        size = None
    if size is None or size < 1:
        raise ValueError(f"Dsv3LM: batch_size must be a whole number >= 1, \"auto\" or "
                         f"\"auto:N\", got {value!r}")
    return size


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """(context, continuation) with the context's trailing whitespace moved onto the
    continuation, as lm-eval's ``_encode_pair`` does (``context.rstrip()``: spaces,
    newlines, tabs), so that a request ending in "\n" scores the same text split the
    same way as on lm-eval's own models."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


_CLASS = None


def lm_eval_class():
    """``Dsv3LM``, built on lm-eval's LM base the first time it is asked for."""
    global _CLASS
    if _CLASS is None:
        try:
            from lm_eval.api.model import LM
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        _CLASS = type("Dsv3LM", (_Dsv3LMMethods, LM), {"__module__": __name__,
                                                        "__doc__": _Dsv3LMMethods.__doc__})
        try:  # lets this process's lm-eval calls name it "dsv3"
            from lm_eval.api.registry import register_model
            register_model("dsv3")(_CLASS)
        except (ImportError, ValueError, AssertionError):
            pass  # an older/newer registry, or already registered: the class still works
    return _CLASS


def __getattr__(name):
    if name == "Dsv3LM":
        return lm_eval_class()
    raise AttributeError(name)


def run_lm_eval(lm, tasks: list[str], num_fewshot: int | None = None,
                limit: int | float | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` on a Dsv3LM; returns its "results" section."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot,
                                   limit=limit)["results"]
