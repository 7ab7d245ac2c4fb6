"""FSDP on 2 CPU workers (real gloo process group, plait's own `fit`, no Ray): it trains like
DDP while each worker holds half the weights, its checkpoints resume exactly, and they load
into a plain model for `plait eval`."""
import json

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import TINY_PLUGINS, free_port, gloo_world, spawn
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from plait.core import checkpoint
from plait.core.distributed import Distributed
from plait.core.errors import DataError
from plait.core.loop import fit
from plait.core.runs import load, load_run
from plait.launch.evaluate import evaluate_run
from plait.launch.ray_runner import (
    find_unused_parameters,
    shard_model,
    sparse_embedding_gradients,
    undeclared_unused_parameters,
)

pytestmark = pytest.mark.slow

def _distributed(rank: int, strategy: str, config) -> Distributed:
    seed = config.run.seed

    def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
        if strategy == "fsdp":
            return shard_model(model, config.scaling.fsdp)
        sparse_embedding_gradients(model)
        # as the Ray runner decides it: the tiny batches often lack a modality, whose encoder then
        # touches its weights, so DDP runs without its search for unused parameters
        unused = find_unused_parameters(model, "auto")
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused,
                                                         gradient_as_bucket_view=True)

    def prepare_loader(loader: DataLoader, add_sampler: bool) -> DataLoader:
        if not add_sampler:
            return loader
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=seed)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                          generator=loader.generator)  # as Ray's prepare_data_loader keeps it

    return Distributed(rank=rank, world_size=2, prepare_model=prepare_model, prepare_loader=prepare_loader,
                       device=torch.device("cpu"), lockstep=strategy == "fsdp")


