"""lm-eval-harness on an export: a local multiple-choice task (YAML and JSONL written here, no
download) scores the accuracy that our Megatron model's own log-likelihoods give."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("lm_eval")

from lws_megatron.dataset.tokenizer import load_tokenizer
from lws_megatron.errors import UserError
from lws_megatron.evaluate import RESULTS, evaluate, main
from tests.helpers.dist_utils import run_distributed
from tests.helpers.export_utils import megatron_logits, trained_export

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

DOCS = [
    ("The river ran past the", ["old mill", "sky", "of the"], 0),
    ("She opened the", ["door", "the the", "blue"], 1),
    ("Two plus two is", ["four", "cat", "a river"], 0),
    ("The sun rises in the", ["east", "west", "and"], 2),
    ("He walked to the", ["market", "quickly", "town"], 2),
    ("In the morning the birds", ["sang", "were", "of"], 1),
    ("The old man said", ["nothing", "that", "the"], 0),
    ("They built a house near the", ["sea", "forest", "road"], 1),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    return trained_export(tmp_path_factory.mktemp("evaluate"), tiny_data, "tp1", 1)


@pytest.fixture()
def task_dir(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "label": label}) + "\n" for q, c, label in DOCS
        )
    )
    (tmp_path / "local_mc.yaml").write_text(f"""task: lws_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    return tmp_path


def direct_accuracy(run_dir, tokenizer_path) -> float:
    """Accuracy by hand: each choice's summed log-likelihood after the question (lm-eval's
    " " delimiter), from our Megatron model's logits."""
    processor = load_tokenizer(tokenizer_path).processor
    pairs = []
    for question, choices, _ in DOCS:
        context = processor.encode(question)
        for choice in choices:
            whole = processor.encode(f"{question} {choice}")
            pairs.append((len(context), torch.tensor([whole])))
    [logits] = run_distributed(megatron_logits, 1, str(run_dir), [t for _, t in pairs])
    scores = []
    for (start, tokens), out in zip(pairs, logits):
        logprobs = torch.log_softmax(out[0, :, :512].double(), dim=-1)
        scores.append(
            sum(float(logprobs[i - 1, tokens[0, i]]) for i in range(start, tokens.shape[1]))
        )
    correct, at = 0, 0
    for _, choices, label in DOCS:
        mine = scores[at : at + len(choices)]
        correct += max(range(len(choices)), key=mine.__getitem__) == label
        at += len(choices)
    return correct / len(DOCS)


def test_lm_eval_scores_the_hand_computed_accuracy(run, task_dir, tiny_data):
    run_dir, out = run
    record = evaluate(out, ["lws_local_mc"], include_path=task_dir, batch_size=4)
    want = direct_accuracy(run_dir, tiny_data["tokenizer"])
    assert record["tasks"]["lws_local_mc"]["acc,none"] == pytest.approx(want, abs=1e-9)
    assert record["step"] == 3
    assert json.loads((out / RESULTS).read_text()) == record


def test_from_a_run_dir_scores_go_to_the_run_dir(run, task_dir):
    run_dir = run[0]
    record = evaluate(run_dir, ["lws_local_mc"], include_path=task_dir, limit=2)
    assert json.loads((run_dir / RESULTS).read_text()) == record
    assert 0.0 <= record["tasks"]["lws_local_mc"]["acc,none"] <= 1.0


def test_unknown_task_is_refused_in_one_line(run):
    with pytest.raises(UserError, match="lm-eval knows no task no_such_task"):
        evaluate(run[1], ["no_such_task"])


def test_tasks_naming_nothing_fail_in_one_line(run, capsys):
    assert main([str(run[1]), "--tasks", ","]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tasks ',' names no task" in err


def test_a_folder_with_edited_code_is_refused(run, task_dir, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(run[1], folder)
    marker = tmp_path / "ran"
    code = folder / "modeling_lws.py"
    code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    with pytest.raises(UserError, match="differs from the modeling code"):
        evaluate(folder, ["lws_local_mc"], include_path=task_dir)
    assert not marker.exists()
