"""dsv3.eval safety: the lexicon judge (word boundaries, phrases, comments; entries in
unspaced scripts such as Chinese and Japanese), the toxicity rate of generations from a
model steered to say a listed word, a local classifier against transformers' own
text-classification pipeline (single- and multi-label), the bias gap and per-term
table against hand-computed log-probs, and bad input (repeated terms too)."""
import json
import math

import pytest

from dsv3.eval.safety import (ClassifierScorer, LexiconScorer, bias_gap, evaluate_toxicity,
                              read_bias_spec, toxicity_rate)
from test_eval_support import OracleModel, UniformModel, codec


@pytest.fixture
def lexicon(tmp_path):
    path = tmp_path / "lexicon.txt"
    path.write_text("# test words, not a real list\nzorblax\nmean fox\n\n")
    return str(path)


def test_lexicon_matches_words_and_phrases_only(lexicon):
    scorer = LexiconScorer(lexicon)
    texts = ["a Zorblax here", "zorblaxes are fine", "the mean fox bites", "mean foxes",
             "test words"]
    assert scorer(texts) == [1.0, 0.0, 1.0, 0.0, 0.0]  # inflections and comments do not count
    result = toxicity_rate(texts, scorer)
    assert result["rate"] == pytest.approx(2 / 5)
    assert result["flagged_examples"] == ["a Zorblax here", "the mean fox bites"]


def test_lexicon_entries_in_unspaced_scripts_match_inside_words(tmp_path):
    """Chinese and Japanese put no spaces between words, and their letters are \\w: a
    \\w boundary never held inside such text, so 笨蛋 in 你是笨蛋吗 scored 0. An entry's
    end in a spaced script (Latin) still needs a word boundary on its side."""
    path = tmp_path / "lexicon.txt"
    path.write_text("笨蛋\nバカ\nass\nidiot\n")
    scorer = LexiconScorer(str(path))
    texts = ["你是笨蛋吗", "你是 笨蛋 吗", "お前はバカだ", "a class act", "assume", "an ass.",
             "你是idiot吗", "idiots", "你好"]
    assert scorer(texts) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_toxicity_rate_of_generations(lexicon):
    text_codec = codec()
    eos = text_codec.eos_id
    prompts = ["The quick brown", "a dog ran in"]
    # The oracle continues the first prompt with a listed phrase, the second with clean text.
    says = [[eos] + text_codec.encode(prompts[0]) + text_codec.encode(" mean fox") + [eos],
            [eos] + text_codec.encode(prompts[1]) + text_codec.encode(" the park") + [eos]]
    model = OracleModel(text_codec.vocab_size, says)
    result = evaluate_toxicity(model, text_codec, prompts, LexiconScorer(lexicon),
                               temperature=0.0, max_new_tokens=8)
    assert result["rate"] == 0.5 and result["flagged_examples"] == [" mean fox"]


def test_toxicity_prompts_too_long_for_the_context_lose_their_start_and_are_counted(lexicon):
    """They used to keep the last max_seq_len tokens, get one token to say and go
    uncounted; now they keep W - N + 1 tokens, say all N, and the result counts them."""
    text_codec = codec()
    eos, window, budget = text_codec.eos_id, 32, 8
    prompts = ["the cat sat on the mat " * 10, "a dog ran in"]
    ids = [[eos] + text_codec.encode(p) for p in prompts]
    assert len(ids[0]) > window > len(ids[1])
    says = [ids[0][-(window - budget + 1):] + text_codec.encode(" the mean fox") + [eos],
            ids[1] + text_codec.encode(" the park") + [eos]]
    model = OracleModel(text_codec.vocab_size, says, max_seq_len=window)
    result = evaluate_toxicity(model, text_codec, prompts, LexiconScorer(lexicon),
                               temperature=0.0, max_new_tokens=budget)
    assert result["flagged_examples"] == [" the mean fox"]
    assert result["truncated_prompts"] == 1 and result["n"] == 2


def test_bias_gap_and_per_term_table_hand_computed():
    text_codec = codec()
    vocab, eos = text_codec.vocab_size, text_codec.eos_id
    templates = ["The {term} is kind", "My {term} said hello"]
    terms = ["cat", "dog", "fox"]
    # The model knows both templates' endings for "cat" only: probability ~1 per token there.
    knows = [[eos] + text_codec.encode(t.split("{term}")[0] + "cat") +
             text_codec.encode(t.split("{term}")[1]) for t in templates]
    result = bias_gap(OracleModel(vocab, knows), text_codec, templates, terms)
    sure = 20 - math.log(math.exp(20) + vocab - 1)  # log-prob of a token given logit 20
    assert result["per_term"]["cat"] == pytest.approx(sure, abs=1e-6)
    assert result["per_term"]["dog"] == pytest.approx(-math.log(vocab), abs=1e-6)
    assert result["gap"] == pytest.approx(sure + math.log(vocab), abs=1e-6)
    assert (result["max_term"], result["min_term"]) in {("cat", "dog"), ("cat", "fox")}
    uniform = bias_gap(UniformModel(vocab), text_codec, templates, terms)
    assert uniform["gap"] == pytest.approx(0.0, abs=1e-9)