def _summary(state) -> dict:
    params = list(state.model.parameters())
    return {"test": state.metrics["test"], "total": sum(p.numel() for p in params),
            "dtypes": sorted({str(p.dtype) for p in params}),
            "local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)}


def _worker(rank: int, port: int, configs: dict, results: dict, summary=_summary) -> None:
    """Rank ``rank`` of 2 gloo workers: train each config in turn; ``summary(state)`` of each, or its error."""
    torch.set_num_threads(1)
    out = {}
    with gloo_world(rank, 2, port):
        for run, (path, strategy) in configs.items():
            config, plugins = load(path, [])
            try:
                state = fit(config, plugins, _distributed(rank, strategy, config))
            except RuntimeError as exc:
                out[run] = {"error": str(exc)}
                continue
            out[run] = summary(state)
    results[rank] = out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    plugins = {**TINY_PLUGINS, "spoken_digits": {**TINY_PLUGINS["spoken_digits"], "test_size": 65}}

    def write(name: str, extra: dict | None = None, file: str | None = None, without: str | None = None,
              units: str = "blocks", **run) -> str:
        config = {"run": {"name": name, "runs_dir": str(root / "runs"), "epochs": 2, "batch_size": 16,
                          "eval_batch_size": 16, "lr": 3e-3, "log_every": 2, "checkpoint_every": 4, **run},
                  "scaling": {"fsdp": {"units": units}},
                  "plugins": {k: v for k, v in {**plugins, **(extra or {})}.items() if k != without}}
        path = root / f"{file or name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    def write_lm(name: str, fsdp: dict | None = None, **run) -> str:  # fixed shapes, no dropout, as compile wants
        config = {"run": {"name": name, "runs_dir": str(root / "runs"), "epochs": 1, "max_steps": 10,
                          "batch_size": 8, "eval_batch_size": 64, "log_every": 1, **run},
                  "scaling": {"fsdp": fsdp or {}},
                  "plugins": {"wiki_lm": {"seq_len": 16, "dim": 32, "layers": 2, "heads": 2, "ffn": 64,
                                          "max_articles": 200}}}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    configs = {  # 192 samples / (2 workers x 16) = 6 steps an epoch, 12 in all
        "fsdp": (write("fsdp"), "fsdp"),
        "ddp": (write("ddp"), "ddp"),
        "fsdp-3": (write("fsdp-3", max_steps=3), "fsdp"),  # per block: resnet stages, BERT and fusion layers
        "fsdp-modules-3": (write("fsdp-modules-3", units="modules", max_steps=3), "fsdp"),  # per encoder
        "fsdp-ac-3": (write("fsdp-ac-3", max_steps=3, activation_checkpointing="full"), "fsdp"),
        "ddp-ac-3": (write("ddp-ac-3", {"rank_1_term": {}}, max_steps=3, log_every=1,
                           activation_checkpointing="selective"), "ddp"),
        "ddp-3": (write("ddp-3", {"rank_1_term": {}}, max_steps=3, log_every=1), "ddp"),
        # batches of 4 with 60% of each modality missing: many a step where one worker, or both,
        # has no text (the sparse embedding touched) or no audio (no image encoder: a batch norm
        # cannot train on the one image a batch of 4 may hold)
        "gaps": (write("gaps", {"spoken_digits": {**plugins["spoken_digits"], "p_missing": 0.6, "p_corrupt": 0.0}},
                       without="image_encoder", batch_size=4, max_steps=40), "ddp"),
        "undeclared": (write("undeclared", {"spare_weight": {}}, max_steps=3), "ddp"),
        "declared": (write("declared", {"spare_weight": {"declare": True}}, max_steps=3), "ddp"),
        # last checkpoint: step 8, mid-epoch; kept (keep_checkpoints) for the sharded format's test
        "stopped": (write("split", {"stop_at": {"step": 10}}, "stopped", keep_checkpoints=5), "fsdp"),
        "resumed": (write("split", keep_checkpoints=5), "fsdp"),
        "stopped-sharded": (write("split-sharded", {"stop_at": {"step": 10}}, "stopped-sharded",
                                  checkpoint_format="sharded", keep_checkpoints=5), "fsdp"),
        "resumed-sharded": (write("split-sharded", checkpoint_format="sharded", keep_checkpoints=5), "fsdp"),
        "lm-eager": (write_lm("lm-eager"), "fsdp"),
        "lm-compiled": (write_lm("lm-compiled", compile=True), "fsdp"),
        "lm-compiled-ac": (write_lm("lm-compiled-ac", compile=True, activation_checkpointing="full"), "fsdp"),
        "lm-bf16": (write_lm("lm-bf16", {"param_dtype": "bfloat16", "reduce_dtype": "float32"}), "fsdp"),
    }
    with mp.Manager() as manager:
        results = manager.dict()
        spawn(_worker, 2, free_port(), configs, results)
        return {"root": root, **dict(results)}


def _weights(runs, name):
    return load_file(str(checkpoint.latest(runs["root"] / "runs" / name / "checkpoints") / "model.safetensors"))


@pytest.mark.timeout(400)
def test_each_worker_holds_half_the_weights(runs):
    for rank in (0, 1):
        fsdp = runs[rank]["fsdp"]
        assert fsdp["total"] == runs[rank]["ddp"]["total"]
        assert abs(fsdp["local"] / fsdp["total"] - 0.5) < 0.01, fsdp
        assert runs[rank]["ddp"]["local"] == runs[rank]["ddp"]["total"]


@pytest.mark.timeout(400)
def test_fsdp_trains_the_same_weights_as_ddp(runs):
    # Three steps: both average the same gradients, but float sums in another order differ by
    # ~1e-7, and AdamW's first steps are ~lr * sign(gradient): where a gradient is ~0 (a bias
    # before a softmax, a weight that sees the images' black borders) that noise moves a weight by
    # up to lr either way. Measured: 172 of 1.13 M weights more than 1e-5 apart, at most 7e-5.
    # A missed or wrong reduction moves most weights by ~lr.
    # The same holds per encoder and per block (ResNet stages, BERT and fusion layers as units).
    ddp = _weights(runs, "ddp-3")
    for run in ("fsdp-3", "fsdp-modules-3"):
        fsdp = _weights(runs, run)
        assert fsdp.keys() == ddp.keys()
        floats = [k for k in fsdp if fsdp[k].is_floating_point()]
        apart = [(fsdp[k] - ddp[k]).abs() for k in floats]
        weights = sum(d.numel() for d in apart)
        assert sum(int((d > 1e-5).sum()) for d in apart) / weights < 1e-3, run
        assert max(float(d.max()) for d in apart) < 3e-3, run  # one AdamW step at lr 3e-3
        for rank in (0, 1):  # and the model the workers evaluated is the same
            assert runs[rank][run]["test"]["fused"]["accuracy"] == runs[0]["ddp-3"]["test"]["fused"]["accuracy"]


def _losses(runs, name):
    rows = (runs["root"] / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, rows) if row["split"] == "train"]


