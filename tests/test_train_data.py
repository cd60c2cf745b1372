"""What `dsv3 train` checks of its data before training: a resume must be on the data
its checkpoint was trained on (the tokenizer, the tokens, mixture.json, the held-out
share; not its location), every stage's mixture must name the data's domains, and
the held-out share is a setting (val_fraction). Also what a restart (--no-resume)
removes, and the order of a refused resume's messages."""
import json
import shutil

import numpy as np
import pytest
import torch

from dsv3.cli import main
from dsv3.data.tokenizer import TokenizedCorpus
from dsv3.train import checkpoint as ckpt
from dsv3.train.config import StageConfig, TrainConfig, load_config
from dsv3.train.data import TrainData
from dsv3.train.trainer import Trainer
from train_support import command_run, saved_partway, synthetic_corpus, three_stage_config


def refusal(command, capsys) -> str:
    assert main(command) == 2
    return capsys.readouterr().err


# --- a resume on other data ---------------------------------------------------------------

def test_a_resume_on_reprepared_data_is_refused_saying_what_changed(tmp_path, capsys):
    """Before: `dsv3 data prepare` again into the same directory, then `dsv3 train`,
    resumed on the new token ids (and exported the new tokenizer with the model)."""
    command = saved_partway(tmp_path)
    data = tmp_path / "data"
    original = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    state = ckpt.checkpoint_path(tmp_path / "out").read_bytes()

    synthetic_corpus(seed=1).save(data / "tokens")  # other documents, same vocabulary
    err = refusal(command, capsys)
    assert "was trained on other data than the data in " in err
    assert "changed since: the token data (tokens/" in err and "--no-resume" in err

    for path, content in original.items():
        path.write_bytes(content)
    (data / "tokenizer.json").write_text("{}")  # a tokenizer where there was none
    assert "changed since: the tokenizer (tokenizer.json)" in refusal(command, capsys)

    (data / "tokenizer.json").unlink()
    (data / "mixture.json").write_text(json.dumps({"weights": {"alpha": 0.2, "beta": 0.8}}))
    assert "mixture.json's weights, seed or max_chunk_tokens" in refusal(command, capsys)
    assert ckpt.checkpoint_path(tmp_path / "out").read_bytes() == state  # nothing trained


def test_a_moved_data_dir_still_resumes(tmp_path, capsys):
    command = saved_partway(tmp_path)
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    shutil.rmtree(tmp_path / "data")
    assert main(command + ["--data", str(tmp_path / "moved")]) == 0
    assert "checkpoint at step 3: resuming there" in capsys.readouterr().err


def _other_vocabulary() -> TrainData:
    corpus = synthetic_corpus()
    return TrainData.from_corpus(TokenizedCorpus(corpus.tokens, corpus.offsets, corpus.eos_id,
                                                 corpus.vocab_size + 16), val_fraction=0.1)


def test_data_of_another_vocabulary_is_refused_not_a_size_mismatch(tmp_path):
    """Before: RuntimeError: size mismatch for embed.weight, from load_state_dict. A
    checkpoint from before fingerprints is refused by its vocabulary's size."""
    config = three_stage_config(tmp_path)
    first = Trainer(config, TrainData.from_corpus(synthetic_corpus(), val_fraction=0.1))
    first.train_step()
    first.save()
    with pytest.raises(ValueError, match=r"trained on other data .*changed since: the token "
                                         r"data .*--no-resume"):
        Trainer(config, _other_vocabulary()).train(progress=False)
    path = ckpt.checkpoint_path(tmp_path)
    state = torch.load(path, weights_only=False)
    del state["data"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"a vocabulary of 64 tokens, the data has 80 "
                                         r"\(another tokenizer\): pass --no-resume"):
        Trainer(config, _other_vocabulary()).train(progress=False)


def test_a_checkpoint_from_before_fingerprints_resumes(tmp_path, capsys):
    command = saved_partway(tmp_path)
    path = ckpt.checkpoint_path(tmp_path / "out")
    state = torch.load(path, weights_only=False)
    del state["data"]
    torch.save(state, path)
    assert ckpt.saved_run(tmp_path / "out")["data"] is None
    assert main(command) == 0
    assert "saved before checkpoints recorded their data" in capsys.readouterr().err


# --- stage mixtures -----------------------------------------------------------------------

