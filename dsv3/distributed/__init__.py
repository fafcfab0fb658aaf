"""Multi-process training on torch.distributed, applied from outside the single-device model.

    mesh.py             ParallelConfig (dp_replicate, dp_shard, ep, pp, schedule) -> checked layout -> DeviceMesh
    expert_parallel.py  AllToAllDispatcher, ShardedExperts, and the single-process loop twin
    parallelize.py      parallelize(module, mesh, cfg): EP -> recompute -> compile -> FSDP2, in that order
    pipeline.py         stages of a Transformer, Schedule1F1B / ScheduleDualPipeV, stage balance losses
    step.py             one optimizer step (global loads for the bias update, clipping across meshes)
    checkpoint.py       DCP save/load across layouts, export of the full model in the HF layout
    train.py            the `torchrun -m dsv3 train --dp-shard .. --ep .. --pp ..` loop

No tensor or context parallelism, and no FP8 communication.
"""
