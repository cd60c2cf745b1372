"""Generation metrics: BLEU and chrF (``sacrebleu``, corpus level) of the model's
continuations of sources against references, from any jsonl of
``{"source": ..., "reference": ...}`` rows.

sacrebleu's defaults are kept (BLEU: 13a tokenization, exponential smoothing,
``smooth_method='exp'``; chrF: character 6-grams, beta 2) so numbers compare with
published ones. The decoded text is cut at the first stop string (default a
newline, ``--gen-stop``), where decoding stops, and a reference may not hold it: a small model rarely emits its eos id right after
one answer line. A prompt too long to leave room for ``max_new_tokens`` in the
model's context loses its start (``decoding``), so a long source is still answered
in full; ``truncated_prompts`` counts such prompts, as the multiple-choice results
count theirs.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from dsv3.eval.decoding import generate, stop_at_text
from dsv3.eval.jsonl import read_jsonl_rows, require_str

INSTALL_HINT = ("gen: BLEU and chrF need sacrebleu, an optional package: "
                "pip install 'dsv3[eval]'")


def sacrebleu_module():
    """sacrebleu, imported on first use (it is an optional package); the runner asks
    for it when it reads a gen task's file, so that a missing one is reported before
    the model loads, not after the other tasks ran."""
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return sacrebleu


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """{"bleu", "chrf"} in [0, 100] for parallel lists of strings (one reference each)."""
    sacrebleu = sacrebleu_module()

    if not isinstance(hypotheses, list) or not all(isinstance(h, str) for h in hypotheses):
        raise TypeError("hypotheses must be a list of str")
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise TypeError("references must be a list of str")
    if len(hypotheses) != len(references):
        raise ValueError(f"references: {len(references)} given for {len(hypotheses)} hypotheses; "
                         f"one each expected")
    if not hypotheses:
        raise ValueError("hypotheses must not be empty")
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def read_pairs(path: str, stop: str = "\n") -> list[dict]:
    """The rows of a generation file, each with a str source and one str reference
    (what ``corpus_scores`` takes), checked here so a bad row is named by its line
    before any decoding. A reference holding ``stop`` is refused: every hypothesis is
    cut there, so none could match it (a two-line reference capped BLEU near 67 for a
    model that wrote it exactly)."""
    rows = read_jsonl_rows(path, ("source", "reference"), what="generation file")
    for where, row in rows:
        for field in ("source", "reference"):
            require_str(row, field, where)
        if stop and stop in row["reference"]:
            raise ValueError(f"{where}: the reference holds {stop!r}, where --gen-stop cuts "
                             f"every generation; choose another stop (e.g. --gen-stop "
                             f"'\\n\\n') or --gen-stop '' (stop at end of text or "
                             f"--max-new-tokens)")
    return [row for _, row in rows]


def evaluate_generation(model, codec, pairs: list[dict], max_new_tokens: int = 32,
                        prompt_template: str = "{source}", stop: tuple[str, ...] = ("\n",),
                        temperature: float = 0.0, top_k: int | None = None,
                        top_p: float | None = None, seed: int = 0, progress: bool = False,
                        n_examples: int = 3) -> dict:
    """Decode every source (greedy by default) and score the outputs; the first
    ``n_examples`` (source, hypothesis, reference) come back for the report."""
    if "{source}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{source}}', got {prompt_template!r}")
    hypotheses, references, truncated = [], [], 0
    for i, pair in enumerate(tqdm(pairs, desc="generation", disable=not progress, leave=False)):
        prompt = codec.encode(prompt_template.format(source=pair["source"]))
        if codec.eos_id is not None:
            prompt = [codec.eos_id] + prompt
        out = generate(model, prompt, max_new_tokens, temperature, top_k, top_p,
                       seed=seed + i, eos_id=codec.eos_id,
                       stop=stop_at_text(codec.decode, stop, strip_leading=True))
        truncated += out.prompt_cut > 0
        text = codec.decode(out.tokens).lstrip()
        for s in stop:
            text = text.split(s)[0] if s and s in text else text
        hypotheses.append(text.strip())
        references.append(pair["reference"])
    scores = corpus_scores(hypotheses, references)
    return {**scores, "n": len(pairs), "truncated_prompts": truncated,
            "decoding": "greedy" if temperature == 0 else
            f"sampled(t={temperature}, top_k={top_k}, top_p={top_p}, seed={seed})",
            "examples": [{"source": p["source"], "hypothesis": h, "reference": p["reference"]}
                         for p, h in list(zip(pairs, hypotheses))[:n_examples]]}
