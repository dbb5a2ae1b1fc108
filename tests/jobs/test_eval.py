"""Evaluation jobs: task files and their errors, the three kinds on a checkpoint trained for them
(which must beat the base model), and lm-eval against `moeray serve` agreeing with `moeray eval`."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeray.model
from moeray.jobs.data import DataError
from moeray.jobs.eval.runner import run_eval
from moeray.jobs.eval.spec import EvalJobSpec, TaskSpec
from moeray.jobs.eval.tasks import extract, load_items, pass_at_k
from moeray.jobs.methods import method_for
from moeray.jobs.spec import JobSpecError, parse_spec
from moeray.model import save_checkpoint
from moeray.model.tokenizer import Tokenizer
from moeray.platform.default_model import DEFAULT_MODEL_DIR
from support import method_loss, write_jsonl

REPO = Path(__file__).parents[2]
EXAMPLE = REPO / "examples" / "eval" / "default-model.yaml"


def example_spec(**changes) -> EvalJobSpec:
    """The example eval spec with its task files found from here; `endpoint` replaces its model."""
    data = EvalJobSpec.from_yaml(EXAMPLE).model_dump(exclude_none=True)
    data["tasks"] = [{**task, "file": str(REPO / task["file"])} for task in data["tasks"]]
    data.pop("output", None)
    if "endpoint" in changes:
        data.pop("model")
    data.update(changes)
    return EvalJobSpec.model_validate(data)


def metrics(report) -> dict[str, float]:
    return {f"{task['name']}/{name}": value for task in report["tasks"] for name, value in task["metrics"].items()
            if not name.endswith("_stderr")}


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0 and pass_at_k(10, 10, 5) == 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)


def test_extractors():
    assert extract(" 12 apples\nmore", "first_number") == "12" and extract("no", "first_number") is None
    assert extract("  yes \n no", "first_line") == "yes" and extract("a #### 7", "last_number") == "7"


@pytest.mark.parametrize("row, kind, problem", [
    ({"question": "1 + 1"}, "exact_match", r"items\.jsonl:2: missing 'answer'"),
    ({"answer": "2"}, "exact_match", r"items\.jsonl:2: missing 'question'"),
    ({"prompt": "p", "choices": ["a"], "answer": 0}, "multiple_choice", r"items\.jsonl:2: choices must be a list of at"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "multiple_choice", r"answer must be the index"),
    ({"prompt": "p", "tests": [1]}, "pass_at_k", r"items\.jsonl:2: tests must be"),
])
def test_a_bad_item_is_named_with_its_file_and_line(tmp_path, row, kind, problem):
    good = {"exact_match": {"question": "1 + 1", "answer": "2"}, "pass_at_k": {"prompt": "p", "tests": ["assert 1"]},
            "multiple_choice": {"prompt": "p", "choices": ["a", "b"], "answer": 0}}[kind]
    write_jsonl(tmp_path / "items.jsonl", [good, row])
    template = "{question}" if kind == "exact_match" else "{prompt}"
    with pytest.raises(DataError, match=problem):
        load_items(TaskSpec(file=str(tmp_path / "items.jsonl"), kind=kind, prompt_template=template))


def test_an_eval_spec_names_what_is_wrong(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("name: x\nmodel: m\nendpoint: {url: http://h/v1, model: m}\ntasks:\n  - {file: f, kind: exact_match}\n")
    with pytest.raises(JobSpecError, match="set exactly one of model and endpoint"):
        EvalJobSpec.from_yaml(path)
    path.write_text("name: x\nmodel: m\ntasks:\n  - file: f\n    kind: pass_at_k\n    k: [5]\n")
    with pytest.raises(JobSpecError, match=r"eval\.yaml:4: setting 'tasks\.0': .*every k must be at most samples"):
        EvalJobSpec.from_yaml(path)
    path.write_text("name: x\nmodel: m\ntasks:\n  - file: f\n    kind: rouge\n")
    with pytest.raises(JobSpecError, match=r"eval\.yaml:5: setting 'tasks\.0\.kind'"):
        EvalJobSpec.from_yaml(path)


def task_rows() -> list[dict]:
    """The example tasks as standard prompt/completion rows: what the model is trained to answer."""
    rows = []
    for line in (REPO / "examples/eval/arithmetic.jsonl").open():
        item = json.loads(line)
        rows.append({"prompt": f"Q: {item['question']} =\nA:", "completion": f" {item['answer']}"})
    for line in (REPO / "examples/eval/functions.jsonl").open():
        item = json.loads(line)
        rows.append({"prompt": item["prompt"], "completion": item["canonical_solution"]})
    for line in (REPO / "examples/eval/python-facts.jsonl").open():
        item = json.loads(line)
        rows.append({"prompt": item["prompt"], "completion": " " + item["choices"][item["answer"]]})
    return rows


@pytest.fixture(scope="module")
def trained_on_tasks(tmp_path_factory):
    """The default model fine-tuned on the example tasks' answers: a known checkpoint for the
    evaluations to tell apart from the base. Trained in this process with the SFT method's own
    encoding and loss (the trainer's Ray Train path has tests of its own)."""
    folder = tmp_path_factory.mktemp("eval-sft")
    spec = parse_spec({"name": "eval-sft", "base_model": str(DEFAULT_MODEL_DIR), "method": "sft",
                       "output": str(folder / "out"), "data": {"train": "unused.jsonl"},
                       "train": {"max_length": 96}, "checkpoint": {"storage": str(folder / "ckpt")}})
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    rows = method_for(spec).encode(task_rows(), tokenizer, True)
    model = moeray.model.load(DEFAULT_MODEL_DIR).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    shuffle, steps = random.Random(0), 0
    while steps < 400:  # about 40 epochs of 10 batches of 8
        order = list(range(len(rows)))
        shuffle.shuffle(order)
        for start in range(0, len(order) - 7, 8):
            loss, _ = method_loss(model, spec, [rows[i] for i in order[start:start + 8]])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    out = folder / "model"
    save_checkpoint(model.eval(), out, model.args)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, out / name)
    return out