def test_bias_spec_file_and_bad_input(tmp_path):
    path = tmp_path / "bias.json"
    path.write_text(json.dumps({"templates": ["The {term} works"], "terms": ["a", "b"]}))
    assert read_bias_spec(str(path)) == (["The {term} works"], ["a", "b"])
    text_codec = codec()
    model = UniformModel(text_codec.vocab_size)
    with pytest.raises(ValueError, match=r"templates\[0\] must be a str holding '\{term\}'"):
        bias_gap(model, text_codec, ["no placeholder"], ["a", "b"])
    with pytest.raises(ValueError, match=r"templates\[0\] needs text after"):
        bias_gap(model, text_codec, ["Ends with {term}"], ["a", "b"])
    with pytest.raises(ValueError, match="terms must be a list of at least 2"):
        bias_gap(model, text_codec, ["The {term} works"], ["a"])
    # A repeated term got one row of the table, its last scores overwriting the others.
    with pytest.raises(ValueError, match=r"terms must differ, got 'cat' more than once"):
        bias_gap(model, text_codec, ["The {term} works"], ["cat", "dog", "cat"])
    path.write_text(json.dumps({"templates": ["The {term} works"], "terms": ["a", "b", "a"]}))
    with pytest.raises(ValueError, match=r"bias spec: .*bias\.json: terms must differ"):
        read_bias_spec(str(path))


def test_missing_judges_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lexicon: no file"):
        LexiconScorer(str(tmp_path / "none.txt"))
    with pytest.raises(FileNotFoundError, match="classifier: no directory"):
        ClassifierScorer(str(tmp_path / "no_model"))
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no entries"):
        LexiconScorer(str(tmp_path / "empty.txt"))


def test_local_classifier_scores_its_toxic_label(tmp_path):
    """A tiny BERT whose classifier ignores the text (zero weights) and has bias
    (clean 0, toxic 5): every text is toxic with probability e^5 / (1 + e^5)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    from test_eval_support import train_tokenizer
    config = BertConfig(vocab_size=300, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=64,
                        id2label={0: "clean", 1: "toxic"}, label2id={"clean": 0, "toxic": 1})
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    model.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(),
                            pad_token="<|endoftext|>").save_pretrained(tmp_path)
    scorer = ClassifierScorer(str(tmp_path))
    want = math.exp(5) / (1 + math.exp(5))
    assert scorer(["a dog ran", "the cat"]) == pytest.approx([want, want], abs=1e-5)
    assert toxicity_rate(["a dog ran", "the cat"], scorer, threshold=0.99)["rate"] == 1.0
    with pytest.raises(ValueError, match=r"toxic_labels: none of \['hateful'\]"):
        ClassifierScorer(str(tmp_path), toxic_labels=("hateful",))


def _tiny_classifier(directory, labels: list[str], bias: list[float], **config) -> None:
    """A seeded random tiny BERT classifier with ``labels`` saved in ``directory``, with
    a tokenizer; ``bias`` moves its labels apart so a wrong activation shows."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    from test_eval_support import train_tokenizer
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=300, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=64,
                      id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)}, **config)
    model = BertForSequenceClassification(bert)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0)  # so the texts score apart
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(),
                            pad_token="<|endoftext|>").save_pretrained(directory)


@pytest.mark.parametrize("labels, bias, config, toxic", [
    # exclusive labels: a softmax across them, toxic ones summed
    (["clean", "toxic", "insult"], [0.5, 1.0, -1.0], {}, ("toxic",)),
    (["clean", "toxic", "insult"], [0.5, 1.0, -1.0], {}, ("toxic", "insult")),
    # labels that hold together (unitary/toxic-bert's kind): a sigmoid per label, the
    # most toxic one counting (a softmax across them scored far below the pipeline)
    (["toxic", "insult", "obscene"], [1.0, -0.5, 2.0],
     {"problem_type": "multi_label_classification"}, ("toxic",)),
    (["toxic", "insult", "obscene"], [1.0, -0.5, 2.0],
     {"problem_type": "multi_label_classification"}, ("toxic", "insult")),
    # a single logit: a sigmoid too (a softmax over one label is always 1.0)
    (["toxic"], [-1.0], {}, ("toxic",)),
])
def test_classifier_scores_as_the_transformers_pipeline_does(tmp_path, labels, bias, config,
                                                             toxic):
    from transformers import pipeline
    _tiny_classifier(tmp_path, labels, bias, **config)
    texts = ["a dog ran in the park", "the cat", "The quick brown fox jumps over the lazy dog."]
    reference = pipeline("text-classification", model=str(tmp_path), top_k=None)(texts)
    per_label = [{entry["label"]: entry["score"] for entry in scores} for scores in reference]
    combine = max if config.get("problem_type") or len(labels) == 1 else sum
    want = [combine(scores[name] for name in toxic) for scores in per_label]
    got = ClassifierScorer(str(tmp_path), toxic_labels=toxic)(texts)
    assert got == pytest.approx(want, abs=1e-5)
    assert max(want) - min(want) > 1e-3  # the texts score apart: each is checked as its own


def test_regression_classifier_is_refused(tmp_path):
    _tiny_classifier(tmp_path, ["toxic"], [0.0], problem_type="regression")
    with pytest.raises(ValueError, match="classifier: .* is a regression model"):
        ClassifierScorer(str(tmp_path), toxic_labels=("toxic",))


def test_bias_gap_with_a_scorer_judges_generated_continuations(lexicon):
    text_codec = codec()
    eos = text_codec.eos_id
    # After "The cat said" the oracle says a listed word; after "The dog said", clean text.
    says = [[eos] + text_codec.encode("The cat said") + text_codec.encode(" zorblax") + [eos],
            [eos] + text_codec.encode("The dog said") + text_codec.encode(" hello") + [eos]]
    result = bias_gap(OracleModel(text_codec.vocab_size, says), text_codec, ["The {term} said"],
                      ["cat", "dog"], scorer=LexiconScorer(lexicon), temperature=0.0,
                      max_new_tokens=12)
    assert result["per_term"] == {"cat": 1.0, "dog": 0.0} and result["gap"] == 1.0
    assert (result["generations"], result["truncated_prompts"]) == (2, 0)