def test_a_typo_in_a_later_stages_mixture_is_refused_before_any_training(tmp_path, capsys):
    """Before: the base stage trained, then `stage 'domain': mixture names unknown
    domains` when the curriculum stage started."""
    typo = ["--set", 'stages.1.mixture_end={"alpha": 0.5, "betta": 0.5}']
    err = refusal(command_run(tmp_path) + typo, capsys)
    assert "stage 'domain': mixture names unknown domains ['betta']; the data has " \
           "['alpha', 'beta']" in err
    assert not (tmp_path / "out").exists()  # nothing written
    stages = [StageConfig("base", seq_len=24, fraction=0.5),
              StageConfig("later", seq_len=24, fraction=0.5, mixture_start={"gamma": 1.0})]
    with pytest.raises(ValueError, match=r"stage 'later': mixture names unknown domains"):
        Trainer(three_stage_config(tmp_path / "api", stages=stages),
                TrainData.from_corpus(synthetic_corpus(), val_fraction=0.1))


# --- val_fraction ---------------------------------------------------------------------------

def test_val_fraction_is_a_setting_checked_and_part_of_the_resume(tmp_path, capsys):
    """Before: hard-coded 0.05, while the error for a one-document domain said "lower
    val_fraction"."""
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1"):
        load_config(None, ["val_fraction=1"])
    one_doc = TokenizedCorpus({"alpha": np.array([5, 6, 0], dtype=np.uint32)},
                              {"alpha": np.array([0, 3])}, eos_id=0, vocab_size=8)
    with pytest.raises(ValueError, match=r"domain 'alpha' has 1 document\(s\): too few to hold "
                                         r"1 out .*val_fraction=0.05; 0 holds none out"):
        TrainData.from_corpus(one_doc, val_fraction=0.05)
    assert TrainData.from_corpus(one_doc, val_fraction=0).val["alpha"].numel() == 0

    command = saved_partway(tmp_path)
    err = refusal(command + ["--set", "val_fraction=0.2"], capsys)
    assert "val_fraction (which documents are held out): 0.05 -> 0.2" in err
    assert main(command + ["--no-resume", "--set", "val_fraction=0.2"]) == 0
    saved = ckpt.saved_run(tmp_path / "out")  # recorded, and what the split used
    assert saved["config"]["val_fraction"] == saved["data"]["val_fraction"] == 0.2
    val = TrainData.load(tmp_path / "data", 0.2).val["alpha"]
    assert int((val == 0).sum()) == 6  # 20% of the domain's 30 documents (each ends in EOS)


# --- starting over -------------------------------------------------------------------------

def test_starting_over_removes_the_old_runs_report_and_metrics(tmp_path, capsys, monkeypatch):
    """Before: --no-resume removed eval/ but left the old run's report.html and
    summary.json beside the new run's metrics. Files dsv3 did not write stay."""
    command = command_run(tmp_path)
    assert main(command) == 0
    out = tmp_path / "out"
    (out / "notes.txt").write_text("mine")
    (out / "tb" / "mine.txt").write_text("mine")
    real = Trainer.train_step

    def crash_at_step_3(self, measure=False):
        if self.step == 3:
            raise RuntimeError("crashed at step 3")
        return real(self, measure)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="crashed at step 3"):
        main(command + ["--no-resume"])
    assert not (out / "report.html").exists() and not (out / "summary.json").exists()
    assert not (out / "checkpoint").exists() and not (out / "final").exists()
    assert (out / "metrics.jsonl").read_text() == ""  # the new run's: none logged yet
    assert (out / "notes.txt").is_file() and (out / "tb" / "mine.txt").is_file()
    old_events = [p for p in (out / "tb").glob("events.out.tfevents.*")]
    assert len(old_events) == 1  # the new run's alone


# --- smaller ------------------------------------------------------------------------------

def test_a_resume_under_another_model_is_refused_before_saying_it_resumes(tmp_path, capsys):
    """Before: "resuming there ... settings changed (from here on): model", then an error."""
    command = saved_partway(tmp_path)
    err = refusal(command + ["--set", "model=small"], capsys)
    assert "resuming" not in err and err.count("\n") == 1
    assert "holds a checkpoint of a run with other settings (model: 'tiny' -> 'small')" in err


def test_the_default_data_dir_is_where_data_prepare_writes():
    from dsv3.data.config import validate_config
    assert TrainConfig().data_dir == validate_config({})["output"]["dir"] == "out/data"
    assert load_config("demo").data_dir == "out/data"


# --- the fingerprint's cost -----------------------------------------------------------------

