"""The paper's evaluation protocol, one sequence per document, against a hand computation."""

import numpy as np
import pytest
import torch

from lws_megatron.dataset.indexed import IndexedWriter
from lws_megatron.training.documents import DocumentBatches
from tests.helpers import TINY
from tests.helpers.dist_utils import run_distributed

DOCS = [[5, 6, 7], [8, 9], [10], list(range(100, 140)), [11, 12, 13, 14]]  # [10] scores nothing


def _write(prefix: str, docs: list[list[int]]) -> None:
    writer = IndexedWriter(prefix, np.dtype(np.uint16))
    writer.add(
        np.concatenate([np.array(d, dtype=np.uint16) for d in docs]),
        np.array([len(d) for d in docs]),
    )
    writer.finish()
    writer.commit()


def test_documents_are_cut_padded_masked_and_dealt_to_ranks(tmp_path):
    prefix = str(tmp_path / "v_valid")
    _write(prefix, DOCS)
    ranks = [DocumentBatches([prefix], 8, 2, rank, 2, pad_id=0) for rank in range(2)]
    assert [len(r) for r in ranks] == [1, 1] and ranks[0].total_documents == 4
    first = ranks[0][0]  # rank 0: documents 0 and 3 of the four that score anything
    assert first["tokens"][0].tolist() == [5, 6, 0, 0, 0, 0, 0, 0]
    assert first["labels"][0].tolist() == [6, 7, 0, 0, 0, 0, 0, 0]
    assert first["loss_mask"][0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert first["tokens"][1].tolist() == list(range(100, 108))  # cut at the sequence length
    assert first["labels"][1].tolist() == list(range(101, 109))
    second = ranks[1][0]  # rank 1: documents 1 and 4
    assert second["tokens"][0].tolist()[:1] == [8] and second["loss_mask"][0].sum() == 1
    assert second["labels"][1].tolist()[:3] == [12, 13, 14] and second["loss_mask"][1].sum() == 3
    scored = sum(int(b["loss_mask"].sum()) for r in ranks for b in r)
    assert scored == 2 + 1 + 8 + 3
    with pytest.raises(IndexError):
        ranks[0][1]


def test_a_rank_with_fewer_documents_pads_with_unscored_rows(tmp_path):
    prefix = str(tmp_path / "v_valid")
    _write(prefix, DOCS[:3])  # two documents that score: one rank of three gets none
    ranks = [DocumentBatches([prefix], 8, 1, rank, 3, pad_id=0) for rank in range(3)]
    assert [len(r) for r in ranks] == [1, 1, 1]
    assert ranks[2][0]["loss_mask"].sum() == 0


def _losses(prefix: str) -> tuple[float, float]:
    """(eval_batch over the documents, the mean of every document's own token losses)."""
    from lws_megatron.config import load_config
    from lws_megatron.training.distributed import model_parallel
    from lws_megatron.training.train_module import TrainModule

    config = load_config(TINY)
    with model_parallel(config) as plan:
        module = TrainModule(config, plan, torch.device("cpu"))
        evaluated = module.eval_batch(
            DocumentBatches([prefix], config.model.seq_length, 2, 0, 1, pad_id=0)
        )
        model, total, count = module.chunks[0].eval(), 0.0, 0
        with torch.no_grad():
            for doc in DOCS:
                doc = torch.tensor(doc[: config.model.seq_length + 1])[None]
                if doc.shape[1] < 2:
                    continue
                losses = model(doc[:, :-1], None, None, labels=doc[:, 1:])
                total, count = total + losses.double().sum().item(), count + losses.numel()
    return evaluated, total / count


@pytest.mark.distributed
def test_the_loss_is_the_mean_over_every_document_token(tmp_path):
    prefix = str(tmp_path / "v_valid")
    _write(prefix, DOCS)
    ((evaluated, by_hand),) = run_distributed(_losses, 1, prefix)
    assert evaluated == pytest.approx(by_hand, abs=1e-5)
