"""Run heft's command line under accelerate's FSDP2 on CPU (gloo), for the tests.

accelerate 1.15 turns `distributed_type: FSDP` into FSDP only on accelerator devices; on a CPU-only
machine it silently runs DDP. Everything heft does under FSDP (accelerate's `fully_shard` preparation,
sharded parameters and optimizer state, collective saving and evaluation) runs on CPU with gloo, so
this launcher changes just that one decision and then runs `heft` as `accelerate launch -m heft` would:
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/training/fsdp_cpu_launch.py train ...
The FSDP plugin is built from the same FSDP_* variables accelerate launch sets from the config file.
"""

import os
import sys

from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = Accelerator.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    state = self.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and state.distributed_type != DistributedType.FSDP:
        assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()


Accelerator.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from heft.cli import main

    sys.exit(main(sys.argv[1:]))
