"""Large embeddings send sparse gradients through DDP; the update stays the dense one."""
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_world, spawn

from plait.core.step import densify_gradients
from plait.launch.ray_runner import SPARSE_EMBEDDING_ROWS, sparse_embedding_gradients


class Tagger(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vocab = torch.nn.Embedding(SPARSE_EMBEDDING_ROWS * 2, 16)
        self.small = torch.nn.Embedding(8, 16)  # stays dense
        self.out = torch.nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.vocab(ids).mean(1) + self.small(ids % 8).mean(1))


def _steps(model: torch.nn.Module, rank: int) -> None:
    params = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):
        ids = torch.randint(0, SPARSE_EMBEDDING_ROWS * 2, (4, 5), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(ids), torch.randint(0, 3, (4,), generator=generator))
        loss.backward()
        densify_gradients(params)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _train_both_ways(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    with gloo_world(rank, 2, port):
        weights = {}
        for sparse in (False, True):
            torch.manual_seed(0)
            model = Tagger()
            if sparse:
                assert sparse_embedding_gradients(model) == ["vocab"]
            ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
            _steps(ddp, rank)
            weights[sparse] = {k: v.clone() for k, v in model.state_dict().items()}
    results[rank] = weights


@pytest.mark.timeout(120)
def test_sparse_embedding_gradients_give_the_dense_update_on_two_workers():
    with mp.Manager() as manager:
        results = manager.dict()
        spawn(_train_both_ways, 2, free_port(), results)
        results = dict(results)
    for rank in (0, 1):
        dense, sparse = results[rank][False], results[rank][True]
        for name in dense:
            torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in results[0][True]:  # and the workers agree
        torch.testing.assert_close(results[0][True][name], results[1][True][name], rtol=0, atol=0)


def test_densify_leaves_dense_gradients_alone_and_densifies_sparse_ones():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 1, 3])).sum().backward()
    dense = torch.nn.Parameter(torch.ones(2))
    dense.grad = torch.ones(2)
    before = dense.grad
    densify_gradients([embedding.weight, dense])
    assert not embedding.weight.grad.is_sparse
    assert embedding.weight.grad[1].tolist() == [2.0] * 4 and embedding.weight.grad[0].abs().sum() == 0
    assert dense.grad is before


def _tied_step(rank: int, port: int) -> None:
    from plait.plugins.wiki_lm import CausalLM, WikiLMOptions

    torch.set_num_threads(1)
    with gloo_world(rank, 2, port):
        torch.manual_seed(0)
        model = CausalLM(WikiLMOptions(seq_len=8, dim=16, layers=1, heads=2, ffn=32), SPARSE_EMBEDDING_ROWS * 4)
        assert sparse_embedding_gradients(model) == []  # the output layer reuses the embedding's weight
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        ids = torch.randint(0, SPARSE_EMBEDDING_ROWS * 4, (2, 8), generator=torch.Generator().manual_seed(rank))
        logits = ddp({"inputs": {"text": {"ids": ids}}})["logits"]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        assert model.embed.weight.grad is not None and not model.embed.weight.grad.is_sparse
        del ddp  # its reducer holds the process group: gone first, so that gloo's threads end before it


@pytest.mark.timeout(120)
def test_an_embedding_tied_to_the_output_layer_keeps_dense_gradients_under_ddp():
    # a sparse switch here fails DDP's backward: "Expected variable to have sparse gradient"
    spawn(_tied_step, 2, free_port())