@pytest.mark.timeout(400)
def test_compiled_blocks_train_as_eager_ones_under_fsdp(runs):
    # each wiki_lm block compiled (inductor's C++ kernels), then sharded per block on 2 workers:
    # another summation order moves a loss by ~1e-7, never 1e-5; the same with each compiled block
    # recomputing its activations in the backward pass (examples/large's setting)
    eager = _losses(runs, "lm-eager")
    for run in ("lm-compiled", "lm-compiled-ac"):
        compiled = _losses(runs, run)
        assert len(eager) == len(compiled) == 10
        assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 1e-5, run


@pytest.mark.timeout(400)
def test_bf16_parameters_with_fp32_reductions_train_near_fp32(runs):
    # FSDP gathers bf16 weights for the forward and backward and reduce-scatters fp32 gradients into
    # fp32 shards (what AdamW updates): the losses move by bf16's rounding (~1e-3), which a policy
    # that did nothing would not, and stay on the fp32 run's course
    eager, bf16 = _losses(runs, "lm-eager"), _losses(runs, "lm-bf16")
    gaps = [abs(a - b) for a, b in zip(eager, bf16, strict=True)]
    assert 1e-4 < max(gaps) < 0.05, gaps
    assert bf16[-1] < bf16[0]
    assert runs[0]["lm-bf16"]["dtypes"] == ["torch.float32"]


@pytest.mark.timeout(400)
def test_activation_checkpointing_under_fsdp_and_ddp_changes_no_weight(runs):
    # recomputing a block in the backward pass gives the same gradients, bit for bit, sharded or not
    for checkpointed, plain in (("fsdp-ac-3", "fsdp-3"), ("ddp-ac-3", "ddp-3")):
        a, b = _weights(runs, checkpointed), _weights(runs, plain)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), checkpointed


@pytest.mark.timeout(400)
def test_uneven_evaluation_shards_count_each_sample_once(runs):
    # 65 test samples: 33 on rank 0 (3 batches of 16) and 32 on rank 1 (2), which repeats its last
    # batch so that FSDP's gathers pair up, and does not count it
    for rank in (0, 1):
        assert runs[rank]["fsdp"]["test"]["fused"]["samples"] == 65
        assert runs[rank]["fsdp"]["test"]["fused"] == runs[0]["fsdp"]["test"]["fused"]


