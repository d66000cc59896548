"""The save path of FSDP full fine-tuning, on real FSDP2 shards (two CPU processes, gloo).

accelerate turns FSDP on for GPU launches only (on a CPU ``accelerate launch`` runs plain data parallel), so
the training run itself cannot be sharded here. What diffsplit adds to accelerate's FSDP is the save:
gather the full weights on every process (a collective) and write the folder ``from_pretrained`` loads.
This test shards the tiny denoiser with torch's ``fully_shard`` across two processes, gathers as accelerate's
``get_state_dict`` does for FSDP2, and runs :func:`save_checkpoint` on both ranks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffsplit.families.qwen_image import FAMILY as QWEN_IMAGE
from diffsplit.training.config import TrainConfig

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, folder: str, out: str, port: int) -> None:
    import diffusers
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from diffsplit.training.trainable import save_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = diffusers.QwenImageTransformer2DModel.from_pretrained(folder)
        for block in model.transformer_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model.transformer_blocks[0].attn.to_q.weight).__name__ == "DTensor"
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        accelerator = SimpleNamespace(
            distributed_type=DistributedType.FSDP,
            is_main_process=rank == 0,
            get_state_dict=lambda m: get_model_state_dict(m, options=options),
            unwrap_model=lambda m: m,
        )
        config = TrainConfig(trainable_models="dit", output_path=out)
        specs = {s.name: s for s in QWEN_IMAGE.components}
        written = save_checkpoint(config, {"dit": model}, "epoch-0", accelerator, specs)
        assert written == ([Path(out) / "epoch-0.dit"] if rank == 0 else [])
    finally:
        dist.destroy_process_group()


def test_a_sharded_full_model_saves_as_a_folder_from_pretrained_loads(
    in_workspace: Path, tmp_path: Path
) -> None:
    import diffusers

    folder = in_workspace / "models/Qwen/Qwen-Image/transformer"
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(_rank, args=(str(folder), str(out), _free_port()), nprocs=2)
    loaded = diffusers.QwenImageTransformer2DModel.from_pretrained(str(out / "epoch-0.dit"))
    original = diffusers.QwenImageTransformer2DModel.from_pretrained(str(folder))
    config = {k: v for k, v in loaded.config.items() if k != "_name_or_path"}
    assert config == {k: v for k, v in original.config.items() if k != "_name_or_path"}
    want = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary folder left
