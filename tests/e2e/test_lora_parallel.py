"""LoRA on a pretrained text tower on 2 CPU workers (a real gloo process group, plait's own ``fit``): under
DDP and under FSDP2 the adapters train and the frozen base does not; FSDP shards the frozen base; both
checkpoint formats hold no base weight; a stopped FSDP run resumes bitwise."""
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import TINY_PLUGINS, bert_folder, free_port, spawn
from safetensors.torch import load_file
from test_fsdp import _worker

from plait.core import checkpoint

pytestmark = pytest.mark.slow
TEXT = "encoders.text."


def _summary(state) -> dict:
    named = [(n.replace("module.", "", 1), p) for n, p in state.model.named_parameters() if n.find(TEXT) >= 0]
    frozen = [p for n, p in named if not p.requires_grad]
    return {"trainable": sorted(n for n, p in named if p.requires_grad),
            "frozen_total": sum(p.numel() for p in frozen),
            "frozen_local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen),
            "loss": state.metrics["train"]["loss"], "test": state.metrics["test"]["fused"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = bert_folder(root / "bert")
    plugins = {**TINY_PLUGINS, "text_encoder": {"pretrained": str(base), "max_length": 16},
               "lora": {"rank": 4, "alpha": 8}}

    def write(name: str, extra: dict | None = None, file: str | None = None, **run) -> str:
        config = {"run": {"name": name, "runs_dir": str(root / "runs"), "epochs": 1, "batch_size": 16,
                          "eval_batch_size": 16, "lr": 1e-2, "log_every": 2, "checkpoint_every": 2,
                          "schedule": "constant", "keep_checkpoints": 5, **run},
                  "plugins": {**plugins, **(extra or {})}}
        path = root / f"{file or name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    configs = {  # 192 samples / (2 workers x 16) = 6 steps
        "ddp": (write("ddp"), "ddp"),
        "fsdp": (write("fsdp"), "fsdp"),
        "stopped": (write("split", {"stop_at": {"step": 3}}, "stopped"), "fsdp"),
        "resumed": (write("split"), "fsdp"),
        "sharded": (write("sharded", checkpoint_format="sharded", max_steps=2), "fsdp"),
    }
    with mp.Manager() as manager:
        results = manager.dict()
        spawn(_worker, 2, free_port(), configs, results, _summary)
        return {"root": root, **dict(results)}


def _checkpoint(runs, name):
    return checkpoint.latest(runs["root"] / "runs" / name / "checkpoints")


@pytest.mark.timeout(400)
def test_under_ddp_and_fsdp_only_the_adapters_of_the_tower_train(runs):
    for run in ("ddp", "fsdp"):
        for rank in (0, 1):
            result = runs[rank][run]
            assert result["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in result["trainable"])
            assert torch.isfinite(torch.tensor(result["loss"]))
        assert runs[0][run]["test"] == runs[1][run]["test"]  # one model, evaluated on both workers' shards
    saved = load_file(str(_checkpoint(runs, "fsdp") / "model.safetensors"))
    assert {k for k in saved if k.startswith(TEXT)} == set(runs[0]["fsdp"]["trainable"])  # adapters only
    ddp = load_file(str(_checkpoint(runs, "ddp") / "model.safetensors"))
    assert ddp.keys() == saved.keys()
    apart = [float((ddp[k] - saved[k]).abs().max()) for k in saved if ".lora_B." in k]
    assert max(apart) < 3e-2 and max(float(saved[k].abs().max()) for k in saved if ".lora_B." in k) > 1e-3


@pytest.mark.timeout(400)
def test_fsdp_shards_the_frozen_base(runs):
    for rank in (0, 1):
        fsdp, ddp = runs[rank]["fsdp"], runs[rank]["ddp"]
        assert fsdp["frozen_total"] == ddp["frozen_total"] == ddp["frozen_local"]
        assert abs(fsdp["frozen_local"] / fsdp["frozen_total"] - 0.5) < 0.01, fsdp


@pytest.mark.timeout(400)
def test_a_stopped_lora_fsdp_run_resumes_bitwise(runs):
    assert runs[0]["stopped"]["error"] == "stopped at step 3"
    whole, resumed = (load_file(str(_checkpoint(runs, name) / "model.safetensors")) for name in ("fsdp", "split"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [k for k in whole if not torch.equal(whole[k],
                                                                                                      resumed[k])]


@pytest.mark.timeout(400)
def test_sharded_checkpoints_hold_no_base_weight(runs):
    import torch.distributed.checkpoint as dcp

    shards = _checkpoint(runs, "sharded") / checkpoint.SHARDS
    keys = set(dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata)
    text = {k.removeprefix("model.") for k in keys if k.startswith(f"model.{TEXT}")}
    assert text == set(runs[0]["fsdp"]["trainable"])
