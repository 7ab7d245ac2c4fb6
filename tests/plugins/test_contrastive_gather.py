"""fusion.contrastive_gather: negatives from every worker's batch, exact against one process over them all."""
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_world, spawn

from plait.plugins.fusion import contrastive_loss, gathered_contrastive_loss

ROWS, DIM, WORLD = 6, 8, 2


def batch(requires_grad: bool = True):
    generator = torch.Generator().manual_seed(0)
    projected = {m: torch.randn(ROWS * WORLD, DIM, generator=generator) for m in ("audio", "image", "text")}
    present = {m: torch.rand(ROWS * WORLD, generator=generator) > 0.25 for m in projected}
    scale = torch.tensor([3.0])
    return projected, present, scale


def _worker(rank: int, port: int, results) -> None:
    with gloo_world(rank, WORLD, port):
        projected, present, scale = batch()
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        local = {m: p[mine].clone().requires_grad_(True) for m, p in projected.items()}
        scale.requires_grad_(True)
        loss = gathered_contrastive_loss({"projected": local, "present": {m: p[mine] for m, p in present.items()},
                                          "logit_scale": scale})
        loss.backward()
        # what DDP does with the workers' gradients: their mean (a row's gradient arrives summed over all losses)
        grads = {m: t.grad / WORLD for m, t in local.items()}
        results[rank] = {"loss": loss.detach(), "grads": grads, "scale": scale.grad}


def test_the_gathered_loss_and_its_gradients_match_one_process_over_the_concatenated_batch():
    results = mp.Manager().dict()
    spawn(_worker, WORLD, free_port(), results)
    projected, present, scale = batch()
    leaves = {m: p.clone().requires_grad_(True) for m, p in projected.items()}
    scale.requires_grad_(True)
    expected = contrastive_loss({"projected": leaves, "present": present, "logit_scale": scale})
    expected.backward()
    assert torch.allclose(torch.stack([results[r]["loss"] for r in range(WORLD)]).mean(), expected, atol=1e-5)
    assert torch.allclose(sum(results[r]["scale"] for r in range(WORLD)) / WORLD, scale.grad, atol=1e-5)
    for m, leaf in leaves.items():
        gathered = torch.cat([results[r]["grads"][m] for r in range(WORLD)])
        assert torch.allclose(gathered, leaf.grad, atol=1e-5), m
    assert float(leaves["text"].grad.abs().sum()) > 0  # the check compares real gradients


def test_in_one_process_it_is_the_plain_loss():
    projected, present, scale = batch()
    outputs = {"projected": projected, "present": present, "logit_scale": scale}
    assert torch.equal(gathered_contrastive_loss(outputs), contrastive_loss(outputs))
