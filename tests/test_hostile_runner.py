"""Threat: the runner's records (issue "Nothing silent, round two", item 12): resume after the config changed,
two processes appending to one results file, tasks whose streams end early or whose splits are empty."""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import dataclass

import pytest

from experiments.ablate import main
from lowrank_ablation import register_task
from lowrank_ablation.run import append_record, read_records
from lowrank_ablation.tasks import TASKS
from lowrank_ablation.tasks.synthetic_lowrank import SyntheticLowRank
from tests.test_ablation import write


def test_resume_after_a_config_change_reruns_exactly_the_changed_arms(tmp_path, capsys):
    cfg_path, results = write(tmp_path)
    assert main([str(cfg_path), "--no-progress"]) == 0
    first = {(r["arm"], r["seed"]): r["key"] for r in read_records(results)}
    assert len(first) == 6
    # one arm's init options change: only its runs are new; the others are reused (same keys, not rerun)
    text = cfg_path.read_text().replace("init_options = { progress = false }",
                                        'init_options = { progress = false, direction = "A2rBr" }')
    cfg_path.write_text(text)
    assert main([str(cfg_path), "--no-progress"]) == 0
    assert "6 finished runs" in capsys.readouterr().err
    after = read_records(results)
    assert len(after) == 8
    new = [r for r in after if r["key"] not in first.values()]
    assert sorted((r["arm"], r["seed"]) for r in new) == [("LoRA-GA", 0), ("LoRA-GA", 1)]
    # what determines training for every arm (the steps) changes: every run is new
    cfg_path.write_text(text.replace("steps = 8", "steps = 9"))
    assert main([str(cfg_path), "--no-progress"]) == 0
    assert len(read_records(results)) == 14
    # what does not (the sweep's name, the reference, a comment) keeps every key
    cfg_path.write_text(text.replace('name = "t"', 'name = "t2"').replace("[sweep]", "# edited\n[sweep]"))
    assert main([str(cfg_path), "--no-progress"]) == 0
    assert len(read_records(results)) == 14


def _appender(path: str, tag: int, n: int) -> None:
    payload = "x" * 20_000  # records larger than a pipe buffer or a page: interleaving would tear them
    for i in range(n):
        append_record(path, {"key": f"{tag}-{i}", "arm": f"arm{tag}", "rank": 2, "lr": 0.1, "seed": i, "status": "ok",
                             "loss_curve": [1.0], "val": {"loss": 1.0}, "test": {"loss": 1.0}, "pad": payload})


def test_two_processes_appending_to_one_results_file_never_tear_a_line(tmp_path):
    path = tmp_path / "r.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_appender, args=(str(path), tag, 40)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = path.read_bytes().splitlines()
    assert len(lines) == 80 and all(json.loads(line)["pad"] == "x" * 20_000 for line in lines)
    assert sorted(r["key"] for r in read_records(path)) == sorted(f"{t}-{i}" for t in (1, 2) for i in range(40))


@dataclass(frozen=True)
class _Opts(SyntheticLowRank.Options):
    flaw: str = "finite"


class _Flawed(SyntheticLowRank):
    """The synthetic task with one flaw: a training stream that ends, or an empty split."""

    Options = _Opts

    def build(self, seed, batch_size):
        built = super().build(seed, batch_size)
        if self.options.flaw == "finite":
            built.train = iter([next(built.train) for _ in range(3)])
        elif self.options.flaw == "no-val":
            built.val_batches = []
        elif self.options.flaw == "no-init":
            built.init_batches = []
        return built


@pytest.mark.parametrize("flaw,message", [
    ("finite", "training stream ended after 3 of 8 steps; Task.build must return a stream without end"),
    ("no-val", "val_batches is empty"),
    ("no-init", "init_batches is empty but arm 'LoRA-GA' uses the data-driven initializer 'lora_ga'"),
])
def test_a_task_with_an_ending_stream_or_an_empty_split_is_an_error_not_a_short_run(tmp_path, capsys, flaw,
                                                                                     message):
    register_task("flawed-synthetic", _Flawed)
    try:
        arms = '[[arm]]\nname = "LoRA"\n[[arm]]\nname = "LoRA-GA"\ninit = "lora_ga"\nscaling = "rslora"\n' \
               'init_options = {{ progress = false }}\n'
        cfg_path, results = write(tmp_path, arms=arms, **{'task = "synthetic-lowrank"': 'task = "flawed-synthetic"',
                                                          "[task]": f'[task]\nflaw = "{flaw}"'})
        if flaw == "finite":  # known only once the stream ends: the run fails instead of recording a short run
            with pytest.raises(RuntimeError, match=message):
                main([str(cfg_path), "--no-progress"])
        else:  # checked on the built task before any training
            assert main([str(cfg_path), "--no-progress"]) == 2
            assert message in capsys.readouterr().err
        assert not read_records(results)  # nothing recorded as if it had run
    finally:
        TASKS.unregister("flawed-synthetic")


def test_lowrank_data_that_is_empty_ragged_or_holds_an_empty_batch():
    import torch

    import lowrank
    from tests.conftest import Snapshot, batches, tiny_bert

    cfg = lowrank.LoRAConfig(rank=2, targets=["query"], init="lora_ga", scaling="rslora",
                             init_options={"progress": False})
    for data in ([], iter([])):
        with pytest.raises(ValueError, match="data gave no batches"):
            lowrank.inject(tiny_bert(), cfg, data=data, progress=False)
    empty = {"input_ids": torch.zeros(0, 9, dtype=torch.long), "attention_mask": torch.zeros(0, 9, dtype=torch.long),
             "labels": torch.zeros(0, dtype=torch.long)}
    model = tiny_bert()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="batch 1 of data is empty"):
        lowrank.inject(model, cfg, data=[batches("bert", 1)[0], empty], progress=False)
    snap.assert_unchanged()
    ragged = [batches("bert", 1)[0], batches("bert", 1, bsz=2)[0]]  # 4 then 2 examples: fine, a mean of batches
    lowrank.inject(model, cfg, data=ragged, progress=False)