def test_the_token_digest_is_todays_and_copies_no_offsets():
    """The offsets are hashed where they lie: before, ``tobytes()`` copied them whole in
    every rank (8 GB at a billion documents). The digest is the one checkpoints saved
    before hold, so they still resume."""
    import tracemalloc

    from dsv3.train.data import _tokens_digest
    assert _tokens_digest(synthetic_corpus()) == "b28338b56146ffb7e6b710dc61bd0588"
    n_docs = 1_000_000  # 8 MB of offsets
    corpus = TokenizedCorpus({"a": np.zeros(4 * n_docs, dtype=np.uint16)},
                             {"a": np.arange(0, 4 * (n_docs + 1), 4, dtype=np.int64)},
                             eos_id=0, vocab_size=100)
    tracemalloc.start()
    try:
        _tokens_digest(corpus)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB allocated"


def _numbered_documents(n_docs: int = 200) -> TrainData:
    """One domain of ``n_docs`` 20-token documents, document i made of token i + 1."""
    from dsv3.data.tokenizer import TokenizedCorpus
    tokens = {"web": np.concatenate([np.array([i + 1] * 19 + [0], dtype=np.uint32)
                                     for i in range(n_docs)])}
    offsets = {"web": np.arange(0, 20 * (n_docs + 1), 20, dtype=np.int64)}
    return TrainData.from_corpus(TokenizedCorpus(tokens, offsets, 0, 300), {"web": 1.0},
                                 val_fraction=0.0)


def _documents_read(loader, n_batches: int) -> list[int]:
    read = []
    for k, batch in enumerate(loader):
        read += [t - 1 for t in batch["input_ids"].flatten().tolist() if t != 0]
        if k == n_batches - 1:
            return sorted(set(read))


def test_a_stage_reads_on_where_the_last_one_stopped():
    """Each stage's loader started again at the first document: stage 2 read stage 1's
    documents in the same order, and the rest of the corpus was never read."""
    from dsv3.train.config import StageConfig
    data = _numbered_documents()
    first = data.stage_loader(StageConfig("pretrain", seq_len=63), n_batches=10, batch_size=2)
    read_first = _documents_read(first, 10)
    second = data.stage_loader(StageConfig("anneal", seq_len=63), n_batches=10, batch_size=2,
                               span=(0.5, 1.0), after=first)
    read_second = _documents_read(second, 10)
    assert len(read_first) >= 60 and len(read_second) >= 60
    assert len(set(read_first) & set(read_second)) <= 1  # the document cut between them


def test_data_parallel_ranks_read_their_own_documents():
    """Rank r reshuffled the whole corpus (seed + 7919 r): ranks read the same documents
    and left others unread within an epoch."""
    from dsv3.train.config import StageConfig
    data = _numbered_documents()
    # 15 batches of 2 x 64 tokens: 96 of each rank's 100 documents, within one epoch
    read = [_documents_read(data.stage_loader(StageConfig("pretrain", seq_len=63), 15, 2,
                                              rank=rank, world=2), 15) for rank in (0, 1)]
    assert not set(read[0]) & set(read[1])
    assert len(set(read[0]) | set(read[1])) >= 190


def test_the_trainer_opens_a_stage_after_the_last_stages_loader(tmp_path, monkeypatch):
    """The trainer's part of reading on: each LM stage's loader is opened after the
    previous LM stage's (across the DPO stage, which reads no loader), a restored one
    from its own saved position."""
    from dsv3.train.config import StageConfig
    from dsv3.train.trainer import Trainer
    from train_support import synthetic_data, three_stage_config
    stages = [StageConfig("base", "lm", 0.4, seq_len=24),
              StageConfig("preference", "dpo", 0.2, seq_len=16),
              StageConfig("anneal", "lm", 0.4, seq_len=24)]
    trainer = Trainer(three_stage_config(tmp_path, steps=10, stages=stages), synthetic_data())
    opened = []
    stage_loader = trainer.data.stage_loader

    def recording(stage, *args, **kwargs):
        loader = stage_loader(stage, *args, **kwargs)
        opened.append((stage.name, args[-1], loader))  # args[-1]: after
        return loader
    monkeypatch.setattr(trainer.data, "stage_loader", recording)
    for _ in range(10):
        trainer.train_step()
    assert [(name, after is None) for name, after, _ in opened] == [("base", True),
                                                                   ("anneal", False)]
    assert opened[1][1] is opened[0][2]