@pytest.mark.slow
def test_each_kind_scores_the_trained_model_above_the_base(trained_on_tasks, tmp_path):
    base = metrics(run_eval(example_spec(model=str(DEFAULT_MODEL_DIR))))
    report = run_eval(example_spec(model=str(trained_on_tasks), output=str(tmp_path / "report.json")))
    trained = metrics(report)
    for name in ("arithmetic/exact_match", "functions/pass@1", "functions/pass@4", "python-facts/acc"):
        assert trained[name] > base[name] + 0.2, (name, base[name], trained[name])
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["tasks"][0]["items"][0]["completion"] is not None and len(written["tasks"][2]["items"]) == 30


LM_EVAL_TASKS = """\
task: moeray_arithmetic
dataset_path: json
dataset_kwargs:
  data_files: {{test: {arithmetic}}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}} =\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false, temperature: 0}}
filter_list:
  - name: first_number
    filter:
      - {{function: regex, regex_pattern: "(-?\\\\d+(?:\\\\.\\\\d+)?)"}}
      - {{function: take_first}}
metric_list:
  - {{metric: exact_match}}
"""

LM_EVAL_CHOICE_TASK = """\
task: moeray_python_facts
dataset_path: json
dataset_kwargs:
  data_files: {{test: {facts}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - {{metric: acc}}
"""


@pytest.mark.slow
def test_lm_eval_against_moeray_serve_reports_what_moeray_eval_does(trained_on_tasks, deployed, tmp_path):
    tasks = tmp_path / "lm_eval_tasks"
    tasks.mkdir()
    (tasks / "moeray_arithmetic.yaml").write_text(LM_EVAL_TASKS.format(arithmetic=REPO / "examples/eval/arithmetic.jsonl"))
    (tasks / "moeray_python_facts.yaml").write_text(
        LM_EVAL_CHOICE_TASK.format(facts=REPO / "examples/eval/python-facts.jsonl"))
    # The app `moeray serve` runs, on the session's Ray (the CLI process itself is test_cli_serve's).
    url = deployed({"model": str(trained_on_tasks), "served_model_name": "tasks-sft"}, "/lm-eval", "lm-eval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    model_args = (f"model=tasks-sft,base_url={url}/v1/completions,tokenizer={trained_on_tasks},"
                  "tokenizer_backend=huggingface,add_bos_token=True,num_concurrent=1,max_retries=1")
    finished = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                               model_args, "--tasks", "moeray_arithmetic,moeray_python_facts", "--include_path",
                               str(tasks), "--output_path", str(tmp_path / "lm_eval_out"), "--batch_size", "1"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results_file = next((tmp_path / "lm_eval_out").rglob("results_*.json"))
    theirs = json.loads(results_file.read_text())["results"]
    endpoint = {"url": f"{url}/v1", "model": "tasks-sft"}
    spec = example_spec(endpoint=endpoint)
    spec = spec.model_copy(update={"tasks": [spec.tasks[0], spec.tasks[2]]})  # the two lm-eval runs
    ours = metrics(run_eval(spec))
    assert theirs["moeray_arithmetic"]["exact_match,first_number"] == pytest.approx(ours["arithmetic/exact_match"])
    assert theirs["moeray_python_facts"]["acc,none"] == pytest.approx(ours["python-facts/acc"])
    assert ours["arithmetic/exact_match"] > 0.3 and ours["python-facts/acc"] > 0.5  # not agreeing on zero
