"""Registration of the built-in solvers (imported once by ``scot_ot``)."""

from .ot.registry import register
from .ot.torch_log import TorchLogSinkhorn

register("torch-log", TorchLogSinkhorn)
from .ot.pot_solvers import PotEMD, pot_sinkhorn, pot_sinkhorn_log, pot_sinkhorn_stabilized, pot_unbalanced
from .ot.torch_absorb import TorchAbsorbSinkhorn


def _fused():
    from .ot.fused.solver import FusedSinkhorn  # imports triton lazily, on first use

    return FusedSinkhorn()


register("torch-absorb", TorchAbsorbSinkhorn)
register("pot-sinkhorn", pot_sinkhorn)
register("pot-sinkhorn-log", pot_sinkhorn_log)
register("pot-sinkhorn-stabilized", pot_sinkhorn_stabilized)
register("pot-unbalanced", pot_unbalanced)
register("pot-emd", PotEMD)
register("fused", _fused)