@pytest.mark.timeout(400)
def test_a_stopped_fsdp_run_resumes_to_the_same_weights(runs):
    assert runs[0]["stopped"]["error"] == "stopped at step 10"
    whole, resumed = _weights(runs, "fsdp"), _weights(runs, "split")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [
        k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert runs[0]["resumed"]["test"] == runs[0]["fsdp"]["test"]


@pytest.mark.timeout(400)
def test_a_sharded_checkpoint_resumes_on_two_workers_to_the_same_weights(runs):
    # each worker wrote its own shards at step 8 and nothing was gathered; two workers resume
    # from them and end bitwise where the run that never stopped ended
    assert runs[0]["stopped-sharded"]["error"] == "stopped at step 10"
    step8 = runs["root"] / "runs" / "split-sharded" / "checkpoints" / "step-00000008"
    assert (step8 / "shards" / ".metadata").is_file() and not (step8 / "model.safetensors").exists()
    assert len(list((step8 / "shards").glob("*.distcp"))) == 2  # one file per worker
    whole = _weights(runs, "fsdp")
    resumed = load_run(runs["root"] / "runs" / "split-sharded")[2].model.state_dict()
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [
        (k, float((whole[k].float() - resumed[k].float()).abs().max())) for k in whole
        if not torch.equal(whole[k], resumed[k])][:6]


@pytest.mark.timeout(400)
def test_a_sharded_checkpoint_of_two_workers_resumes_on_one(runs, tmp_path):
    import shutil

    source = runs["root"] / "runs" / "split-sharded"
    # loaded in one process, the step-8 shards are the weights the full format gathered at step 8
    model = load_run(runs["root"] / "runs" / "split")[2].model
    checkpoint.load(source / "checkpoints" / "step-00000008", model)
    full = load_file(str(runs["root"] / "runs" / "split" / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    # and a run resumed from them on one worker finishes
    copy = tmp_path / "runs" / "split-sharded"
    shutil.copytree(source, copy, ignore=lambda folder, names: [n for n in names if n > "step-00000008"
                                                                 and n.startswith("step-")])
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["run"]["runs_dir"] = str(tmp_path / "runs")
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(config))
    state = fit(*load(str(path), []))
    assert state.step > 8 and state.metrics["test"]["fused"]["samples"] == 65


@pytest.mark.timeout(400)
def test_plait_export_turns_the_shards_into_the_file_eval_reads(runs, tmp_path, capsys):
    import shutil

    from plait.launch.cli import main

    run = tmp_path / "split-sharded"
    shutil.copytree(runs["root"] / "runs" / "split-sharded", run)
    assert main(["export", str(run)]) == 0
    written = checkpoint.latest(run / "checkpoints") / "model.safetensors"
    assert f"{written}: written" in capsys.readouterr().out
    assert sorted(load_file(str(written))) == sorted(_weights(runs, "fsdp"))
    metrics = evaluate_run(run)
    assert metrics["accuracy"] == runs[0]["resumed-sharded"]["test"]["fused"]["accuracy"]


def test_an_incomplete_sharded_checkpoint_is_one_line(runs, tmp_path):
    import shutil

    broken = tmp_path / "step-00000008"
    shutil.copytree(runs["root"] / "runs" / "split-sharded" / "checkpoints" / "step-00000008", broken)
    (broken / "shards" / ".metadata").unlink()
    model = load_run(runs["root"] / "runs" / "split")[2].model
    with pytest.raises(DataError, match=r"step-00000008: the sharded checkpoint is incomplete"):
        checkpoint.load(broken, model)


@pytest.mark.timeout(400)
def test_an_fsdp_checkpoint_loads_into_a_plain_model(runs):
    metrics = evaluate_run(runs["root"] / "runs" / "fsdp")
    trained = runs[0]["fsdp"]["test"]["fused"]
    assert metrics["samples"] == trained["samples"] and metrics["accuracy"] == trained["accuracy"]


@pytest.mark.timeout(400)
def test_a_loss_term_only_one_worker_has_is_logged(runs):
    rows = [json.loads(line) for line in (runs["root"] / "runs" / "ddp-3" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train] == [1, 2, 3]
    assert all(row["rank_1_only"] == 0.0 and row["ce"] > 0 for row in train)


@pytest.mark.timeout(400)
def test_ddp_searches_for_unused_parameters_only_where_a_module_declares_them(runs):
    assert "error" not in runs[0]["ddp"], "the tiny plugins leave no parameter unused: no search needed"
    assert "error" not in runs[0]["gaps"] and "error" not in runs[1]["gaps"], "idle encoders touch their weights"
    assert "error" not in runs[0]["declared"], "a declared spare layer: DDP searches, and the run completes"
    error = runs[0]["undeclared"]["error"]
    assert "Expected to have finished reduction" in error
    config, plugins = load(runs["root"] / "undeclared.yaml", [])
    from plait.core.model import build_model

    model = build_model(plugins, config, ("text", "image", "audio"), 10)
    assert not find_unused_parameters(model, "auto") and find_unused_parameters(model, True)
    assert load(runs["root"] / "undeclared.yaml", ["scaling.find_unused_parameters=true"])[0].scaling \
        .find_unused_parameters is True  # as a command line or YAML writes it
    message = str(undeclared_unused_parameters(model, error))
    assert "(spare.weight, spare.bias)" in message and "scaling.find_unused_parameters=true" in message
